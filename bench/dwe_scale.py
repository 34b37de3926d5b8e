"""Dynamic Word Embeddings at the paper's Google Books size (V=10,000, d=100, T=209): step time and
peak memory on generated co-occurrence counts, and the O(T) sampler (log-depth scan vs a Python loop
over T vs a dense triangular solve).

    python -m bench.dwe_scale                      # MAP, paper size, 3 Adam steps (fits 24 GB CPU RAM)
    python -m bench.dwe_scale --inference variational --device cuda
    python -m bench.dwe_scale --optimizer goldstone --k1 10   # gauge-step overhead at this size
    python -m bench.dwe_scale --sampler-only       # the scan micro-benchmark

Results are printed and written to bench/results/dwe_scale-<inference>-<device>.json.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from goldstone_cli.io import atomic_write_json
from goldstone_cli.models.dwe import (
    DynamicWordEmbeddings,
    WordCounts,
    linear_recurrence_loop,
    linear_scan,
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


def bench_sampler(T_values=(24, 209), N: int = 1000, d: int = 100, repeats: int = 3) -> list[dict]:
    """fwd+bwd time of one reparameterized sample of (T, N, d) chains, three ways."""
    out = []
    for T in T_values:
        g = torch.Generator().manual_seed(0)
        mu = torch.zeros(T, N, d, requires_grad=True)
        raw = torch.randn(T, N, d, generator=g).requires_grad_(True)
        off = (0.3 * torch.randn(T - 1, N, d, generator=g)).requires_grad_(True)
        eps = torch.randn(T, N, d, generator=g)

        def scan():
            return sample_chain(mu, raw, off, eps)

        def loop():
            b = torch.nn.functional.softplus(raw)
            return mu + linear_recurrence_loop(-off / b[:-1], eps / b, reverse=True)

        def dense():  # B^T y = eps with B^T upper bidiagonal, as a dense (T, T) triangular solve per chain
            b = torch.nn.functional.softplus(raw).permute(1, 2, 0)  # (N, d, T)
            Bt = torch.diag_embed(b) + torch.diag_embed(off.permute(1, 2, 0), offset=1)  # (N, d, T, T)
            y = torch.linalg.solve_triangular(Bt, eps.permute(1, 2, 0).unsqueeze(-1), upper=True)
            return mu + y.squeeze(-1).permute(2, 0, 1)

        row = {"T": T, "N": N, "d": d}
        ref = scan().detach()
        for name, fn in (("scan", scan), ("loop", loop), ("dense_solve", dense)):
            if name == "dense_solve" and T * T * N * d * 4 > 4e9:
                row[name + "_s"] = None  # the (N, d, T, T) matrices alone would exceed 4 GB
                continue
            torch.testing.assert_close(fn().detach(), ref, rtol=1e-3, atol=1e-4)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn().sum().backward()
                times.append(time.perf_counter() - t0)
            row[name + "_s"] = min(times)
        out.append(row)
        print(row, flush=True)
    return out


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
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operations of one more gauge step")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    info = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if args.sampler_only:
        res = {"sampler": bench_sampler(), **info}
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
    t_model = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
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
        "peak_rss_gb": peak_rss_gb(),
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
    print(res, flush=True)
    name = f"dwe_scale-{args.inference}-{device.type}-{args.optimizer}"
    if args.optimizer == "goldstone" and args.solver != "procrustes":
        name += f"-{args.solver}"
    atomic_write_json(RESULTS / f"{name}.json", res)


if __name__ == "__main__":
    main()
