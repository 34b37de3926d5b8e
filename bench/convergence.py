"""Convergence benchmark: the paper's Sec. 5.1 / Fig. 2 setup (issue 3).

Dense dynamic MF on the synthetic data (float64, lambda=10, d=3, small random initialization),
T in {30, 100}. For each method the step size is tuned on a grid with seed 0 (fewest steps to the
target wins; a tie, common when the target is reached right at a gauge step, goes to the smaller
final L - L*), then the winner runs with every seed. Reported: steps and wall time until
``L - L* <= tol`` (a run that does not get there within the cap counts as the cap), the ratio to the
best baseline, and for Goldstone-GD the share of the run's time spent in gauge steps.

    python -m bench.convergence                      # the full benchmark (tens of minutes on 2 cores)
    python -m bench.convergence --T 30 --seeds 1 --cap 5000 --quick   # a smoke run

Writes bench/results/convergence.json and .md (git-ignored); docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = {
    # name: (optimizer overrides, learning-rate grid)
    "gd_paper": (["experiment=fig2_gd_paper"], [0.3, 1.0, 3.0]),  # clipped to 0.01, rho_s = rho_0 (100/(s+100))^0.7
    # refined around the best (issue 15): 0.025 is best at T=30, 0.0275 no longer converges
    "gd": (["optimizer=gd"], [0.005, 0.01, 0.02, 0.0225, 0.025, 0.0275, 0.03]),
    # 0.0015 and 0.002 added below T=100's best (0.003, at the old grid's edge)
    "adam": (["optimizer=adam"], [0.0015, 0.002, 0.003, 0.01, 0.03, 0.1]),
    "adagrad": (["optimizer=adagrad"], [0.03, 0.1, 0.3, 1.0]),
    # Algorithm 1 as published: natural gradient in so(d), linear update, gauge fields kept
    "goldstone_natural_paper": (["optimizer=goldstone", "optimizer.solver=natural", "optimizer.k1=50",
                                 "optimizer.k2=10", "optimizer.rotation=linear", "optimizer.keep_gauge_fields=true",
                                 "optimizer.allow_reflections=false"],
                                [0.005, 0.01, 0.02, 0.03]),
    # the same natural steps over O(d): reflection walls flipped exactly first, exact rotation (expm)
    "goldstone_natural": (["optimizer=goldstone", "optimizer.solver=natural", "optimizer.k1=50", "optimizer.k2=10",
                           "optimizer.rotation=expm", "optimizer.keep_gauge_fields=true",
                           "optimizer.allow_reflections=true"],
                          [0.005, 0.01, 0.02, 0.03]),
    "goldstone_procrustes": (["optimizer=goldstone", "optimizer.solver=procrustes", "optimizer.k1=50"],
                             [0.005, 0.01, 0.02, 0.03]),
}
BASELINES = ("gd_paper", "gd", "adagrad", "adam")


def run_one(method: str, lr: float, T: int, seed: int, cap: int, tol: float, init_scale: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from goldstone_cli.config import compose
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF
    from goldstone_cli.optim.factory import build_optimizer

    cfg = compose([*METHODS[method][0], f"optimizer.lr={lr}", f"data.T={T}", "trainer.dtype=float64"])
    data = make_synthetic(T=T, seed=0)
    model = DenseDynamicMF(data, d=3, coupling=10.0, init_scale=init_scale, seed=seed)
    opt, sched = build_optimizer(cfg.optimizer, model)
    clip = cfg.optimizer.clip
    L_star = model.L_star
    t0 = time.perf_counter()
    reached, step, gap = False, 0, float("inf")
    for step in range(cap + 1):
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        gap = terms["total"].item() - L_star
        if gap <= tol:
            reached = True
            break
        if not gap < 1e12:  # diverged (nan or huge)
            break
        if step == cap:
            break
        terms["total"].backward()
        if clip is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    return {
        "method": method, "lr": lr, "T": T, "seed": seed, "reached": reached,
        "steps": step if reached else cap, "seconds": seconds, "final_gap": gap,
        "gauge_seconds": getattr(opt, "gauge_seconds", 0.0),
        "gauge_steps": getattr(opt, "num_gauge_steps", 0),
    }


def _run(args):
    return run_one(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[30, 100], help="numbers of time steps")
    ap.add_argument("--seeds", type=int, default=3, help="initialization seeds per method")
    ap.add_argument("--cap", type=int, default=50_000, help="step cap (a run that does not converge counts as the cap)")
    ap.add_argument("--tol", type=float, default=1e-4, help="target suboptimality L - L*")
    ap.add_argument("--init-scale", type=float, default=0.1, help="std of the random initialization")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes (one thread each)")
    ap.add_argument("--quick", action="store_true", help="tune on the first two grid values only")
    ap.add_argument("--grid", action="append", default=[], metavar="METHOD=LR,LR,...",
                    help="replace a method's learning-rate grid for this run (repeatable), e.g. to add values "
                         "around an earlier best: --grid gd=0.0225,0.025,0.0275")
    ap.add_argument("--out", type=Path, default=Path("bench/results/convergence"))
    ap.add_argument("--reference", type=Path, nargs="*", default=[],
                    help="earlier results .json files whose baseline rows count as the best baseline when "
                         "--methods runs no baseline (step counts are deterministic: float64, one thread)")
    args = ap.parse_args()
    for item in args.grid:
        name, _, values = item.partition("=")
        try:
            lrs = [float(v) for v in values.split(",") if v]
        except ValueError:
            lrs = []
        if name not in METHODS or not lrs or any(not lr > 0 for lr in lrs):
            ap.error(f"--grid {item!r}: expected METHOD=LR,LR,... with METHOD one of {', '.join(METHODS)} "
                     "and positive learning rates")
        METHODS[name] = (METHODS[name][0], lrs)
    for ref in args.reference:
        if not ref.is_file():
            ap.error(f"--reference {ref}: no such file; write it first with a full run, e.g. "
                     f"python -m bench.convergence --T {' '.join(map(str, args.T))} --out {ref.with_suffix('')}")

    tasks = [(m, lr, T, 0, args.cap, args.tol, args.init_scale)
             for T in args.T for m in args.methods for lr in (METHODS[m][1][:2] if args.quick else METHODS[m][1])]
    started = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        tuning = list(pool.map(_run, tasks))
        best_lr = {}
        for T in args.T:
            for m in args.methods:
                rows = [r for r in tuning if r["T"] == T and r["method"] == m]
                best = min(rows, key=lambda r: (r["steps"], r["final_gap"]))  # deterministic tie-break
                best_lr[(T, m)] = best["lr"]
        finals = [(m, best_lr[(T, m)], T, s, args.cap, args.tol, args.init_scale)
                  for T in args.T for m in args.methods for s in range(1, args.seeds)]
        extra = list(pool.map(_run, finals))
    seed0 = [r for r in tuning if r["lr"] == best_lr[(r["T"], r["method"])]]
    results = seed0 + extra

    summary = []
    for T in args.T:
        rows = {}
        for m in args.methods:
            rs = [r for r in results if r["T"] == T and r["method"] == m]
            rows[m] = {
                "method": m, "T": T, "lr": best_lr[(T, m)],
                "grid": METHODS[m][1][:2] if args.quick else METHODS[m][1],
                "steps_mean": statistics.mean(r["steps"] for r in rs),
                "steps": [r["steps"] for r in rs],
                "reached": sum(r["reached"] for r in rs), "runs": len(rs),
                "seconds_mean": statistics.mean(r["seconds"] for r in rs),
                "gauge_share": statistics.mean(r["gauge_seconds"] / r["seconds"] for r in rs) if rs[0]["gauge_steps"] else None,
            }
        base = [rows[b]["steps_mean"] for b in BASELINES if b in rows]
        if not base:
            for ref in args.reference:
                earlier = json.loads(ref.read_text())
                same = {k: earlier["meta"].get(k) for k in ("cap", "tol", "seeds", "init_scale")}
                if same != {"cap": args.cap, "tol": args.tol, "seeds": args.seeds, "init_scale": args.init_scale}:
                    raise SystemExit(f"{ref} was run with {same}; this run uses cap={args.cap}, tol={args.tol}, "
                                     f"seeds={args.seeds}, init_scale={args.init_scale}: its baselines do not compare")
                base += [r["steps_mean"] for r in earlier["summary"] if r["T"] == T and r["method"] in BASELINES]
        best_base = min(base) if base else None
        for row in rows.values():
            row["speedup_vs_best_baseline"] = best_base / row["steps_mean"] if best_base else None
        summary.extend(rows.values())

    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "cap": args.cap, "tol": args.tol, "seeds": args.seeds,
            "init_scale": args.init_scale, "minutes": round((time.time() - started) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": tuning + extra}, indent=1))
    lines = ["| T | method | grid | best lr | steps to L-L* <= %g (mean; per seed) | converged | time (s) | gauge share | speed-up vs best baseline |" % args.tol,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        share = f"{100 * r['gauge_share']:.1f}%" if r["gauge_share"] is not None else ""
        ratio = f"{r['speedup_vs_best_baseline']:.1f}x" if r["speedup_vs_best_baseline"] else "n/a"
        lines.append(f"| {r['T']} | {r['method']} | {r['grid']} | {r['lr']} | {r['steps_mean']:.0f}; {r['steps']} | "
                     f"{r['reached']}/{r['runs']} | {r['seconds_mean']:.2f} | {share} | {ratio} |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps(meta))
    print(table)


if __name__ == "__main__":
    main()
