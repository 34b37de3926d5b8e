"""Goldstone-GD on adaptive base optimizers: how the base state is carried through a gauge rotation
(issue 15).

Problems (float64, d=3, steps until ``L - L* <= tol``, a run that does not get there within the cap
counts as the cap):

- ``chain`` / ``ring``: one symmetric group of three tensors with different N (U: 12 rows, V: 8,
  W: 5), local loss ``1/2 ||X - U_t V_t^T||^2 + 1/2 ||Y - U_t W_t^T||^2`` with the same X (12 x 8)
  and Y (12 x 5) at every t (rank 3 plus noise), T=20, a coupling with uneven edge weights (log-uniform
  in [1, 30]) built with ``Coupling.from_adjacency``: a chain, or the chain closed into a ring.
  ``L* = T/2 * (rank-3 residual of [X Y])``. Initialization N(0, 0.3^2).
- ``mf30`` / ``mf100``: the paper's Sec. 5.1 problem (``bench.convergence``: 10 x 10 X, lambda=10,
  N(0, 0.1^2) initialization) at T=30 and T=100.

Base optimizers: SGD, SGD + momentum 0.9, Adam + ExponentialLR(0.999), AdamW (weight decay 0.01) +
StepLR(500, 0.5), AdaGrad. Each runs plain, and wrapped in GoldstoneGD (k1=50) with the ``procrustes``
and the ``natural`` solver (k2=10, expm, over O(d)), the adaptive ones with every
``state_transform``. Each method's step size is tuned with seed 0 on a factor-2 grid that is
extended while the best value is at its edge, then refined by a factor sqrt(2) around the best;
the best runs with seeds 1 and 2.

    nice python -m bench.adaptive                         # everything (about an hour on one core)
    nice python -m bench.adaptive --quick --problems chain --bases adam   # a smoke run

Writes bench/results/adaptive.json and .md (git-ignored); docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PROBLEMS = ("chain", "ring", "mf30", "mf100")
# name: initial learning-rate grid (factor 2)
BASES = {
    "sgd": [0.0025, 0.005, 0.01],
    "momentum": [0.0005, 0.001, 0.002],
    "adam": [0.08, 0.16, 0.32],
    "adamw": [0.08, 0.16, 0.32],
    "adagrad": [0.2, 0.4, 0.8],
}
ADAPTIVE = ("adam", "adamw", "adagrad")
SOLVERS = ("plain", "procrustes", "natural")
TRANSFORMS = ("none", "rotate_diag", "isotropic", "reset")


class _Uneven:
    """Three tensors of different N in one group, T=20, uneven chain or ring (see the module doc)."""

    def __init__(self, kind: str, seed: int, T: int = 20, d: int = 3):
        import numpy as np
        import torch

        from goldstone_cli.optim import Coupling

        dt = torch.float64
        g = torch.Generator().manual_seed(1234)  # the data and the graph: the same for every seed
        n_u, n_v, n_w = 12, 8, 5
        B = torch.randn(n_u, d, generator=g, dtype=dt)
        X = B @ torch.randn(d, n_v, generator=g, dtype=dt) + 0.1 * torch.randn(n_u, n_v, generator=g, dtype=dt)
        Y = B @ torch.randn(d, n_w, generator=g, dtype=dt) + 0.1 * torch.randn(n_u, n_w, generator=g, dtype=dt)
        s = torch.linalg.svdvals(torch.cat([X, Y], dim=1))
        self.L_star = T * 0.5 * float((s[d:] ** 2).sum())
        w = np.exp(np.log(30.0) * torch.rand(T, generator=g, dtype=dt).numpy())  # log-uniform in [1, 30]
        A = np.zeros((T, T))
        idx = np.arange(T - 1)
        A[idx, idx + 1] = A[idx + 1, idx] = w[: T - 1]
        if kind == "ring":
            A[0, T - 1] = A[T - 1, 0] = w[T - 1]
        self.coupling = Coupling.from_adjacency(A)
        gi = torch.Generator().manual_seed(seed)
        self.U, self.V, self.W = (torch.nn.Parameter(0.3 * torch.randn(T, n, d, generator=gi, dtype=dt))
                                  for n in (n_u, n_v, n_w))
        self.X, self.Y = X, Y
        self._src = torch.as_tensor(self.coupling.src)
        self._dst = torch.as_tensor(self.coupling.dst)
        self._w = torch.as_tensor(self.coupling.weight, dtype=dt)[:, None, None]

    def groups(self):
        return [[self.U, self.V, self.W]]

    def params(self):
        return [self.U, self.V, self.W]

    def loss(self):
        import torch

        rx = self.X - self.U @ self.V.transpose(1, 2)  # (T, 12, 8)
        ry = self.Y - self.U @ self.W.transpose(1, 2)  # (T, 12, 5)
        Z = torch.cat([self.U, self.V, self.W], dim=1)  # (T, 25, d)
        psi = 0.5 * (self._w * (Z[self._src] - Z[self._dst]).pow(2)).sum()  # = coupling.psi (Eq. 3), one pass
        return 0.5 * (rx.pow(2).sum() + ry.pow(2).sum()) + psi


class _MF:
    """The Sec. 5.1 problem (``bench.convergence``)."""

    def __init__(self, T: int, seed: int):
        from goldstone_cli.data.synthetic import make_synthetic
        from goldstone_cli.models.dense_mf import DenseDynamicMF

        self.model = DenseDynamicMF(make_synthetic(T=T, seed=0), d=3, coupling=10.0, init_scale=0.1, seed=seed)
        self.L_star = self.model.L_star
        self.coupling = self.model.coupling

    def groups(self):
        return self.model.symmetric_groups()

    def params(self):
        return list(self.model.parameters())

    def loss(self):
        return self.model.loss_terms()["total"]


def make_problem(name: str, seed: int):
    if name in ("chain", "ring"):
        return _Uneven(name, seed)
    if name.startswith("mf"):
        return _MF(int(name[2:]), seed)
    raise ValueError(f"unknown problem {name!r}; valid: {', '.join(PROBLEMS)}")


def make_base(name: str, params, lr: float):
    """(optimizer, scheduler or None) of a base."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr), None
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9), None
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr), None
    raise ValueError(f"unknown base {name!r}; valid: {', '.join(BASES)}")


