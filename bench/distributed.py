"""Distributed (row-sharded) steps: time per step and bytes communicated, for 1, 2, ... ranks.

What is measured, on every rank count of ``--ranks``:

- ``gauge``: one GoldstoneGD gauge step alone (procrustes and natural) on a symmetric group of
  two (T, N, d) tensors whose N rows are split across the ranks;
- ``dense_mf``: a base step (loss, backward, Adam) of the sharded dense MF model (paper Sec. 5.1
  shape, larger);
- ``dwe``: a base step of the sharded DWE (MAP and variational, minibatches), and its gauge step;
- ``dwe_context``: the context rows' communication of one DWE step in isolation, the way the model
  does it (all-gather of the minibatch's Q context rows, reduce-scatter of their gradient) against
  gathering the whole context table (what a DTensor ``Shard(1)`` -> ``Replicate`` redistribution or
  FSDP2's parameter all-gather does).

Bytes: every collective call is recorded (all of goldstone's go through
``goldstone_cli.distributed.collective.run``, which is wrapped) with the size of its full tensor: the reduced
buffer (all_reduce), the gathered output (all_gather), the input that is reduced and scattered
(reduce_scatter). ``payload`` sums those; ``wire`` is what a ring algorithm sends per rank:
2 (w-1)/w x that size for all_reduce, (w-1)/w x for all_gather and reduce_scatter. One rank sends
nothing (the model code skips the collectives there).

Run:  python -m bench.distributed --ranks 1 2          (CPU: gloo, local processes spawned here)
      torchrun --nproc-per-node=8 -m bench.distributed --device cuda   (NCCL, one process per GPU)

Times are medians over ``--reps`` steps after a warm-up, measured on rank 0 between barriers. On a
shared 2-core machine two ranks compete for the cores with each other and with other jobs: there
the bytes are the result, the seconds only an indication.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- counting collectives
_RING = {  # wire bytes per rank of a ring algorithm, from the buffer size b and the world size w
    "all_reduce": lambda b, w: 2 * (w - 1) / w * b,
    "all_gather": lambda b, w: (w - 1) / w * b,  # b: the gathered output
    "reduce_scatter": lambda b, w: (w - 1) / w * b,  # b: the full input
    "broadcast": lambda b, w: b if w > 1 else 0,
}


class CommCounter:
    """Wraps the collectives while active; ``records`` holds (kind, payload bytes) per call."""

    def __init__(self):
        self.records: list[tuple[str, int]] = []
        self.active = True

    def add(self, kind: str, t) -> None:
        if self.active:
            ts = t if isinstance(t, (list, tuple)) else [t]
            self.records.append((kind, sum(x.numel() * x.element_size() for x in ts)))

    def summary(self, world: int, per: int = 1) -> dict:
        out = {"calls": len(self.records) / per, "payload_bytes": 0.0, "wire_bytes": 0.0, "by_kind": {}}
        for kind, b in self.records:
            wire = _RING[kind](b, world) if world > 1 else 0.0
            out["payload_bytes"] += b / per
            out["wire_bytes"] += wire / per
            k = out["by_kind"].setdefault(kind, {"calls": 0.0, "payload_bytes": 0.0})
            k["calls"] += 1 / per
            k["payload_bytes"] += b / per
        return out


@contextlib.contextmanager
def counting():
    """Record every collective of goldstone's code paths while the block runs: they all go through
    ``goldstone_cli.distributed.collective.run`` (a barrier moves no payload and is not counted)."""
    from goldstone_cli.distributed import collective

    counter = CommCounter()
    # kind and which positional argument is the full tensor: all_reduce(t), broadcast(t),
    # all_gather(list_out, local), all_gather_single(out, local), reduce_scatter_single(out, full)
    kinds = {dist.all_reduce: ("all_reduce", 0), dist.broadcast: ("broadcast", 0), dist.all_gather: ("all_gather", 0),
             collective.all_gather_single: ("all_gather", 0), collective.reduce_scatter_single: ("reduce_scatter", 1)}
    run = collective.run

    def counted(fn, /, *args, **kwargs):
        if fn in kinds:
            kind, i = kinds[fn]
            counter.add(kind, args[i])
        return run(fn, *args, **kwargs)

    collective.run = counted
    try:
        yield counter
    finally:
        collective.run = run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def timed(fn, reps: int, warmup: int, device: torch.device, world: int) -> dict:
    """Median seconds of ``fn()`` over ``reps`` calls and the collectives of one call."""
    for _ in range(warmup):
        fn()
    times = []
    with counting() as counter:
        for _ in range(reps):
            counter.active = False
            _sync(device)
            counter.active = True
            t0 = time.perf_counter()
            fn()
            counter.active = False
            _sync(device)
            times.append(time.perf_counter() - t0)
            counter.active = True
    return {"seconds": statistics.median(times), "seconds_all": times, **counter.summary(world, reps)}


# ----------------------------------------------------------------------------- the cases
def bench_gauge(shard, args, device) -> list[dict]:
    from goldstone_cli.optim import Coupling, GoldstoneGD

    T, N, d = args.gauge_T, args.gauge_N, args.gauge_d
    g = torch.Generator(device=device).manual_seed(1000 + shard.rank)  # each rank draws only its rows
    out = []
    for solver in ("procrustes", "natural"):
        tensors = []
        for _ in range(2):  # e.g. users and items, N rows each
            local = torch.randn(T, shard.local_size(N), d, generator=g, device=device)
            tensors.append(torch.nn.Parameter(local))
        opt = GoldstoneGD(torch.optim.Adam(tensors, lr=1e-3), groups=[tensors], coupling=Coupling.chain(T, 1.0),
                          k1=1, solver=solver, rotation="expm", process_group=shard.group if shard.distributed else None)
        r = timed(opt.gauge_step, args.reps, 1, device, shard.world)
        E = T - 1
        numbers = 2 + E * d * d + (T * d * d if solver == "procrustes" else 0) + 1  # + psi after
        out.append({"case": "gauge", "solver": solver, "T": T, "N": N, "d": d, "tensors": 2,
                    "formula_payload_bytes": 8 * numbers, **r})
    return out


def bench_dense_mf(shard, args, device) -> list[dict]:
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    T, n, d = args.mf_T, args.mf_n, args.mf_d
    data = make_synthetic(n, n, 3, 1e-3, T, False, 0.05, 0)
    model = DenseDynamicMF(data, d=d, coupling=10.0, dtype=torch.float32, device=device, shard=shard)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        model.loss_terms()["total"].backward()
        model.reduce_gradients()
        opt.step()

    r = timed(step, args.reps, 1, device, shard.world)
    return [{"case": "dense_mf", "T": T, "n_rows": n, "n_cols": n, "d": d,
             "formula_payload_bytes": 4 * (T * n * d + T * n * d), **r}]  # V gathered + its gradient scattered


def random_corpus(V: int, T: int, per_row: int, seed: int = 0):
    """Symmetric random co-occurrence counts, about ``per_row`` nonzeros per word and step: O(V T
    per_row) to generate (the planted corpus draws V^2 numbers per step)."""
    import numpy as np
    import scipy.sparse as sp

    from goldstone_cli.models.dwe import WordCounts

    rng = np.random.default_rng(seed)
    counts = []
    for _ in range(T):
        n = V * per_row // 2
        i, j = rng.integers(0, V, n), rng.integers(0, V, n)
        m = sp.coo_matrix((rng.integers(1, 20, n).astype(np.float64), (i, j)), shape=(V, V)).tocsr()
        counts.append((m + m.T).tocsr())
    return WordCounts(vocab=[f"w{k}" for k in range(V)], years=1800 + np.arange(T), counts=counts)


def bench_dwe(shard, args, device) -> list[dict]:
    from goldstone_cli.models.dwe_sharded import ShardedDynamicWordEmbeddings
    from goldstone_cli.optim import GoldstoneGD

    V, T, d, P = args.dwe_V, args.dwe_T, args.dwe_d, args.dwe_batch
    wc = random_corpus(V, T, per_row=50)
    out = []
    for inference in ("map", "variational"):
        model = ShardedDynamicWordEmbeddings(wc, shard=shard, d=d, inference=inference, batch_words=P,
                                             batch_contexts=P, test_steps=0.0, test_mass=0.0, dtype=torch.float32,
                                             device=device)
        opt = GoldstoneGD(torch.optim.Adam(model.parameters(), lr=1e-2), groups=model.symmetric_groups(),
                          coupling=model.coupling, k1=10 ** 9, solver="procrustes",
                          process_group=shard.group if shard.distributed else None)
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            opt.zero_grad()
            model.loss_terms(gen)["total"].backward()
            model.reduce_gradients()
            opt.step()

        r = timed(step, args.reps, 1, device, shard.world)
        out.append({"case": "dwe_step", "inference": inference, "V": V, "T": T, "d": d, "batch": P,
                    "formula_payload_bytes": 4 * 2 * T * P * d, **r})  # gathered contexts + their gradient
        if inference == "map":
            rg = timed(opt.gauge_step, max(2, args.reps // 2), 1, device, shard.world)
            out.append({"case": "dwe_gauge", "inference": inference, "V": V, "T": T, "d": d,
                        "formula_payload_bytes": 8 * (2 + (T - 1) * d * d + T * d * d + 1), **rg})
    return out


def bench_dwe_context(shard, args, device) -> list[dict]:
    """The context rows of one DWE step: the minibatch's Q rows (gather + reduce-scatter, the
    model's way) against the whole (T, V, d) table (gather + reduce-scatter of the table)."""
    from goldstone_cli.models.dwe_sharded import gather_segments

    V, T, d, Q = args.dwe_V, args.dwe_T, args.dwe_d, args.dwe_batch
    g = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(shard.take(torch.randn(T, V, d, generator=g)).to(device).contiguous())
    start, _ = shard.rows(V)
    bounds = [shard.rows(V, r)[0] for r in range(shard.world)] + [V]
    out = []

    def minibatch():
        cols = torch.randperm(V, generator=g)[:Q].sort().values
        mine = cols[(cols >= bounds[shard.rank]) & (cols < bounds[shard.rank + 1])]
        sizes = [int(((cols >= bounds[r]) & (cols < bounds[r + 1])).sum()) for r in range(shard.world)]
        v = gather_segments(table[:, (mine - start).to(device)], shard, sizes)  # (T, Q, d)
        v.square().sum().backward()
        table.grad = None

    def whole_table():
        cols = torch.randperm(V, generator=g)[:Q].sort().values
        full = shard.gather_rows(table, V)  # (T, V, d)
        full[:, cols.to(device)].square().sum().backward()
        table.grad = None

    for name, fn, formula in (("minibatch_rows", minibatch, 4 * 2 * T * Q * d),
                              ("whole_table", whole_table, 4 * 2 * T * V * d)):
        r = timed(fn, args.reps, 1, device, shard.world)
        out.append({"case": "dwe_context", "variant": name, "V": V, "T": T, "d": d, "batch": Q,
                    "formula_payload_bytes": formula, **r})
    return out


