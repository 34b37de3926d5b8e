"""Benchmark: the DWE step's native C loops against their PyTorch twins, one kernel at a time.

    python -m bench.dwe_kernels                  # one thread (the default), the issue-16 sizes
    python -m bench.dwe_kernels --threads 2 --repeats 20

Kernels (``goldstone_cli/kernels/dwe.c``; PyTorch versions in ``goldstone_cli/models/dwe.py``):

- ``logits``: the pointwise pass over one CPU chunk of logits (4 x 1,000 x 1,000): per-row weighted
  softplus sums and sigmoid in place (``_softplus_rows_sigmoid_native`` vs ``..._eager``);
- ``chain_fwd`` / ``chain_bwd``: the variational chain terms of one (T=100, 1,000, d=100) posterior
  whose rows are gathered from a (100, 2,000, 100) parameter (``_ChainTerms`` with ``native`` on and
  off; backward with a sample gradient and the terms' gradient);
- ``block``: the logits pass of one block together with its positive counts (70,000 entries sorted
  by row and, within a row, by column, as a minibatch block of ``bench.dwe_scale``'s generated
  counts has): log sigma(x) sum and the gradient's factor at every logit, each row's positives while
  the row is in cache (``_native_logits_block`` with row factors, what the step runs: the block
  becomes ``c_p nb_q sigmoid(x) + n sigma(-x) / (-r)``) vs the PyTorch fast path's index_select /
  logsigmoid / eager logits pass / index_add_ of ``n sigma(-x) / scale`` (which leaves the factors
  to the small operands).

Each row: median milliseconds of ``--repeats`` calls after a warm-up, the two variants interleaved,
and the time per number. Results also go to ``bench/results/dwe_kernels-<threads>t.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for f in fns.values():  # warm-up: first-use allocations, the library build
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():  # interleaved: a load change hits both alike
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def logits_case(g: torch.Generator):
    from goldstone_cli.kernels import native
    from goldstone_cli.models.dwe import _softplus_rows_sigmoid_eager, _softplus_rows_sigmoid_native

    X0 = 3.0 * torch.randn(4, 1000, 1000, generator=g)
    nb = torch.rand(4, 1000, generator=g)
    X, buf = X0.clone(), torch.empty_like(X0)
    lib = native.library()

    def c():
        X.copy_(X0)
        _softplus_rows_sigmoid_native(lib, X, nb)

    def py():
        X.copy_(X0)
        _softplus_rows_sigmoid_eager(X, nb, buf)

    copy = _median_ms({"copy": lambda: X.copy_(X0)}, 5)["copy"]  # subtracted: both variants restore X first
    return X0.numel(), {"c": c, "torch": py}, copy


def chain_cases(g: torch.Generator):
    from goldstone_cli.models.dwe import _ChainTerms

    T, R, P, d = 100, 2000, 1000, 100
    mu = torch.randn(T, P, d, generator=g)
    raw = (0.5 * torch.randn(T, R, d, generator=g) + 1.0).requires_grad_()
    off = (0.3 * torch.randn(T - 1, R, d, generator=g)).requires_grad_()
    eps = torch.randn(T, P, d, generator=g)
    rows = torch.randperm(R, generator=g)[:P].sort().values
    w = torch.full((T - 1,), 2.0)
    gx = torch.randn(T, P, d, generator=g)

    def fwd(native):
        return lambda: _ChainTerms.apply(mu, raw, off, eps, w, 1.0, rows, native)

    def bwd(native):
        def run():
            x, terms = _ChainTerms.apply(mu, raw, off, eps, w, 1.0, rows, native)
            t0 = time.perf_counter()
            torch.autograd.backward([x, terms], [gx, torch.ones_like(terms)])
            raw.grad = off.grad = None
            return time.perf_counter() - t0
        return run

    return T * P * d, fwd, bwd


def block_case(g: torch.Generator):
    from goldstone_cli.kernels import native
    from goldstone_cli.models.dwe import _native_logits_block, _softplus_rows_sigmoid_eager

    tb, pb, Q, k = 4, 1000, 1000, 70_000
    X0 = 3.0 * torch.randn(tb, pb, Q, generator=g)
    nb = torch.rand(tb, Q, generator=g)
    key = torch.randint(tb * pb, (k,), generator=g)
    pq = torch.randint(Q, (k,), generator=g)
    order = torch.argsort(key * Q + pq)  # (t, p) order, columns ascending within a row: as block_positives gives
    key, pq = key[order], pq[order]
    pt, pp = key // pb, key % pb
    n, scale = 5 * torch.rand(k, generator=g), -(torch.rand(k, generator=g) + 0.1)
    cb = 100 * torch.rand(tb, pb, generator=g)  # the rows' counts c_p
    X, buf = X0.clone(), torch.empty_like(X0)
    lib = native.library()

    def c():
        X.copy_(X0)
        return _native_logits_block(lib, X, nb, pt, pp, pq, n, None, 0, 0, cb, -1.0)  # r = 1

    def py():
        X.copy_(X0)
        flat = (pt * pb + pp) * Q + pq
        xp = X.view(-1).index_select(0, flat)
        loglik = (n * F.logsigmoid(xp)).sum(dtype=torch.float64)
        rows = _softplus_rows_sigmoid_eager(X, nb, buf)
        X.view(-1).index_add_(0, flat, n * torch.sigmoid(-xp) / scale)
        return rows, loglik

    copy = _median_ms({"copy": lambda: X.copy_(X0)}, 5)["copy"]  # subtracted: both variants restore X first
    return X0.numel(), {"c": c, "torch": py}, copy


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the C loops split over as many)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per variant (median reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from goldstone_cli.kernels import native

    if native.library() is None:
        raise SystemExit("the native loops are not available here (no C compiler, or GOLDSTONE_NATIVE=0): "
                         "nothing to compare")
    g = torch.Generator().manual_seed(0)
    rows = {}
    n, fns, copy = logits_case(g)
    rows["logits"] = (n, {k: v - copy for k, v in _median_ms(fns, args.repeats).items()})
    n, fwd, bwd = chain_cases(g)
    rows["chain_fwd"] = (n, _median_ms({"c": fwd(True), "torch": fwd(False)}, args.repeats))
    for f in (bwd(True), bwd(False)):  # warm-up
        f()
    bt: dict[str, list[float]] = {"c": [], "torch": []}
    for _ in range(args.repeats):  # backward alone (each call runs its own forward first, untimed)
        bt["c"].append(bwd(True)())
        bt["torch"].append(bwd(False)())
    rows["chain_bwd"] = (n, {k: 1e3 * statistics.median(v) for k, v in bt.items()})
    n, fns, copy = block_case(g)
    rows["block"] = (n, {k: v - copy for k, v in _median_ms(fns, args.repeats).items()})
    print(f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}")
    print(f"{'kernel':<10} {'numbers':>10} {'C ms':>9} {'torch ms':>9} {'C ns/number':>12} {'speed-up':>9}")
    for name, (num, t) in rows.items():
        print(f"{name:<10} {num:>10,} {t['c']:>9.2f} {t['torch']:>9.2f} {1e6 * t['c'] / num:>12.2f} "
              f"{t['torch'] / t['c']:>8.2f}x")
    out = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "kernels": {k: {"numbers": num, "ms": t} for k, (num, t) in rows.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"dwe_kernels-{args.threads}t.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
