"""Why Adam and AdaGrad + procrustes are slow on the Sec. 5.1 problem: the candidate causes (issue 15).

Each variant changes one thing against the ``bench.adaptive`` setting (ExponentialLR(0.999) for Adam,
eps 1e-8 / 1e-10, k1=50, N(0, 0.1^2) start, procrustes, ``state_transform="none"``) and reports the
mean over seeds 0-2 of the steps until ``L - L* <= tol`` (cap 4,000) at each step size. The table in
docs/benchmarks.md ("The other candidates are not the cause") comes from these loops.

    python -m bench.adaptive_candidates --problems mf30 --out bench/results/adaptive_candidates.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.adaptive import make_base, make_problem
from goldstone_cli.optim import GoldstoneGD

# name -> changes against the baseline
VARIANTS = {
    "baseline": {},
    "no_schedule": {"sched": False},
    "eps1e-4": {"eps": 1e-4},
    "eps1e-2": {"eps": 1e-2},
    "k1=10": {"k1": 10},
    "k1=25": {"k1": 25},
    "init x3": {"init_mult": 3.0},
    "init x10": {"init_mult": 10.0},
    "warmup100": {"warmup": 100},
}
STEP_SIZES = {"adam": (0.32, 0.64, 1.28), "adagrad": (0.8, 1.6)}
ADAM_ONLY = ("no_schedule", "warmup100")  # AdaGrad has no schedule in bench.adaptive


def run(problem: str, base: str, lr: float, seeds: int = 3, cap: int = 4000, tol: float = 1e-4, k1: int = 50,
        sched: bool = True, eps: float | None = None, init_mult: float = 1.0, warmup: int = 0) -> list[int]:
    """Steps until L - L* <= tol for each seed (the cap where it is not reached)."""
    prob = make_problem(problem, range(seeds))
    if init_mult != 1.0:
        with torch.no_grad():
            for p in prob.flat_params():
                p.mul_(init_mult)
    opt, schedule = make_base(base, prob.flat_params(), lr)
    if eps is not None:
        for g in opt.param_groups:
            g["eps"] = eps
    base_lrs = [g["lr"] for g in opt.param_groups]
    opt = GoldstoneGD(opt, prob.groups(), prob.coupling, k1=k1, solver="procrustes")
    first: list[int | None] = [None] * seeds
    for step in range(cap + 1):
        if warmup:  # linear warm-up on top of the ExponentialLR decay (applied by hand)
            f = min(1.0, (step + 1) / warmup) * (0.999 ** step if sched else 1.0)
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * f
        opt.zero_grad(set_to_none=True)
        gaps = (prob.losses_and_grads() - prob.L_star).tolist()
        for s, gap in enumerate(gaps):
            if first[s] is None and gap <= tol:
                first[s] = step
        if all(f is not None for f in first):
            break
        if step < cap:
            opt.step()
            if schedule is not None and sched and not warmup:
                schedule.step()
    return [cap if f is None else f for f in first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=["mf30"], choices=["mf30", "mf100"])
    ap.add_argument("--bases", nargs="+", default=list(STEP_SIZES), choices=list(STEP_SIZES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("bench/results/adaptive_candidates.jsonl"),
                    help="one JSON line per (problem, base, variant, step size), appended")
    args = ap.parse_args()
    torch.set_num_threads(1)  # d=3 problems: one thread is fastest
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for problem in args.problems:
            for base in args.bases:
                for name in args.variants:
                    if base != "adam" and name in ADAM_ONLY:
                        continue
                    for lr in STEP_SIZES[base]:
                        steps = run(problem, base, lr, **VARIANTS[name])
                        row = {"problem": problem, "base": base, "variant": name, "lr": lr, "steps": steps,
                               "mean": sum(steps) / len(steps)}
                        print(json.dumps(row), flush=True)
                        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