def bench_movielens(shard, args, device) -> list[dict]:
    """A full-batch base step of the sharded MovieLens model (paper settings T=100, d=30) on the
    ratings file ``--ml-data`` (skipped if it is missing)."""
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF

    path = Path(args.ml_data)
    if not path.exists():
        print(f"movielens case skipped: {path} not found (--ml-data)")
        return []
    data = load_movielens(path, T=args.ml_T, use_cache=False, progress=False)
    out = []
    # items sharded (gathered every step, gradient reduce-scattered) or replicated (gradient
    # all-reduced): the same payload 2 T n_items d b; one rank has no choice to make
    for items in (["sharded", "replicated"] if shard.distributed else ["sharded"]):
        model = SparseDynamicBernoulliMF(data, d=args.ml_d, dtype=torch.float32, device=device, shard=shard,
                                         items=items)
        opt = torch.optim.Adagrad(model.parameters(), lr=1.0)

        def step():
            opt.zero_grad()
            model.loss_terms()["total"].backward()
            model.reduce_gradients()
            opt.step()

        r = timed(step, args.reps, 1, device, shard.world)
        held = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters; AdaGrad: as many again
        out.append({"case": "movielens", "variant": f"items {items}", "T": args.ml_T, "users": int(data.n_users),
                    "items": int(data.n_items), "d": args.ml_d, "param_bytes_per_rank": held,
                    "formula_payload_bytes": 4 * 2 * args.ml_T * int(data.n_items) * args.ml_d, **r})
        del model, opt
    return out


