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
``state_transform``. Each method's step size is tuned on a factor-2 grid that is extended while
the best value is at its edge, then refined by a factor sqrt(2) around the best;
all seeds run side by side in one process (one symmetric group each, so their gauge steps and
optimizer states stay independent) and the best mean over the seeds wins.

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
# balanced: procrustes with GoldstoneGD(balance=...) (each time step balanced over GL(d) first; the
# local losses here see U, V, W only through U V^T and U W^T)
SOLVERS = ("plain", "procrustes", "natural", "balanced")
TRANSFORMS = ("none", "rotate_diag", "isotropic", "reset")


class Problem:
    """S seeds of one problem side by side: tensors ``Z[k]`` (S, T, N_k, d) as S separate leaves each
    (one symmetric group per seed, so the seeds' gauge steps and optimizer states are independent),
    local loss ``sum_blocks 1/2 ||X_b - Z[a_b]_t Z[c_b]_t^T||^2`` plus psi (Eq. 3). Loss and
    gradient in closed form, batched over seeds (checked against autograd in tests)."""

    def __init__(self, blocks, coupling, inits, L_star: float):
        import torch

        self.blocks = blocks  # [(a, c, X (n_a, n_c))]
        # GoldstoneGD(balance=...) signs: +1 for the left factors (a), -1 for the right ones (c)
        self.sides = [1 if any(b[0] == k for b in blocks) else -1 for k in range(len(inits[0]))]
        self.coupling = coupling
        self.L_star = L_star
        self.lap = coupling.laplacian(torch.float64)  # (T, T)
        # params[s][k]: (T, N_k, d)
        self.params = [[torch.nn.Parameter(Z.clone()) for Z in seed_init] for seed_init in inits]

    def groups(self):
        return self.params

    def flat_params(self):
        return [Z for group in self.params for Z in group]

    def losses_and_grads(self):
        """Per-seed total loss (S,) and the gradient written into every parameter's .grad."""
        import torch

        with torch.no_grad():
            K = len(self.params[0])
            Zs = [torch.stack([g[k] for g in self.params]) for k in range(K)]  # (S, T, N_k, d)
            grads = [torch.zeros_like(Z) for Z in Zs]
            loss = torch.zeros(len(self.params), dtype=torch.float64)
            for a, c, X in self.blocks:
                res = X - Zs[a] @ Zs[c].transpose(-1, -2)  # (S, T, n_a, n_c)
                loss += 0.5 * res.pow(2).sum(dim=(1, 2, 3))
                grads[a] -= res @ Zs[c]
                grads[c] -= res.transpose(-1, -2) @ Zs[a]
            for k, Z in enumerate(Zs):
                LZ = torch.einsum("ts,bsnd->btnd", self.lap, Z)  # Lap @ Z: gradient of psi
                loss += 0.5 * (Z * LZ).sum(dim=(1, 2, 3))  # psi = 1/2 <Z, Lap Z>
                grads[k] += LZ
            for s, group in enumerate(self.params):
                for k, P in enumerate(group):
                    P.grad = grads[k][s].clone()
        return loss


