"""Benchmark: sparse dynamic Bernoulli MF (paper Sec. 5.2), AdaGrad vs Goldstone-GD on the same AdaGrad.

    python -m bench.movielens_step curves --data ../shared/data/movielens/ml-latest-small --steps 500
    python -m bench.movielens_step curves --sweep outputs/sweeps/fig3_<date>     (runs of the fig3 sweep)
    python -m bench.movielens_step steptime --data bench/results/movielens/ml-20m-synthetic-20000263-s0

``curves``: full training runs (``goldstone train model=movielens``, paper settings d=30, lambda=10,
gamma=1, T=100, full batch) for ``optimizer=adagrad`` and ``optimizer=goldstone`` (the model's tuned
settings: the paper's AdaGrad lr 1, k1=100, k2=10), several seeds, through the real trainer. Reports
per method: full-batch step time (optimization only, from ``metrics.csv``), the gauge steps' share
of it, the steps until psi stays within 1% of its final value, and the final test log-likelihood and
AUC. Run folders are kept
(``--out``), so ``goldstone report`` / the ``fig3`` sweep plots can be drawn from them.

``steptime``: a few full-batch steps on any MovieLens copy (e.g. the generated ML-20M-shaped file of
``bench.movielens_load``): time of one AdaGrad step (loss, backward, update) and of one gauge step,
so the Goldstone-GD overhead at k1 is ``gauge / (k1 * step)``; peak memory.

Results are printed and written as JSON (``bench/results/movielens_step_<mode>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model}, {torch.get_num_threads()} threads{gpu}"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def steps_to_settle(step: np.ndarray, psi: np.ndarray, rel: float = 0.01) -> int:
    """First logged step from which psi stays within ``rel`` of its final value."""
    final = psi[-1]
    outside = np.abs(psi - final) > rel * abs(final)
    if not outside.any():
        return int(step[0])
    last_out = np.flatnonzero(outside).max()
    return int(step[min(last_out + 1, len(step) - 1)])


# ----------------------------------------------------------------------------- curves
def run_stats(run_dir: Path, method: str, seed: int) -> dict:
    """Step time, psi settling step and final held-out metrics of one finished run folder."""
    df = pd.read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = df.dropna(subset=["test_ll"])
    steps = int(df["step"].iloc[-1])
    wall = float(df["wall_time"].iloc[-1])
    return {
        "method": method, "seed": seed, "steps": steps, "step_ms": 1e3 * wall / max(steps, 1),
        "gauge_share": summary.get("gauge_overhead"), "gauge_steps": summary.get("gauge_steps"),
        "psi_settle_step": steps_to_settle(df["step"].to_numpy(), df["psi"].to_numpy()),
        "final_total": float(df["total"].iloc[-1]), "final_psi": float(df["psi"].iloc[-1]),
        "test_ll": float(ev["test_ll"].iloc[-1]), "test_auc": float(ev["test_auc"].iloc[-1]),
        "val_ll": float(ev["val_ll"].iloc[-1]), "run_dir": str(run_dir),
    }


def run_curves(args) -> dict:
    """Train (or, with --sweep, read the runs of a ``goldstone sweep sweep=fig3`` folder) and compare."""
    rows = []
    if args.sweep:
        for run_dir in sorted(p for p in Path(args.sweep).iterdir() if (p / "summary.json").is_file()):
            method, _, rest = run_dir.name.partition("__")
            seed = int(rest.rsplit("-", 1)[-1]) if rest else 0
            rows.append(run_stats(run_dir, method, seed))
    else:
        from goldstone_cli.config import compose
        from goldstone_cli.train import train

        out = Path(args.out)
        methods = {"adagrad": "adagrad", "goldstone": "goldstone"}
        for seed in range(args.seeds):
            for method, option in methods.items():
                run_dir = out / f"{method}__seed-{seed}"
                if not (run_dir / "summary.json").is_file():
                    cfg = compose(["model=movielens", f"optimizer={option}", f"data.path={args.data}",
                                   f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}",
                                   "trainer.log_every=1", f"trainer.checkpoint_every={args.steps}",
                                   f"trainer.device={args.device}", f"seed={seed}", f"run_dir={run_dir}",
                                   *args.override])
                    train(cfg)
                rows.append(run_stats(run_dir, method, seed))
    if not rows:
        raise SystemExit(f"no finished runs (summary.json) in {args.sweep}")
    table = pd.DataFrame(rows)
    agg = table.groupby("method").agg(
        runs=("seed", "count"), step_ms=("step_ms", "mean"), gauge_share=("gauge_share", "mean"),
        psi_settle_step=("psi_settle_step", "median"), final_psi=("final_psi", "mean"),
        final_total=("final_total", "mean"), test_ll=("test_ll", "mean"), test_auc=("test_auc", "mean"))
    print(table.drop(columns=["run_dir"]).to_string(index=False))
    print(agg.to_string())
    res = {"runs": rows, "per_method": agg.reset_index().to_dict(orient="records")}
    if {"adagrad", "goldstone"} <= set(agg.index):
        ada, gs = agg.loc["adagrad"], agg.loc["goldstone"]
        res["overhead_wall"] = float(gs.step_ms / ada.step_ms - 1.0)
        res["psi_settle_ratio"] = float(ada.psi_settle_step / max(gs.psi_settle_step, 1))
    return res


# ----------------------------------------------------------------------------- steptime
def run_steptime(args) -> dict:
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
    from goldstone_cli.optim.factory import build_optimizer
    from goldstone_cli.config import compose

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    data = load_movielens(args.data, T=100, seed=0, cache_dir=args.cache_dir, progress=False)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = SparseDynamicBernoulliMF(data, d=30, coupling=10.0, gamma=1.0, device=device, dtype=torch.float32)
    sync()
    t_init = time.perf_counter() - t0
    cfg = compose(["model=movielens", "optimizer=goldstone"]).optimizer
    opt, _ = build_optimizer(cfg, model)  # GoldstoneGD on AdaGrad(lr=1); its step() is the base step until k1
    step_s, gauge_s = [], []
    for i in range(args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        terms["total"].backward()
        opt.base.step() if hasattr(opt, "base") else opt.step()
        sync()
        step_s.append(time.perf_counter() - t0)
        print(f"step {i}: {step_s[-1]:.3f} s  total={terms['total'].item():.6g}  psi={terms['psi'].item():.6g}", flush=True)
        del terms
    for i in range(args.gauge_steps):
        sync()
        t0 = time.perf_counter()
        opt.gauge_step()
        sync()
        gauge_s.append(time.perf_counter() - t0)
        print(f"gauge step {i}: {gauge_s[-1]:.3f} s  {opt.last_gauge}", flush=True)
    t0 = time.perf_counter()
    ev = model.evaluate()
    sync()
    t_eval = time.perf_counter() - t0
    step = statistics.median(step_s[1:] if len(step_s) > 1 else step_s)
    gauge = statistics.median(gauge_s) if gauge_s else float("nan")
    res = {
        "data": str(args.data), "ratings": len(data), "train": model.n_train, "n_users": data.n_users,
        "n_items": data.n_items, "T": data.T, "d": 30, "device": str(device),
        "param_gb": 4 * data.T * (data.n_users + data.n_items) * 30 / 1e9,
        "load_s": t_load, "init_s": t_init, "step_s": step_s, "step_median_s": step, "gauge_s": gauge_s,
        "gauge_median_s": gauge, "overhead_at_k1_100": gauge / (100 * step), "eval_s": t_eval, "eval": ev,
        "peak_rss_gb": peak_rss_gb(),
    }
    if device.type == "cuda":
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("curves", help="AdaGrad vs Goldstone-GD training runs (several seeds)")
    c.add_argument("--data", help="MovieLens folder or ratings file (to train the runs here)")
    c.add_argument("--sweep", help="instead of training: a finished `goldstone sweep sweep=fig3` folder to read")
    c.add_argument("--steps", type=int, default=500, help="training steps per run")
    c.add_argument("--seeds", type=int, default=3, help="initialization seeds per method")
    c.add_argument("--eval-every", type=int, default=100, help="evaluation interval (steps)")
    c.add_argument("--out", default=str(RESULTS / "movielens_step_runs"), help="folder for the run folders")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.add_argument("override", nargs="*", help="extra Hydra overrides for every run (e.g. data.T=50)")
    s = sub.add_parser("steptime", help="time of a full-batch step and of a gauge step, peak memory")
    s.add_argument("--data", required=True, help="MovieLens folder or ratings file")
    s.add_argument("--steps", type=int, default=3, help="AdaGrad steps to time (the first is warm-up)")
    s.add_argument("--gauge-steps", type=int, default=2, help="gauge steps to time")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--cache-dir", default=str(RESULTS / "movielens" / "cache"),
                   help="processed-array cache (default: the one bench.movielens_load fills)")
    s.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    if args.mode == "curves" and not (args.sweep or args.data):
        p.error("curves needs --data (train here) or --sweep (read a finished sweep)")
    res = run_curves(args) if args.mode == "curves" else run_steptime(args)
    res.update({"machine": machine(), "torch": torch.__version__, "command": "python -m bench.movielens_step " +
                " ".join(f"{k}={v}" for k, v in vars(args).items())})
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"movielens_step_{args.mode}{('_' + args.tag) if getattr(args, 'tag', '') else ''}.json"
    from goldstone_cli.io import atomic_write_json

    atomic_write_json(path, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "step_s", "gauge_s")}, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