CASES = {"gauge": bench_gauge, "dense_mf": bench_dense_mf, "dwe": bench_dwe, "dwe_context": bench_dwe_context,
         "movielens": bench_movielens}


def worker(args_dict: dict) -> list[dict]:
    """One rank: every requested case, on this process's device."""
    from goldstone_cli.distributed.shard import RowShard

    args = argparse.Namespace(**args_dict)
    if dist.is_initialized():
        shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    else:
        shard = RowShard.single()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    rows = []
    for case in args.cases:
        for r in CASES[case](shard, args, device):
            rows.append({"world": shard.world, "backend": dist.get_backend() if dist.is_initialized() else "none",
                         "device": str(device), **r})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| case | variant | ranks | ms/step | payload KiB/step | wire KiB/step/rank | formula KiB | calls |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        variant = r.get("solver") or r.get("inference") or r.get("variant") or ""
        if r["case"] in ("dwe_context", "movielens"):
            variant = r["variant"]
        lines.append(f"| {r['case']} | {variant} | {r['world']} | {1e3 * r['seconds']:.2f} | "
                     f"{r['payload_bytes'] / 1024:.1f} | {r['wire_bytes'] / 1024:.1f} | "
                     f"{r['formula_payload_bytes'] / 1024:.1f} | {r['calls']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                   help="rank counts to run as local gloo processes (ignored under torchrun)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL; launch with torchrun)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--reps", type=int, default=5, help="timed steps per case (after one warm-up)")
    p.add_argument("--gauge-T", type=int, default=50)
    p.add_argument("--gauge-N", type=int, default=20_000, help="rows per tensor of the gauge case (2 tensors)")
    p.add_argument("--gauge-d", type=int, default=16)
    p.add_argument("--mf-T", type=int, default=20)
    p.add_argument("--mf-n", type=int, default=1000, help="rows = columns of the dense MF case")
    p.add_argument("--mf-d", type=int, default=8)
    p.add_argument("--dwe-V", type=int, default=2000)
    p.add_argument("--dwe-T", type=int, default=10)
    p.add_argument("--dwe-d", type=int, default=16)
    p.add_argument("--dwe-batch", type=int, default=200, help="words = contexts per DWE minibatch")
    p.add_argument("--ml-data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens"
                                             / "ml-latest-small"), help="MovieLens ratings (file or folder)")
    p.add_argument("--ml-T", type=int, default=100)
    p.add_argument("--ml-d", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args_dict = {k: v for k, v in vars(args).items() if k not in ("out",)}
    rows: list[dict] = []
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        from goldstone_cli.distributed.env import init_distributed, shutdown

        torch.set_num_threads(args.threads)
        init_distributed(args.device)
        try:
            rows = worker(args_dict)
            is_main = dist.get_rank() == 0
        finally:
            shutdown()
        if not is_main:
            return
    else:
        from goldstone_cli.distributed.local import run_local

        torch.set_num_threads(args.threads)
        for world in args.ranks:
            if world == 1:
                rows += worker(args_dict)
            else:
                rows += run_local(worker, world, args_dict, threads=args.threads, timeout_s=1200)[0]
    print(_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