def _uneven(kind: str, seeds, T: int = 20, d: int = 3) -> Problem:
    """Three tensors of different N in one group, T=20, uneven chain or ring (see the module doc)."""
    import numpy as np
    import torch

    from goldstone_cli.optim import Coupling

    dt = torch.float64
    g = torch.Generator().manual_seed(1234)  # the data and the graph: the same for every seed
    n_u, n_v, n_w = 12, 8, 5
    B = torch.randn(n_u, d, generator=g, dtype=dt)
    X = B @ torch.randn(d, n_v, generator=g, dtype=dt) + 0.1 * torch.randn(n_u, n_v, generator=g, dtype=dt)
    Y = B @ torch.randn(d, n_w, generator=g, dtype=dt) + 0.1 * torch.randn(n_u, n_w, generator=g, dtype=dt)
    sv = torch.linalg.svdvals(torch.cat([X, Y], dim=1))
    w = np.exp(np.log(30.0) * torch.rand(T, generator=g, dtype=dt).numpy())  # log-uniform in [1, 30]
    A = np.zeros((T, T))
    idx = np.arange(T - 1)
    A[idx, idx + 1] = A[idx + 1, idx] = w[: T - 1]
    if kind == "ring":
        A[0, T - 1] = A[T - 1, 0] = w[T - 1]
    inits = []
    for seed in seeds:
        gi = torch.Generator().manual_seed(seed)
        inits.append([0.3 * torch.randn(T, n, d, generator=gi, dtype=dt) for n in (n_u, n_v, n_w)])
    return Problem([(0, 1, X), (0, 2, Y)], Coupling.from_adjacency(A), inits, T * 0.5 * float((sv[d:] ** 2).sum()))


def _sec51(T: int, seeds) -> Problem:
    """The Sec. 5.1 problem exactly as ``bench.convergence`` builds it (DenseDynamicMF's initialization)."""
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    data = make_synthetic(T=T, seed=0)
    models = [DenseDynamicMF(data, d=3, coupling=10.0, init_scale=0.1, seed=s) for s in seeds]
    inits = [[m.U.detach(), m.V.detach()] for m in models]
    return Problem([(0, 1, data.X[0].to(models[0].U.dtype))], models[0].coupling, inits, models[0].L_star)


def make_problem(name: str, seeds) -> Problem:
    if name in ("chain", "ring"):
        return _uneven(name, seeds)
    if name.startswith("mf"):
        return _sec51(int(name[2:]), seeds)
    raise ValueError(f"unknown problem {name!r}; valid: {', '.join(PROBLEMS)}")


def make_base(name: str, params, lr: float):
    """(optimizer, scheduler or None) of a base."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True), None
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True), None
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr, foreach=True)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, foreach=True), None
    raise ValueError(f"unknown base {name!r}; valid: {', '.join(BASES)}")


def methods(bases, solvers, transforms, natural_transforms=None) -> list[tuple[str, str, str]]:
    """(base, solver, transform); second-moment transforms only for the adaptive bases."""
    out = []
    for b in bases:
        for s in solvers:
            if s == "plain":
                out.append((b, s, "-"))
            else:
                trs = natural_transforms if (s in ("natural", "balanced") and natural_transforms is not None) else transforms
                for tr in (trs if b in ADAPTIVE else ("none",)):
                    if s == "balanced" and tr == "isotropic":  # refused by GoldstoneGD: balancing is not orthogonal
                        continue
                    out.append((b, s, tr))
    return out


def run_one(problem: str, base: str, solver: str, transform: str, lr: float, seeds: int, cap: int,
            tol: float, budget: float = float("inf")) -> dict:
    """All seeds side by side. Steps until ``L - L* <= tol`` per seed (the cap if not reached). The
    run stops once every seed has reached the target or diverged, or once the mean steps would
    exceed ``budget`` (the best mean of the tuning so far: this value cannot win; ``complete`` False).
    Runs on one thread (d=3 problems), restoring the caller's thread count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_one(problem, base, solver, transform, lr, seeds, cap, tol, budget)
    finally:
        torch.set_num_threads(threads)


