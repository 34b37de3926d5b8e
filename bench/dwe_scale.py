"""Dynamic Word Embeddings at the paper's Google Books size (V=10,000, d=100, T=209): step time and
peak memory on generated co-occurrence counts, and the O(T) sampler (log-depth scan vs a Python loop
over T vs a dense triangular solve).

    python -m bench.dwe_scale                      # MAP, paper size, 3 Adam steps (fits 24 GB CPU RAM)
    python -m bench.dwe_scale --inference variational --device cuda
    python -m bench.dwe_scale --optimizer goldstone --k1 10   # gauge-step overhead at this size
    python -m bench.dwe_scale --sampler-only       # the scan micro-benchmark
    python -m bench.dwe_scale --V 2000 --T 100 --compare   # issue 16: new vs pre-issue-16 step, interleaved
    python -m bench.dwe_scale --V 2000 --T 100 --paths before_issue16   # peak memory of the old paths
    python -m bench.dwe_scale --memory-model       # predicted peak memory and the largest V that fits

Results are printed and written to bench/results/dwe_scale-<inference>-<device>.json.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from goldstone_cli.io import atomic_write_json
from goldstone_cli.models.memory import LOGITS_CHUNK, SAVED_PER_SIDE, SAVED_PER_SIDE_FUSED, dwe_peak_bytes
from goldstone_cli.models.dwe import (
    DynamicWordEmbeddings,
    WordCounts,
    linear_recurrence_loop,
    sample_chain,
)

RESULTS = Path(__file__).resolve().parent / "results"


def generated_counts(V: int, T: int, nnz_per_row: int, seed: int = 0) -> WordCounts:
    """Symmetric integer counts with about ``2 * nnz_per_row`` nonzeros per row and step, Zipf-like
    row weights (frequent words co-occur more), one step per year from 1800."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, V + 1) ** 0.8
    p = zipf / zipf.sum()
    mats = []
    for _ in range(T):
        rows = np.repeat(np.arange(V), nnz_per_row)
        cols = rng.choice(V, size=V * nnz_per_row, p=p)
        vals = rng.geometric(0.3, size=V * nnz_per_row).astype(np.int64)
        A = sp.csr_matrix((vals, (rows, cols)), shape=(V, V))
        mats.append((A + A.T).tocsr())
    return WordCounts(vocab=[f"w{i}" for i in range(V)], years=np.arange(1800, 1800 + T), counts=mats)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sampler(T_values=(24, 209), N: int = 1000, d: int = 100, repeats: int = 3,
                  device: torch.device = torch.device("cpu")) -> list[dict]:
    """fwd+bwd time (wall and process CPU seconds, best of ``repeats``) of one reparameterized sample
    of (T, N, d) chains, five ways."""
    out = []
    for T in T_values:
        g = torch.Generator().manual_seed(0)
        mu = torch.zeros(T, N, d, device=device, requires_grad=True)
        raw = torch.randn(T, N, d, generator=g).to(device).requires_grad_(True)
        off = (0.3 * torch.randn(T - 1, N, d, generator=g)).to(device).requires_grad_(True)
        eps = torch.randn(T, N, d, generator=g).to(device)

        def scan():  # the logdepth (Hillis-Steele) scan: the sampler before issue 16
            return sample_chain(mu, raw, off, eps, "logdepth")

        def sequential():  # one fused multiply-add per step: the CPU default since issue 16
            return sample_chain(mu, raw, off, eps, "sequential")

        def blocked():  # about 3 sqrt(3 T) whole-slab operations: the CUDA default
            return sample_chain(mu, raw, off, eps, "blocked")

        def loop():
            b = torch.nn.functional.softplus(raw)
            return mu + linear_recurrence_loop(-off / b[:-1], eps / b, reverse=True)

        def dense():  # B^T y = eps with B^T upper bidiagonal, as a dense (T, T) triangular solve per chain
            b = torch.nn.functional.softplus(raw).permute(1, 2, 0)  # (N, d, T)
            Bt = torch.diag_embed(b) + torch.diag_embed(off.permute(1, 2, 0), offset=1)  # (N, d, T, T)
            y = torch.linalg.solve_triangular(Bt, eps.permute(1, 2, 0).unsqueeze(-1), upper=True)
            return mu + y.squeeze(-1).permute(2, 0, 1)

        row = {"T": T, "N": N, "d": d, "device": str(device)}
        ref = scan().detach()
        for name, fn in (("scan", scan), ("sequential", sequential), ("blocked", blocked), ("loop", loop),
                         ("dense_solve", dense)):
            if name == "dense_solve" and (T * T * N * d * 4 > 4e9 or device.type != "cpu"):
                row[name + "_s"] = None  # the (N, d, T, T) matrices alone would exceed 4 GB
                continue
            torch.testing.assert_close(fn().detach(), ref, rtol=1e-3, atol=1e-4)
            times, cpu = [], []
            for _ in range(repeats):
                sync(mu.device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn().sum().backward()
                sync(mu.device)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            row[name + "_s"] = min(times)
            row[name + "_cpu_s"] = min(cpu)
        out.append(row)
        print(row, flush=True)
    return out


#: the model's switches of each compute path (results equal to float rounding)
PATHS = {
    # issue 16: fused chunked likelihood (one pointwise pass per logit), fused chain terms, the device's recurrence
    # the logits pass as the native C loop (goldstone_cli/kernels/dwe.c) where it builds
    "issue16": {"fused_loglik": True, "scan_method": None, "fused_prior": True, "fast_logits": True,
                "compile_logits": False, "native": True},
    # the same with PyTorch's eager logits pass (GOLDSTONE_NATIVE=0, or no C compiler)
    "issue16_torch": {"fused_loglik": True, "scan_method": None, "fused_prior": True, "fast_logits": True,
                      "compile_logits": False, "native": False},
    # the same with log-depth scans, the chain terms under autograd (the CUDA default before the seventh session)
    "issue16_logdepth": {"fused_loglik": True, "scan_method": "logdepth", "fused_prior": True, "fast_logits": True,
                         "compile_logits": False, "native": False},
    # the same with the logits pass through torch.compile (trainer.compile=true without the native loop)
    "issue16_compiled": {"fused_loglik": True, "scan_method": None, "fused_prior": True, "fast_logits": True,
                         "compile_logits": True, "native": False},
    # the first issue-16 session: fused likelihood with eager softplus / sigmoid passes, sequential
    # recurrences under autograd
    "issue16_first": {"fused_loglik": True, "scan_method": None, "fused_prior": False, "fast_logits": False,
                      "compile_logits": False, "native": False},
    # before issue 16: the (T, P, Q) logits under autograd, log-depth scans
    "before_issue16": {"fused_loglik": False, "scan_method": "logdepth", "fused_prior": False, "fast_logits": False,
                       "compile_logits": False, "native": False},
}


def set_paths(model: DynamicWordEmbeddings, paths: str) -> None:
    """The step's compute paths (:data:`PATHS`): ``issue16``, ``issue16_first`` or ``before_issue16``."""
    for k, v in PATHS[paths].items():
        setattr(model, k, v)


def memory_model(V: int, T: int, d: int, batch: int, nnz: float, variational: bool, paths: str = "issue16",
                 device: str = "cpu", chunk: int = 0, adam: str = "fused") -> dict:
    """Predicted peak memory (bytes, float32) of one training step with Adam, by component: the
    package's model (:func:`goldstone_cli.models.memory.dwe_peak_bytes`, which ``goldstone train``
    checks before making a DWE model) for each of :data:`PATHS`: ``issue16``'s fused prior saves
    :data:`SAVED_PER_SIDE_FUSED` (T, B, d) tensors per side on the CPU (else :data:`SAVED_PER_SIDE`)
    and forms the logits two blocks of ``chunk`` elements at a time; ``before_issue16`` held five
    (T, B, B) tensors (logits, log sigma(-X) and its buffer, their gradients). ``adam="foreach"``:
    the CUDA default of ``torch.optim.Adam`` before issue 16, whose update holds the square root of
    every second moment at once."""
    saved = SAVED_PER_SIDE_FUSED if paths in ("issue16", "issue16_torch", "issue16_compiled") and device == "cpu" \
        else SAVED_PER_SIDE
    chunk = chunk or LOGITS_CHUNK.get(device, LOGITS_CHUNK["cuda"])
    logits = 5 * T * batch * batch if paths == "before_issue16" else 2 * min(chunk, T * batch * batch)
    return dwe_peak_bytes(V, T, d, batch, nnz, variational, device, moments=2, itemsize=4,
                          saved_per_side=saved["variational" if variational else "map"], logits_elems=logits,
                          foreach_sqrt=adam == "foreach")


def largest_vocabulary(budget_bytes: float, T: int, d: int, batch: int, nnz_per_word_step: float, variational: bool,
                       paths: str, device: str, adam: str = "fused") -> int:
    """The largest V whose :func:`memory_model` peak fits ``budget_bytes`` (bisection)."""
    lo, hi = 1, 10_000_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m = memory_model(mid, T, d, min(batch, mid), nnz_per_word_step * mid * T, variational, paths, device, adam=adam)
        lo, hi = (mid, hi) if m["total"] <= budget_bytes else (lo, mid - 1)
    return lo


def print_memory_model(args) -> dict:
    """Predicted peaks at the paper's size and the largest V for 24 GB of CPU RAM and an 80 GB GPU."""
    nnz_pws = 73e6 / (10_000 * 209)  # stored training nonzeros per word and time step at the paper's size (measured: 73M)
    out = {}
    for inf in ("map", "variational"):
        for paths in ("before_issue16", "issue16"):
            for device, budget in (("cpu", 24e9), ("cuda", 80e9)):
                adam = "foreach" if (paths == "before_issue16" and device == "cuda") else "fused"
                m = memory_model(10_000, 209, 100, 1000, 73e6, inf == "variational", paths, device, adam=adam)
                v = largest_vocabulary(budget, 209, 100, 1000, nnz_pws, inf == "variational", paths, device, adam)
                key = f"{inf}-{paths}-{device}"
                out[key] = {"paper_size_peak_gb": m["total"] / 1e9, "largest_V": v, "budget_gb": budget / 1e9}
                print(f"{key:>32}: paper size (V=10,000, T=209, d=100) {m['total'] / 1e9:6.1f} GB "
                      f"(params + Adam {m['state'] / 1e9:.1f}, grads {m['grads'] / 1e9:.1f}, "
                      f"activations {m['activations'] / 1e9:.2f}, Adam {adam}); "
                      f"largest V in {budget / 1e9:.0f} GB: {v:,}")
    return out


def compare_steps(model: DynamicWordEmbeddings, opt, g, repeats: int, device: torch.device,
                  paths: Optional[list[str]] = None) -> dict:
    """Interleaved steps of the two compute paths on one model, optimizer and minibatch stream: wall
    and process CPU seconds, medians (CPU time counts this process's work on a loaded machine).
    ``paths``: the :data:`PATHS` to compare (default all). Then ``repeats`` consecutive steps of
    issue16 alone (``steady_wall_s``, ``median_steady_wall_s``): a training run's steady state,
    where no other path's step has just evicted its pooled buffers and caches (an interleaved
    issue16 step follows a step of the old paths, which allocate several GB)."""
    def step(paths: str) -> float:
        set_paths(model, paths)
        opt.zero_grad(set_to_none=True)
        loss = model.loss_terms(g)["total"]
        loss.backward()
        opt.step()
        sync(device)
        return loss.item()

    paths = list(PATHS) if paths is None else paths
    for p in paths:  # warm-up (Adam's state, first-use allocations)
        step(p)
    wall: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(repeats):
        for p in paths:
            t0, c0 = time.perf_counter(), time.process_time()
            step(p)
            wall[p].append(time.perf_counter() - t0)
            cpu[p].append(time.process_time() - c0)
    steady = []
    if "issue16" in paths:
        step("issue16")  # back on the new path's buffers
        for _ in range(repeats):
            t0 = time.perf_counter()
            step("issue16")
            steady.append(time.perf_counter() - t0)
    res = {"wall_s": wall, "cpu_s": cpu, "median_wall_s": {p: float(np.median(v)) for p, v in wall.items()},
           "median_cpu_s": {p: float(np.median(v)) for p, v in cpu.items()}, "steady_wall_s": steady,
           "median_steady_wall_s": float(np.median(steady)) if steady else None}
    for p in paths:  # speedups of issue16 over each earlier path
        if p != "issue16":
            sfx = "" if p == "before_issue16" else f"_vs_{p}"
            res["speedup_wall" + sfx] = res["median_wall_s"][p] / res["median_wall_s"]["issue16"]
            res["speedup_cpu" + sfx] = res["median_cpu_s"][p] / res["median_cpu_s"]["issue16"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--V", type=int, default=10_000, help="vocabulary size (paper: 10,000)")
    ap.add_argument("--d", type=int, default=100, help="embedding dimension (paper: 100)")
    ap.add_argument("--T", type=int, default=209, help="time steps (paper: 209 years)")
    ap.add_argument("--inference", choices=["map", "variational"], default="map")
    ap.add_argument("--batch", type=int, default=1000, help="words and contexts per minibatch")
    ap.add_argument("--nnz-per-row", type=int, default=20, help="generated nonzeros per row and step (before symmetrizing)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--optimizer", choices=["adam", "goldstone"], default="adam")
    ap.add_argument("--solver", choices=["procrustes", "natural"], default="procrustes")
    ap.add_argument("--k1", type=int, default=10)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--sampler-only", action="store_true", help="only the sampler micro-benchmark")
    ap.add_argument("--sampler-T", type=int, nargs="+", default=[24, 209], help="time steps of the sampler benchmark")
    ap.add_argument("--sampler-N", type=int, default=1000, help="chains (x d) of the sampler benchmark")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operations of one more gauge step")
    ap.add_argument("--paths", choices=list(PATHS), default="issue16",
                    help="compute paths of the step (PATHS): issue16 (fused chunked likelihood with one pointwise pass, "
                         "the native C loop on the CPU, fused prior, O(T) recurrences on the CPU), issue16_torch (the "
                         "same with PyTorch's eager pointwise pass), issue16_compiled (that pass compiled), "
                         "issue16_first (the first issue-16 version) or before_issue16 (materialized logits, log-depth "
                         "scans): for peak-memory runs")
    ap.add_argument("--compare", action="store_true",
                    help="time all --paths interleaved on one model (medians of --steps; wall and CPU seconds)")
    ap.add_argument("--no-compile", action="store_true",
                    help="--compare without the issue16_compiled path (no torch.compile of the logits pass)")
    ap.add_argument("--memory-model", action="store_true",
                    help="print the predicted peak memory at the paper's size and the largest V for 24 GB CPU / 80 GB GPU")
    ap.add_argument("--max-step-seconds", type=float, default=0.0,
                    help="exit 1 if the median step takes longer (a GPU session's check: e.g. 0.0257 = 3x faster than 77 ms)")
    ap.add_argument("--max-peak-gb", type=float, default=0.0,
                    help="exit 1 if the peak memory (GPU: max allocated; CPU: peak RSS) exceeds this many GB (10^9 bytes)")
    args = ap.parse_args()
    if args.memory_model:
        atomic_write_json(RESULTS / "dwe_memory_model.json", print_memory_model(args))
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    info = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if args.sampler_only:
        res = {"sampler": bench_sampler(tuple(args.sampler_T), args.sampler_N, args.d,
                                        device=device), **info}
        atomic_write_json(RESULTS / "dwe_sampler.json", res)
        return

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    wc = generated_counts(args.V, args.T, args.nnz_per_row)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = DynamicWordEmbeddings(wc, d=args.d, inference=args.inference, batch_words=args.batch,
                                  batch_contexts=args.batch, test_steps=0.1, test_mass=0.0, dtype=dtype, device=device)
    del wc
    set_paths(model, args.paths)
    t_model = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    from goldstone_cli.optim.factory import build_base

    opt = build_base("adam", model.parameters(), _AdamCfg())  # the project's Adam (fused where torch has it)
    if args.optimizer == "goldstone":
        from goldstone_cli.optim.goldstone import GoldstoneGD

        opt = GoldstoneGD(opt, model.symmetric_groups(), model.coupling, k1=args.k1, solver=args.solver)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss_terms(g)["total"]
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item()

    if args.compare:
        from bench.roofline import dwe_step_work, measure_rates

        work = dwe_step_work(args.T, args.V, args.d, model.batch_words, model.batch_contexts, model.variational)
        before = measure_rates(device)
        cmp = compare_steps(model, opt, g, args.steps, device,
                            [p for p in PATHS if not (args.no_compile and p == "issue16_compiled")
                             # the CUDA default before the seventh session: compared on a GPU only (on the
                             # CPU it doubled the run's peak RSS, to 6.1 GB, and the CPU runs of docs/ are without it)
                             and not (device.type == "cpu" and p == "issue16_logdepth")])
        after = measure_rates(device)
        rate = max(before.gemm_flops, after.gemm_flops)  # the better of the two measurements
        bw = max(before.bandwidth, after.bandwidth)
        bound = max(work.flops / rate, work.bytes / bw)
        res = {**info, "V": args.V, "d": args.d, "T": args.T, "inference": args.inference, "batch": args.batch,
               "dtype": args.dtype, "threads": torch.get_num_threads(), **cmp, "peak_rss_gb": peak_rss_gb(),
               "flops": work.flops, "bytes": work.bytes, "gemm_flops_per_s": [before.gemm_flops, after.gemm_flops],
               "bandwidth": [before.bandwidth, after.bandwidth], "bound_s": bound,
               "above_bound_wall": {p: t / bound for p, t in cmp["median_wall_s"].items()},
               "above_bound_steady": (cmp["median_steady_wall_s"] / bound
                                      if cmp["median_steady_wall_s"] is not None else None),
               "above_bound_cpu_per_thread": {p: t / torch.get_num_threads() / bound
                                              for p, t in cmp["median_cpu_s"].items()}}
        print(res, flush=True)
        atomic_write_json(RESULTS / f"dwe_compare-{args.inference}-{device.type}-V{args.V}-T{args.T}.json", res)
        return
    step()  # warm-up (allocates Adam's state)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    res = {
        **info,
        "V": args.V, "d": args.d, "T": args.T, "inference": args.inference, "batch": args.batch,
        "dtype": args.dtype, "optimizer": args.optimizer, "train_nnz": int(model.val.numel()),
        "parameters": n_params, "data_seconds": t_data, "model_seconds": t_model,
        "step_seconds_mean": float(np.mean(times)), "step_seconds": times, "losses": losses,
        "peak_rss_gb": peak_rss_gb(), "paths": args.paths,
        "step_seconds_median": float(np.median(times)),
        "memory_model_gb": memory_model(args.V, args.T, args.d, model.batch_words, int(model.val.numel()),
                                        model.variational, args.paths, device.type)["total"] / 1e9,
    }
    if args.optimizer == "goldstone":  # gauge steps timed on their own: overhead = time / (k1 steps)
        opt.gauge_step()  # the first one also builds the solver's plan / pseudo-inverse (cached)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.gauge_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        gauge_s = time.perf_counter() - t0
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                opt.gauge_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            for key in (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=18), flush=True)
                except Exception as exc:  # noqa: BLE001 (sort keys differ between torch versions)
                    print(f"profile table sorted by {key}: {exc}")
        res.update({"k1": args.k1, "solver": args.solver, "gauge_step_seconds": gauge_s,
                    "gauge_overhead_at_k1": gauge_s / (args.k1 * res["step_seconds_mean"])})
    if device.type == "cuda":
        res["cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        res["cuda_peak_gb_1e9"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(res, flush=True)
    name = f"dwe_scale-{args.inference}-{device.type}-{args.optimizer}"
    if args.paths != "issue16":
        name += f"-{args.paths}"
    if args.optimizer == "goldstone" and args.solver != "procrustes":
        name += f"-{args.solver}"
    atomic_write_json(RESULTS / f"{name}.json", res)
    peak = res.get("cuda_peak_gb_1e9", res["peak_rss_gb"] * 2 ** 30 / 1e9)
    failed = []
    if args.max_step_seconds and res["step_seconds_median"] > args.max_step_seconds:
        failed.append(f"median step {res['step_seconds_median']:.4f} s > {args.max_step_seconds} s")
    if args.max_peak_gb and peak > args.max_peak_gb:
        failed.append(f"peak memory {peak:.2f} GB > {args.max_peak_gb} GB")
    if failed:
        raise SystemExit("CHECK FAILED: " + "; ".join(failed))
    if args.max_step_seconds or args.max_peak_gb:
        print(f"CHECK PASSED: median step {res['step_seconds_median']:.4f} s, peak {peak:.2f} GB")


class _AdamCfg(dict):
    """The attributes ``factory.build_base`` reads, with torch's Adam defaults and this benchmark's lr."""

    def __init__(self):
        super().__init__(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.__dict__ = self


if __name__ == "__main__":
    main()
