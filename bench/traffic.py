"""Operations and bytes of one training step (Dynamic Word Embeddings, or MovieLens), counted on
the CPU: a device-independent model of a GPU step, where the eager step is a stream of kernels that
each read and write whole tensors (bandwidth-bound) and each cost a launch.

    python -m bench.traffic --V 2000 --T 209 --batch 1000                # the CUDA paths, counted here
    python -m bench.traffic --V 2000 --T 209 --batch 1000 --paths issue16_torch issue16_logdepth
    python -m bench.traffic --movielens DIR    # a full-batch MovieLens AdaGrad step (T=100, d=30) on DIR

Every ATen operation of one step (forward, backward, the optimizer) runs under a dispatch mode that
counts it and the bytes of the distinct tensors it reads or writes, twice for a tensor it reads and
writes back (in place: ``add_``'s self, the fused optimizers' parameters and moments); views are
free; ``index_select`` and ``index_add_`` count the rows they touch, ``embedding_bag`` the rows its
indices read; other indexing operations count their whole source.
With ``--as cuda`` (default) each path runs as it would on a GPU: no native C loops, the CUDA
defaults of the recurrence (``dwe.SCAN_METHOD``) and of the logits chunk (``dwe.LOGIT_CHUNK``), the
quadratic terms in the GPU's time blocks (``coupling.GPU_BLOCK_ELEMS``);
``--as cpu`` counts only what runs outside the native C loops (the dispatch mode does not see them).
Operations are grouped by their largest tensor: ``full`` (T x V x d or more: parameters, Adam, the
largest logits chunks), ``minibatch`` (T x B x d), ``logits`` (a chunk of the T x B x B logits) and
``small`` (per-step slices, the recurrences' slabs, scalars). ``--laplacian elementwise`` counts
the quadratic terms' previous GPU method (before the banded product). Results:
bench/results/dwe_traffic-<inference>-V<V>-T<T>[-<laplacian>].json.

``--movielens DIR``: the MovieLens step (``model=movielens optimizer=adagrad``, full batch) on a
MovieLens folder, against its compulsory bytes (``bench.roofline.movielens_step_work``); ``full``
there means half a parameter or more. Results: bench/results/movielens_traffic-<folder>[-<laplacian>].json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import platform
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from goldstone_cli.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
#: operations that only make views or metadata (no kernel, no traffic)
VIEWS = {"view", "as_strided", "slice", "select", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze",
         "_reshape_alias", "alias", "detach", "unbind", "split", "narrow", "diagonal", "unfold", "_unsafe_view",
         "lift_fresh", "empty", "empty_like", "empty_strided", "set_", "resize_", "resolve_conj", "resolve_neg"}


#: row gathers and row adds: counted as the rows they read (and write), not their whole source
ROW_OPS = {"index_select", "index_add_"}
#: weighted row sums (``F.embedding_bag``): the rows their indices read, not the whole weight
BAG_OPS = {"_embedding_bag_forward_only", "_embedding_bag"}


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


#: in-place operations that only write their self (no read of it: counted once)
WRITE_ONLY = {"zero_", "fill_", "copy_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
              "geometric_", "cauchy_", "log_normal_"}


def _rewritten(func, args: tuple, kwargs: dict) -> set:
    """Keys of the tensors an operation reads and writes back (in place: ``add_``'s self, the fused
    optimizers' parameters and moments), from its schema: arguments marked written that are not
    ``out=`` arguments (written only). The fused optimizers' ``grads`` are marked written (scaled in
    place under a grad scaler) but are only read without one, as here. :data:`WRITE_ONLY`
    operations (``zero_``, ``copy_``, the random fills) write their self without reading it."""
    keys = set()
    if func.overloadpacket.__name__ in WRITE_ONLY:
        return keys
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write or a.is_out or a.name == "grads":
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor):
                keys.add(_key(t))
    return keys


class StepCounter(TorchDispatchMode):
    """Counts ATen operations and the bytes of the distinct tensors each reads or writes (twice if
    read and written back: :func:`_rewritten`), grouped by
    the size class of its largest tensor (``classify(numel) -> str``)."""

    def __init__(self, classify):
        super().__init__()
        self.classify = classify
        self.ops: collections.Counter = collections.Counter()  # (class, op) -> calls
        self.bytes: collections.Counter = collections.Counter()  # (class, op) -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEWS or func.is_view:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if name in ROW_OPS and len(tensors) >= 3:  # count the rows touched, not the whole (T, N, d) source
            nb = lambda t: t.numel() * t.element_size()  # noqa: E731
            big, idx = tensors[0], tensors[1]
            small = tensors[2] if name == "index_add_" else tensors[-1]  # the added rows / the gathered ones
            k = (self.classify(big.numel()), name)
            self.ops[k] += 1
            self.bytes[k] += nb(idx) + (3 if name == "index_add_" else 2) * nb(small)
            return out
        if name in BAG_OPS:  # the weight's rows that the indices read; indices, weights, outputs whole
            weight, idx = args[0], args[1]
            rest = [t for t in tensors[1:] if t is not weight]
            k = (self.classify(weight.numel()), name)
            self.ops[k] += 1
            self.bytes[k] += (idx.numel() * weight.shape[-1] * weight.element_size()
                              + sum(t.numel() * t.element_size() for t in rest))
            return out
        seen, nbytes, largest = set(), 0, 0
        rewritten = _rewritten(func, args, kwargs or {})
        for t in tensors:
            key = _key(t)
            if key not in seen:  # an in-place operation's output is its input: seen once, ...
                seen.add(key)
                # ... and counted twice if it is read and written (a read-modify-write)
                nbytes += t.numel() * t.element_size() * (2 if key in rewritten else 1)
                largest = max(largest, t.numel())
        k = (self.classify(largest), name)
        self.ops[k] += 1
        self.bytes[k] += nbytes
        return out

    def summary(self) -> dict:
        by_class: dict = collections.defaultdict(lambda: {"ops": 0, "bytes": 0})
        for (cls, _), n in self.ops.items():
            by_class[cls]["ops"] += n
        for (cls, _), b in self.bytes.items():
            by_class[cls]["bytes"] += b
        top = [{"class": c, "op": o, "calls": self.ops[(c, o)], "bytes": b}
               for (c, o), b in self.bytes.most_common(15)]
        return {"ops": sum(self.ops.values()), "bytes": sum(self.bytes.values()), "by_class": dict(by_class),
                "top": top}


@contextlib.contextmanager
def _as_device(device_type: str, laplacian: str | None = None):
    """Run the model code as on ``device_type``: for "cuda", the native C loops off
    (GOLDSTONE_NATIVE=0), the quadratic terms in the GPU's time blocks (``coupling.GPU_BLOCK_ELEMS``
    numbers, instead of cache-sized ones) and ``gamma Z + L Z`` by the GPU's method
    (``coupling.LAPLACIAN_METHOD``, or ``laplacian`` if given); "cpu" changes nothing."""
    from goldstone_cli.optim import coupling

    if device_type == "cpu":
        yield
        return
    orig = coupling._time_block

    def gpu_block(T, L, block_elems, Z):
        if block_elems is None:
            return max(1, min(T, coupling.GPU_BLOCK_ELEMS // max(L, 1)))
        return orig(T, L, block_elems, Z)

    with mock.patch.object(coupling, "_time_block", gpu_block), \
            mock.patch.dict(coupling.LAPLACIAN_METHOD, {"cpu": laplacian or coupling.LAPLACIAN_METHOD[device_type]}), \
            mock.patch.dict("os.environ", {"GOLDSTONE_NATIVE": "0"}):
        yield


def count_dwe_step(V: int, T: int, d: int, batch: int, variational: bool, paths: list[str], as_device: str = "cuda",
                   nnz_per_row: int = 20, laplacian: str | None = None) -> dict:
    """:class:`StepCounter` summaries of one Adam step (after a warm-up step) per compute path of
    ``bench.dwe_scale.PATHS``, on one model and one minibatch stream."""
    from bench.dwe_scale import PATHS, _AdamCfg, generated_counts, set_paths
    from goldstone_cli.models import dwe
    from goldstone_cli.models.dwe import DynamicWordEmbeddings
    from goldstone_cli.optim.factory import build_base

    model = DynamicWordEmbeddings(generated_counts(V, T, nnz_per_row), d=d,
                                  inference="variational" if variational else "map", batch_words=batch,
                                  batch_contexts=batch, test_steps=0.1, test_mass=0.0)
    opt = build_base("adam", model.parameters(), _AdamCfg())
    g = torch.Generator().manual_seed(0)
    full, mb, chunk = T * V * d, T * batch * d, dwe.LOGIT_CHUNK[as_device]

    def classify(n: int) -> str:
        if n >= 0.9 * full:
            return "full"
        if n >= 0.9 * min(chunk, T * batch * batch) and n > 1.5 * mb:
            return "logits"
        return "minibatch" if n >= 0.5 * mb else "small"

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss_terms(g)["total"].backward()
        opt.step()

    out = {}
    for p in paths:
        set_paths(model, p)
        if as_device != "cpu":  # run the path as the device would
            model.native = False
            model.scan_method = PATHS[p]["scan_method"] or dwe.SCAN_METHOD[as_device]
        model.logit_chunk = chunk
        with _as_device(as_device, laplacian):
            step()  # warm-up: Adam's state, first-use allocations
            counter = StepCounter(classify)
            with counter:
                step()
        out[p] = {**counter.summary(), "scan_method": model.scan_method or dwe.SCAN_METHOD["cpu"]}
        print(f"{p}: {out[p]['ops']} operations, {out[p]['bytes'] / 1e9:.2f} GB "
              + ", ".join(f"{c} {v['bytes'] / 1e9:.2f} GB / {v['ops']} ops" for c, v in out[p]["by_class"].items()),
              flush=True)
    return out


def count_movielens_step(path: str, T: int = 100, d: int = 30, as_device: str = "cuda",
                         laplacian: str | None = None) -> dict:
    """:class:`StepCounter` summary of one full-batch AdaGrad step of ``model=movielens`` on the
    MovieLens folder ``path`` (after a warm-up step), with the compulsory bytes of
    ``bench.roofline.movielens_step_work``."""
    from bench.roofline import _adagrad_cfg, movielens_step_work
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
    from goldstone_cli.optim.factory import build_optimizer

    data = load_movielens(path, T=T, seed=0, cache_dir=str(RESULTS / "movielens" / "cache"), progress=False)
    model = SparseDynamicBernoulliMF(data, d=d, coupling=10.0, gamma=1.0, dtype=torch.float32)
    opt, _ = build_optimizer(_adagrad_cfg(), model)
    if as_device != "cpu":
        model.native = False
    half = 0.5 * min(model.U.numel(), model.V.numel())

    def step():
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        terms["total"].backward()
        opt.step()

    with _as_device(as_device, laplacian):
        step()
        counter = StepCounter(lambda n: "full" if n >= half else "small")
        with counter:
            step()
    work = movielens_step_work(T, model.n_users + model.n_items, d, model.n_train)
    out = {**counter.summary(), "compulsory_bytes": work.bytes, "train_ratings": model.n_train,
           "rows": model.n_users + model.n_items}
    print(f"movielens ({model.n_users + model.n_items} rows, {model.n_train} training ratings): {out['ops']} "
          f"operations, {out['bytes'] / 1e9:.2f} GB, {out['bytes'] / work.bytes:.2f}x the compulsory "
          f"{work.bytes / 1e9:.2f} GB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--V", type=int, default=2000, help="vocabulary size")
    ap.add_argument("--T", type=int, default=209, help="time steps (the paper's Google Books: 209)")
    ap.add_argument("--d", type=int, default=100, help="embedding dimension")
    ap.add_argument("--batch", type=int, default=1000, help="minibatch words and contexts (the paper's: 1,000)")
    ap.add_argument("--inference", choices=["variational", "map"], default="variational")
    ap.add_argument("--paths", nargs="+", default=["issue16_torch", "issue16_logdepth"],
                    help="compute paths of bench.dwe_scale.PATHS to count")
    ap.add_argument("--as", dest="as_device", choices=["cuda", "cpu"], default="cuda",
                    help="run the paths as on this device type (cuda: no C loops, the CUDA recurrence, "
                         "logits chunk and time blocks)")
    ap.add_argument("--movielens", metavar="DIR", help="count the MovieLens full-batch step on this folder instead")
    ap.add_argument("--laplacian", choices=["banded", "elementwise"],
                    help="with --as cuda: form gamma Z + L Z this way (default: coupling.LAPLACIAN_METHOD['cuda'])")
    args = ap.parse_args()
    if args.movielens:
        res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "data": args.movielens, "as": args.as_device, "laplacian": args.laplacian,
               "movielens": count_movielens_step(args.movielens, as_device=args.as_device, laplacian=args.laplacian)}
        tag = f"-{args.laplacian}" if args.laplacian else ""
        atomic_write_json(RESULTS / f"movielens_traffic-{Path(args.movielens).name}{tag}.json", res)
        return
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "V": args.V,
           "T": args.T, "d": args.d, "batch": args.batch, "inference": args.inference, "as": args.as_device,
           "laplacian": args.laplacian,
           "paths": count_dwe_step(args.V, args.T, args.d, args.batch, args.inference == "variational", args.paths,
                                   args.as_device, laplacian=args.laplacian)}
    tag = f"-{args.laplacian}" if args.laplacian else ""
    atomic_write_json(RESULTS / f"dwe_traffic-{args.inference}-V{args.V}-T{args.T}{tag}.json", res)


if __name__ == "__main__":
    main()
