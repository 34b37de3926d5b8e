"""Benchmark: accuracy and cost of the float64-accumulated reductions (goldstone_cli/numerics.py).

    python -m bench.float64_sums --data ../shared/data/movielens/ml-latest-small --steps 6
    python -m bench.float64_sums --data ../shared/data/movielens/ml-latest-small --full-size   # + ML-20M-shaped U, V

1. Accuracy: the sum of squares of ``randn(3, N, 30)`` (float32) by the old reductions (one float32
   ``vector_norm`` of the whole tensor; one per time step, as psi did) and by
   ``numerics.sum_squares_value``, against an exact float64 sum (math.fsum of float64 chunks); the
   pair moments by one float32 ``bmm`` and by ``numerics.batched_gram``. Times of each.
2. Step time, interleaved in one process: the MovieLens model at paper settings (T=100, d=30,
   lambda=10, gamma=1) on the given data; each round times one full-batch AdaGrad step (loss,
   backward, update) and one natural gauge step with the old reductions patched back in, and the
   same with the new ones (the order alternates between rounds). Also the loss at step 0 under
   both, against the same model in float64.
3. ``--full-size``: U (100, 138493, 30) and V (100, 26744, 30) drawn like the model's initialization
   (ML-20M's shape, 1.98 GB): the gamma term ``||U||^2 + ||V||^2`` and psi, old vs new vs float64.

Results are printed and written to ``bench/results/float64_sums.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch

from bench.movielens_step import RESULTS, machine, peak_rss_gb


# ----------------------------------------------------------------------------- the old reductions
def old_sum_squares_value(x):  # main before issue 12: one float32 vector_norm over the whole tensor
    return torch.linalg.vector_norm(x.detach()).to(torch.float64) ** 2


def old_row_sum_squares(x):  # psi before issue 12: one float32 vector_norm per time step
    return torch.linalg.vector_norm(x.detach(), dim=1).square().to(torch.float64)


def old_batched_gram(A, B, chunk=None):  # pair moments before issue 12: one float32 bmm over all rows
    return torch.bmm(A.transpose(1, 2), B).to(torch.float64)


@contextlib.contextmanager
def old_reductions():
    import goldstone_cli.models.movielens as ml
    import goldstone_cli.optim.coupling as cp
    import goldstone_cli.optim.goldstone as gs

    saved = (ml.sum_squares_value, cp.row_sum_squares, cp.batched_gram, gs.sum_squares_value)
    ml.sum_squares_value, cp.row_sum_squares, cp.batched_gram, gs.sum_squares_value = (
        old_sum_squares_value, old_row_sum_squares, old_batched_gram, old_sum_squares_value)
    try:
        yield
    finally:
        ml.sum_squares_value, cp.row_sum_squares, cp.batched_gram, gs.sum_squares_value = saved


def exact_sum_sq(x, chunk: int = 1 << 22) -> float:
    flat = x.reshape(-1)
    return math.fsum(float(flat[s:s + chunk].double().square().sum()) for s in range(0, flat.numel(), chunk))


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- 1. accuracy
def accuracy(rows: int) -> dict:
    from goldstone_cli.numerics import batched_gram, row_sum_squares, sum_squares_value

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(3, rows, 30, generator=g)
    ref = exact_sum_sq(Z)
    ref_t = sum(exact_sum_sq(Z[t]) for t in range(3))
    out = {"shape": list(Z.shape)}
    for name, f, r in (("vector_norm whole (old gamma term, Eq. 17)", lambda: old_sum_squares_value(Z), ref),
                       ("vector_norm per time step (old psi)", lambda: old_row_sum_squares(Z.flatten(1)).sum(), ref_t),
                       ("numerics.sum_squares_value", lambda: sum_squares_value(Z), ref),
                       ("numerics.row_sum_squares", lambda: row_sum_squares(Z.flatten(1)).sum(), ref_t)):
        v, s = timed(f)
        out[name] = {"rel_error": (float(v) - r) / r, "ms": 1e3 * s}
    k = 8
    A, B = Z[:-1, :, :k], Z[1:, :, :k]
    ref_m = torch.stack([sum(A[t, s:s + (1 << 20)].double().T @ B[t, s:s + (1 << 20)].double()
                             for s in range(0, rows, 1 << 20)) for t in range(2)])
    for name, f in (("pair moments, one float32 bmm (old)", lambda: old_batched_gram(A, B)),
                    ("pair moments, numerics.batched_gram", lambda: batched_gram(A, B))):
        v, s = timed(f)
        out[name] = {"max_error_over_max_entry": float((v - ref_m).abs().max() / ref_m.abs().max()), "ms": 1e3 * s}
    return out


# ----------------------------------------------------------------------------- 2. step time
def steptime(data_path: str, steps: int, cache_dir: str | None) -> dict:
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
    from goldstone_cli.optim.goldstone import GoldstoneGD

    data = load_movielens(data_path, T=100, seed=0, cache_dir=cache_dir, progress=False)
    model = SparseDynamicBernoulliMF(data, d=30, coupling=10.0, gamma=1.0, dtype=torch.float32)
    m64 = SparseDynamicBernoulliMF(data, d=30, coupling=10.0, gamma=1.0, dtype=torch.float64)
    with torch.no_grad():
        ref = {k: float(v) for k, v in m64.loss_terms().items()}
        new = {k: float(v) for k, v in model.loss_terms().items()}
        with old_reductions():
            old = {k: float(v) for k, v in model.loss_terms().items()}
    del m64
    opt = GoldstoneGD(torch.optim.Adagrad(model.parameters(), lr=1.0), model.symmetric_groups(), model.coupling,
                      k1=100, solver="natural", k2=10, rotation="expm")
    times = {"old": {"step": [], "gauge": []}, "new": {"step": [], "gauge": []}}

    def one(mode: str) -> None:
        ctx = old_reductions() if mode == "old" else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model.loss_terms()["total"].backward()
            opt.base.step()
            times[mode]["step"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            opt.gauge_step()
            times[mode]["gauge"].append(time.perf_counter() - t0)

    one("new")  # warm-up (not counted)
    times = {"old": {"step": [], "gauge": []}, "new": {"step": [], "gauge": []}}
    for i in range(steps):
        for mode in (("old", "new") if i % 2 == 0 else ("new", "old")):
            one(mode)
        print(f"round {i}: " + ", ".join(f"{m} step {times[m]['step'][-1]:.3f} s gauge {times[m]['gauge'][-1]:.3f} s"
                                         for m in ("old", "new")), flush=True)
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    return {
        "data": data_path, "ratings": len(data), "T": 100, "d": 30, "rows": 100 * (data.n_users + data.n_items),
        "loss_step0": {"float64": ref, "float32_old": old, "float32_new": new,
                       "rel_error_old": {k: (old[k] - ref[k]) / ref[k] for k in ref},
                       "rel_error_new": {k: (new[k] - ref[k]) / ref[k] for k in ref}},
        "times_s": times, "median_s": med,
        "step_ratio_new_over_old": med["new"]["step"] / med["old"]["step"],
        "gauge_ratio_new_over_old": med["new"]["gauge"] / med["old"]["gauge"],
    }


# ----------------------------------------------------------------------------- 3. full size
def full_size() -> dict:
    """ML-20M-shaped U, V (1.98 GB): the gamma term and psi, old vs new vs float64. psi is summed over
    windows of 10 time steps (overlapping by one), so its (T, N, d) difference temporary stays small."""
    import goldstone_cli.optim.coupling as cp
    from goldstone_cli.numerics import sum_squares_value

    g = torch.Generator().manual_seed(0)
    U = 0.1 * torch.randn(100, 138_493, 30, generator=g)  # the model's initialization at ML-20M's shape
    V = 0.1 * torch.randn(100, 26_744, 30, generator=g)
    ref = exact_sum_sq(U) + exact_sum_sq(V)
    old = float(old_sum_squares_value(U) + old_sum_squares_value(V))
    new = float(sum_squares_value(U) + sum_squares_value(V))

    def psi(row_sum_squares) -> float:
        saved, cp.row_sum_squares = cp.row_sum_squares, row_sum_squares
        try:
            total = 0.0
            for a in range(0, 99, 9):  # windows [a, a + 9] share their end points
                b = min(a + 10, 100)
                c = cp.Coupling.chain(b - a, 10.0)
                total += sum(float(c.psi_value(Z[a:b])) for Z in (U, V))
            return total
        finally:
            cp.row_sum_squares = saved

    psi_new, psi_old = psi(cp.row_sum_squares), psi(old_row_sum_squares)
    ref_psi = 0.5 * 10.0 * sum(exact_sum_sq(Z[t + 1] - Z[t]) for Z in (U, V) for t in range(99))
    return {"gamma_term_sum_sq": {"float64": ref, "rel_error_old": (old - ref) / ref, "rel_error_new": (new - ref) / ref},
            "psi": {"float64": ref_psi, "rel_error_old": (psi_old - ref_psi) / ref_psi,
                    "rel_error_new": (psi_new - ref_psi) / ref_psi}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MovieLens folder or ratings file for the step-time part")
    p.add_argument("--steps", type=int, default=6, help="interleaved rounds (each: old and new, step + gauge step)")
    p.add_argument("--rows", type=int, default=2_000_000, help="N of the randn(3, N, 30) accuracy test")
    p.add_argument("--cache-dir", default=None, help="processed-array cache of the MovieLens loader")
    p.add_argument("--full-size", action="store_true", help="also ML-20M-shaped U, V (1.98 GB, ~2.5 GB peak)")
    args = p.parse_args()
    res = {"accuracy": accuracy(args.rows)}
    print(json.dumps(res["accuracy"], indent=1), flush=True)
    res["steptime"] = steptime(args.data, args.steps, args.cache_dir)
    if args.full_size:
        res["full_size"] = full_size()
    res.update({"machine": machine(), "torch": torch.__version__, "peak_rss_gb": peak_rss_gb(),
                "command": "python -m bench.float64_sums " + " ".join(f"{k}={v}" for k, v in vars(args).items())})
    from goldstone_cli.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "float64_sums.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "accuracy"}, indent=1, default=str))
    print(f"wrote {RESULTS / 'float64_sums.json'}")


if __name__ == "__main__":
    main()