def _run_one(problem: str, base: str, solver: str, transform: str, lr: float, seeds: int, cap: int,
             tol: float, budget: float) -> dict:
    import torch

    from goldstone_cli.optim import GoldstoneGD

    prob = make_problem(problem, range(seeds))
    opt, sched = make_base(base, prob.flat_params(), lr)
    if solver != "plain":
        balance = [prob.sides] * seeds if solver == "balanced" else None
        opt = GoldstoneGD(opt, prob.groups(), prob.coupling, k1=50, solver="procrustes" if balance else solver,
                          k2=10, rotation="expm", allow_reflections=True, state_transform=transform, balance=balance)
    first = [None] * seeds  # step at which each seed first reached the target
    gaps = [float("inf")] * seeds
    psi_rises, complete, step = 0, True, 0
    for step in range(cap + 1):
        opt.zero_grad(set_to_none=True)
        loss = prob.losses_and_grads()
        for s_, value in enumerate(loss.tolist()):
            gaps[s_] = value - prob.L_star
            if first[s_] is None and gaps[s_] <= tol:
                first[s_] = step
        dead = [f is None and not gaps[i] < 1e12 for i, f in enumerate(first)]  # diverged (nan or huge)
        if all(f is not None or x for f, x in zip(first, dead)) or step == cap:
            break
        if sum(f for f in first if f is not None) + step * sum(f is None for f in first) > seeds * budget:
            complete = False
            break
        opt.step()
        if sched is not None:
            sched.step()
        lg = getattr(opt, "last_gauge", None)
        if lg is not None and lg["step"] == opt.base_steps:
            psi_rises += sum(g["psi_after"] > g["psi_before"] * (1 + 1e-12) for g in lg["groups"])
    steps = [f if f is not None else cap for f in first]
    return {"problem": problem, "base": base, "solver": solver, "transform": transform, "lr": lr,
            "reached": sum(f is not None for f in first), "steps": steps, "steps_mean": sum(steps) / seeds,
            "final_gap": max(g if math.isfinite(g) else 1e300 for g in gaps), "psi_rises": psi_rises,
            "complete": complete, "ran": step, "cap": cap, "tol": tol}


def _run(args):
    try:
        return run_one(*args)
    except (RuntimeError, torch_linalg_error()) as e:  # e.g. an SVD of a diverged (nan) run
        problem, base, solver, transform, lr, seeds, cap = args[:7]
        return {"problem": problem, "base": base, "solver": solver, "transform": transform, "lr": lr,
                "reached": 0, "steps": [cap] * seeds, "steps_mean": float(cap), "final_gap": 1e300,
                "psi_rises": 0, "complete": True, "ran": None, "error": str(e).splitlines()[0][:200]}


def torch_linalg_error():
    import torch

    return torch.linalg.LinAlgError


def _key(r) -> tuple:
    return (r["steps_mean"] if r["complete"] else float("inf"), r["final_gap"])


