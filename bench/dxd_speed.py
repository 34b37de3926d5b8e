"""The batched d x d linear algebra of a gauge step, timed on one device: a polar factor by SVD
(LAPACK / cuSOLVER) vs by Newton's iteration (``gauge.polar_newton``, with and without its
Newton-Schulz finish), and the largest eigenvalue of a symmetric PSD matrix by ``eigvalsh`` vs by
repeated squaring, for a batch of 208 matrices (the edges of DWE's 209 time steps) in float64,
d = 30 (MovieLens) and 100 (DWE).

cuSOLVER batches its Jacobi SVD / eigensolver only up to 32 x 32, so for d = 100 torch loops over the
batch on a GPU; this benchmark shows what that costs and what the product-only paths gain.

    python -m bench.dxd_speed --device cuda      # results in bench/results/dxd_speed-<device>.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from goldstone_cli.io import atomic_write_json
from goldstone_cli.optim import gauge as G

RESULTS = Path(__file__).resolve().parent / "results"


def moments(batch: int, d: int, cond: float | None, device, gen: torch.Generator) -> torch.Tensor:
    """Pair moments like M_t,t+1 = Z_t^T Z_t+1 of slightly rotated neighbours; with ``cond`` the
    singular values are spread over [1/cond, 1] (ill-conditioned, e.g. weakly determined directions)."""
    Z = torch.randn(batch, 4 * d, d, generator=gen, dtype=torch.float64)
    Q = torch.linalg.matrix_exp(G.skew(0.05 * torch.randn(batch, d, d, generator=gen, dtype=torch.float64)))
    M = Z.transpose(1, 2) @ (Z @ Q + 0.1 * torch.randn(Z.shape, generator=gen, dtype=torch.float64))
    if cond is not None:
        U, _, Vh = torch.linalg.svd(M)
        M = U @ torch.diag_embed(torch.logspace(0, -torch.tensor(cond).log10().item(), d, dtype=torch.float64).expand(batch, d)) @ Vh
    return M.to(device)


def timed(fn, device, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--batch", type=int, default=208, help="matrices per batch (DWE: 208 edges)")
    ap.add_argument("--dims", type=int, nargs="+", default=[30, 100], help="matrix sizes d")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d in args.dims:
        for cond in (None, 1e10):
            M = moments(args.batch, d, cond, device, gen)
            P = M.transpose(1, 2) @ M
            U, _, Vh = torch.linalg.svd(M)
            Q_newton, ok = G.polar_newton(M)
            lam = torch.linalg.eigvalsh(P)[:, -1]
            row = {
                "d": d, "condition": cond or float(torch.linalg.cond(M).max()),
                "svd_polar": timed(lambda: torch.linalg.svd(M), device, args.repeats),
                "newton_polar": timed(lambda: G.polar_newton(M), device, args.repeats),
                "newton_only_polar": timed(lambda: G.polar_newton(M, schulz=False), device, args.repeats),
                "eigvalsh": timed(lambda: torch.linalg.eigvalsh(P), device, args.repeats),
                "squaring_eig": timed(lambda: G._largest_eigenvalue_psd(P), device, args.repeats),
                "newton_converged": bool(ok.all()),
                "objective_gap": float(((U @ Vh - Q_newton) * M).sum((1, 2)).abs().max()),
                "eig_rel_err": float(((G._largest_eigenvalue_psd(P) - lam) / lam).abs().max()),
            }
            print({k: (f"{v['median_ms']:.2f} ms" if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    info = {"device": str(device), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "batch": args.batch}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    atomic_write_json(RESULTS / f"dxd_speed-{device.type}.json", {**info, "rows": rows})


if __name__ == "__main__":
    main()