def methods(bases, solvers, transforms, natural_transforms=None) -> list[tuple[str, str, str]]:
    """(base, solver, transform); second-moment transforms only for the adaptive bases."""
    out = []
    for b in bases:
        for s in solvers:
            if s == "plain":
                out.append((b, s, "-"))
            else:
                trs = natural_transforms if (s == "natural" and natural_transforms is not None) else transforms
                for tr in (trs if b in ADAPTIVE else ("none",)):
                    out.append((b, s, tr))
    return out


def run_one(problem: str, base: str, solver: str, transform: str, lr: float, seed: int, cap: int,
            tol: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from goldstone_cli.optim import GoldstoneGD

    prob = make_problem(problem, seed)
    opt, sched = make_base(base, prob.params(), lr)
    if solver != "plain":
        opt = GoldstoneGD(opt, prob.groups(), prob.coupling, k1=50, solver=solver, k2=10, rotation="expm",
                          allow_reflections=True, state_transform=transform)
    reached, step, gap = False, 0, float("inf")
    psi_rises = 0
    for step in range(cap + 1):
        opt.zero_grad(set_to_none=True)
        loss = prob.loss()
        gap = float(loss.detach()) - prob.L_star
        if gap <= tol or not gap < 1e12 or step == cap:
            reached = gap <= tol
            break
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        lg = getattr(opt, "last_gauge", None)
        if lg is not None and lg["step"] == opt.base_steps and lg["psi_after"] > lg["psi_before"] * (1 + 1e-12):
            psi_rises += 1
    return {"problem": problem, "base": base, "solver": solver, "transform": transform, "lr": lr, "seed": seed,
            "reached": reached, "steps": step if reached else cap, "final_gap": gap if math.isfinite(gap) else 1e300,
            "psi_rises": psi_rises}


def _run(args):
    return run_one(*args)


def _key(r) -> tuple:
    return (r["steps"], r["final_gap"])


def tune(pool, ms, problems, cap, tol, quick) -> dict:
    """Seed-0 runs; per (problem, method): the grid is extended while its best value is at the edge
    (at most 5 times, 2 if no value reaches the target), then refined once by sqrt(2) around the
    best (if one reaches the target). A run added after the first grid is stopped at the fewest
    steps that an earlier value of the same method needed (it cannot win later than that)."""
    grids = {(p, m): (BASES[m[0]][:2] if quick else list(BASES[m[0]])) for p in problems for m in ms}
    done: dict[tuple, dict] = {}  # (p, m, lr) -> row
    expansions = {k: 0 for k in grids}
    refined = {k: quick for k in grids}
    while True:
        todo = [(p, m, lr) for (p, m), g in grids.items() for lr in g if (p, m, lr) not in done]
        if not todo:
            changed = False
            for (p, m), g in grids.items():
                g.sort()
                best = min(g, key=lambda lr: _key(done[(p, m, lr)]))
                if quick:
                    continue
                any_reached = any(done[(p, m, lr)]["reached"] for lr in g)
                if best in (g[0], g[-1]) and expansions[(p, m)] < (5 if any_reached else 2):
                    g.append(best * 2 if best == g[-1] else best / 2)
                    expansions[(p, m)] += 1
                    changed = True
                elif not refined[(p, m)] and any_reached:
                    g += [best * math.sqrt(2), best / math.sqrt(2)]
                    refined[(p, m)] = True
                    changed = True
            if not changed:
                break
            continue
        caps = {}
        for p, m, lr in todo:
            reached = [done[(p, m, x)]["steps"] for x in grids[(p, m)] if (p, m, x) in done and done[(p, m, x)]["reached"]]
            caps[(p, m, lr)] = min([cap] + reached)
        rows = list(pool.map(_run, [(p, *m, lr, 0, caps[(p, m, lr)], tol) for p, m, lr in todo]))
        for (p, m, lr), r in zip(todo, rows):
            r["cap"] = caps[(p, m, lr)]
            done[(p, m, lr)] = r
    return {"grids": grids, "runs": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    ap.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS,
                    help="GoldstoneGD state_transform values to run on the adaptive bases (procrustes)")
    ap.add_argument("--natural-transforms", nargs="+", default=["none", "rotate_diag"], choices=TRANSFORMS,
                    help="state_transform values to run with the natural solver")
    ap.add_argument("--seeds", type=int, default=3, help="initialization seeds (seed 0 tunes the step size)")
    ap.add_argument("--cap", type=int, default=4000, help="step cap (a run that does not converge counts as the cap)")
    ap.add_argument("--tol", type=float, default=1e-4, help="target suboptimality L - L*")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    ap.add_argument("--quick", action="store_true", help="the first two grid values, no extension or refinement")
    ap.add_argument("--out", type=Path, default=Path("bench/results/adaptive"))
    args = ap.parse_args()

    ms = methods(args.bases, args.solvers, args.transforms, args.natural_transforms)
    started = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        tuned = tune(pool, ms, args.problems, args.cap, args.tol, args.quick)
        best_lr = {(p, m): min(g, key=lambda lr: _key(tuned["runs"][(p, m, lr)])) for (p, m), g in tuned["grids"].items()}
        finals = [(p, *m, best_lr[(p, m)], s, args.cap, args.tol) for (p, m) in best_lr for s in range(1, args.seeds)]
        extra = list(pool.map(_run, finals))
    summary = []
    for (p, m), lr in best_lr.items():
        g = sorted(tuned["grids"][(p, m)])
        rs = [tuned["runs"][(p, m, lr)]] + [r for r in extra if (r["problem"], r["base"], r["solver"], r["transform"]) == (p, *m)]
        summary.append({
            "problem": p, "base": m[0], "solver": m[1], "transform": m[2], "lr": lr, "grid": g,
            "interior": g[0] < lr < g[-1], "steps": [r["steps"] for r in rs],
            "steps_mean": statistics.mean(r["steps"] for r in rs), "reached": sum(r["reached"] for r in rs),
            "runs": len(rs), "max_final_gap": max(r["final_gap"] for r in rs),
            "psi_rises": sum(r["psi_rises"] for r in rs),
        })
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "cap": args.cap,
            "tol": args.tol, "seeds": args.seeds, "quick": args.quick,
            "minutes": round((time.time() - started) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from goldstone_cli.io import atomic_write_text

    all_runs = [dict(r) for r in tuned["runs"].values()] + extra
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"meta": meta, "summary": summary, "runs": all_runs}, indent=1))
    table = render(summary, args.tol)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(json.dumps(meta))
    print(table)


def _cell(r) -> str:
    if r["reached"] == r["runs"]:
        s = f"{r['steps_mean']:.0f}"
    elif r["reached"] == 0:
        s = f"cap (gap {r['max_final_gap']:.1e})" if r["max_final_gap"] < 1e12 else "cap (diverged)"
    else:
        s = f"{r['steps_mean']:.0f} ({r['reached']}/{r['runs']})"
    return f"{s} @{r['lr']:.3g}" + ("" if r["interior"] else "*")


def render(summary: list[dict], tol: float) -> str:
    """One table: rows (base, solver), columns transform x problem. * marks a best lr at the grid's edge."""
    problems = list(dict.fromkeys(r["problem"] for r in summary))
    lines = [f"steps until L - L* <= {tol:g}: mean over seeds (converged/runs if not all) @ best lr; * best lr at the grid's edge", "",
             "| base | solver | state_transform | " + " | ".join(problems) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in problems) + " |"]
    keys = list(dict.fromkeys((r["base"], r["solver"], r["transform"]) for r in summary))
    by = {(r["base"], r["solver"], r["transform"], r["problem"]): r for r in summary}
    for k in keys:
        cells = [_cell(by[(*k, p)]) if (*k, p) in by else "" for p in problems]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