def tune(pool, ms, problems, seeds, cap, tol, quick, log=None, resume=None) -> dict:
    """Per (problem, method): every grid value runs all seeds; the best mean wins (ties: the smaller
    worst final gap). The factor-2 grid is extended while its best value is at the edge (at most 5
    times, 2 if no seed reaches the target), then refined once by sqrt(2) around the best (if it
    reaches the target). A value added after the first grid stops once its mean can no longer beat
    the best so far (``complete`` False)."""
    grids = {(p, m): (BASES[m[0]][:2] if quick else list(BASES[m[0]])) for p in problems for m in ms}
    done: dict[tuple, dict] = {}  # (p, m, lr) -> row
    if resume is not None and resume.is_file():  # rows of an earlier (interrupted) run with the same settings
        for line in resume.read_text().splitlines():
            r = json.loads(line)
            key = (r["problem"], (r["base"], r["solver"], r["transform"]))
            if key in grids and len(r["steps"]) == seeds and r.get("cap", cap) == cap and r.get("tol", tol) == tol:
                done[(*key, r["lr"])] = r
    expansions = {k: 0 for k in grids}
    refined = {k: quick for k in grids}
    while True:
        todo = [(p, m, lr) for (p, m), g in grids.items() for lr in g if (p, m, lr) not in done]
        todo.sort(key=lambda x: (x[0], x[1][2] in ("reset", "isotropic")))  # the main candidates first
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
                elif not refined[(p, m)] and done[(p, m, best)]["reached"]:
                    g += [best * math.sqrt(2), best / math.sqrt(2)]
                    refined[(p, m)] = True
                    changed = True
            if not changed:
                break
            continue
        budget = {}
        for p, m, lr in todo:
            means = [done[(p, m, x)]["steps_mean"] for x in grids[(p, m)] if (p, m, x) in done and done[(p, m, x)]["complete"]]
            budget[(p, m, lr)] = min(means, default=float("inf"))
        rows = pool.map(_run, [(p, *m, lr, seeds, cap, tol, budget[(p, m, lr)]) for p, m, lr in todo])
        for (p, m, lr), r in zip(todo, rows):
            done[(p, m, lr)] = r
            if log is not None:  # progress, one JSON line per run (the summary is written at the end)
                with open(log, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return {"grids": grids, "runs": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    ap.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS,
                    help="GoldstoneGD state_transform values to run on the adaptive bases (procrustes)")
    ap.add_argument("--natural-transforms", nargs="+", default=["none", "rotate_diag"], choices=TRANSFORMS,
                    help="state_transform values to run with the natural and the balanced solver")
    ap.add_argument("--seeds", type=int, default=3, help="initialization seeds 0..S-1, run side by side")
    ap.add_argument("--cap", type=int, default=4000, help="step cap (a run that does not converge counts as the cap)")
    ap.add_argument("--tol", type=float, default=1e-4, help="target suboptimality L - L*")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    ap.add_argument("--quick", action="store_true", help="the first two grid values, no extension or refinement")
    ap.add_argument("--out", type=Path, default=Path("bench/results/adaptive"))
    ap.add_argument("--resume", type=Path, default=None,
                    help="a .runs.jsonl progress log of an interrupted run: its rows (same seeds, cap, tol) are reused")
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="LOG",
                    help="only print the table of the runs in these .runs.jsonl progress logs (e.g. of an "
                         "interrupted run: each method's best over the values it tried; * marks a best at the edge)")
    args = ap.parse_args()
    if args.report is not None:
        rows = {}
        for log in args.report:
            if not log.is_file():
                ap.error(f"--report {log}: no such file")
            for line in log.read_text().splitlines():
                r = json.loads(line)
                rows[(r["problem"], (r["base"], r["solver"], r["transform"]), r["lr"])] = r
        print(render(summarize(rows), args.tol))
        return

    ms = methods(args.bases, args.solvers, args.transforms, args.natural_transforms)
    started = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tuned = tune(pool, ms, args.problems, args.seeds, args.cap, args.tol, args.quick,
                     log=args.out.with_suffix(".runs.jsonl"), resume=args.resume)
    summary = summarize(tuned["runs"])
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "cap": args.cap,
            "tol": args.tol, "seeds": args.seeds, "quick": args.quick,
            "minutes": round((time.time() - started) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from goldstone_cli.io import atomic_write_text

    atomic_write_text(args.out.with_suffix(".json"),
                      json.dumps({"meta": meta, "summary": summary, "runs": list(tuned["runs"].values())}, indent=1))
    table = render(summary, args.tol)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(json.dumps(meta))
    print(table)


def summarize(runs: dict) -> list[dict]:
    """Per (problem, method): the best of the learning rates tried, ``runs`` keyed (problem, method, lr)."""
    grids: dict = {}
    for p, m, lr in runs:
        grids.setdefault((p, m), []).append(lr)
    summary = []
    for (p, m), g in grids.items():
        g = sorted(g)
        lr = min(g, key=lambda x: _key(runs[(p, m, x)]))
        r = runs[(p, m, lr)]
        summary.append({"problem": p, "base": m[0], "solver": m[1], "transform": m[2], "lr": lr, "grid": g,
                        "interior": g[0] < lr < g[-1], "steps": r["steps"], "steps_mean": r["steps_mean"],
                        "reached": r["reached"], "runs": len(r["steps"]), "max_final_gap": r["final_gap"],
                        "psi_rises": r["psi_rises"]})
    return summary


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
