"""Learning-rate grid for one model and optimizer: the source of the `tuned:` values in conf/model/
that the paper does not give (e.g. plain GD on MovieLens, AdaGrad on word embeddings).

Each grid value is one `goldstone train` run (in this process, one thread) with the model's tuned
settings and `optimizer.lr` replaced; reported: the status (a NaN loss counts as diverged), the
final training loss and the model's held-out metric (its target metric: val_ll for movielens,
ll_test for dwe, L - L* for dense_mf). The best lr is the best final held-out metric among the runs
that did not diverge.

    python -m bench.tune_lr model=movielens optimizer=gd \\
        data.path=../shared/data/movielens/ml-latest-small --lrs 0.001 0.003 0.01 0.03 --steps 300

Writes nothing but the run folders under a temporary folder; docs/benchmarks.md records results.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="goldstone train overrides (model=..., optimizer=..., data...)")
    ap.add_argument("--lrs", type=float, nargs="+", required=True, help="the optimizer.lr grid")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from goldstone_cli.config import compose
    from goldstone_cli.train import TrainingDiverged, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            cfg = compose([*args.overrides, f"optimizer.lr={lr}", f"trainer.steps={args.steps}",
                           f"trainer.eval_every={args.steps}", "trainer.progress=false", f"output_dir={tmp}"])
            t0 = time.perf_counter()
            try:
                res = train(cfg)
                s = res.summary
                metric = s["target_metric"]
                rows.append({"lr": lr, "status": s["status"], "total": s["final"].get("total"),
                             "metric": metric, "value": s["final"].get(metric), "seconds": time.perf_counter() - t0})
            except TrainingDiverged as exc:
                rows.append({"lr": lr, "status": "diverged", "total": None, "metric": None, "value": None,
                             "seconds": time.perf_counter() - t0, "message": str(exc)[:80]})
            print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if r["status"] != "diverged" and r["value"] is not None and math.isfinite(r["value"])]
    if ok:
        lower = ok[0]["metric"] == "suboptimality"
        best = (min if lower else max)(ok, key=lambda r: r["value"])
        print(f"best lr {best['lr']}: {best['metric']} = {best['value']:.6g} after {args.steps} steps")
    print("| lr | status | final loss | held-out metric |\n| --- | --- | --- | --- |")
    for r in rows:
        total = f"{r['total']:.6g}" if r["total"] is not None else "-"
        value = f"{r['metric']} {r['value']:.6g}" if r["value"] is not None else "-"
        print(f"| {r['lr']} | {r['status']} | {total} | {value} |")


if __name__ == "__main__":
    main()
