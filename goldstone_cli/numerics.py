"""Reductions over millions of float32 numbers, accumulated in float64.

Why: on the CPU, ``torch.linalg.vector_norm`` and ``torch.dot`` accumulate a float32 tensor in
float32 without pairwise (cascade) summation. Once the running sum is large, small squares are
rounded away: the sum of squares of ``randn(3, 2_000_000, 30)`` came out 5.1% low with
``vector_norm`` of the whole tensor and 0.94% low with one norm per time step (psi); the
MovieLens gamma term of ML-20M-shaped parameters at their initialization was 11% low. ``torch.sum(x, dtype=torch.float64)`` is exact
enough but first materializes a float64 copy of ``x`` (measured: +460 MB peak RSS for a 228 MB
float32 tensor, and 10x slower), which a (100, 138493, 30) parameter cannot afford.

What these functions do instead: cut the flat tensor into blocks of ``BLOCK`` contiguous numbers,
take one ``vector_norm`` per block in the tensor's own dtype (a float32 sum over only ``BLOCK``
terms, relative error ~1e-9 in practice), then square and sum the ``numel / BLOCK`` block norms in
float64. No temporary as large as the input is made (only one float32 number per block), and the
speed is that of ``vector_norm`` itself. Measured on ``randn(3, 2e6, 30)``: relative error -1.1e-9
against an exact float64 sum (``bench/float64_sums.py``; docs/benchmarks.md, "float32 reductions").
A block sum is bounded by ``BLOCK`` roundings, so the relative error stays below ~6e-5 even in the
worst case and is ~1e-9 for data like these.

``torch.sum`` of a float32 tensor on the CPU already uses cascade summation (relative error 3e-8 on
6e7 uniform numbers), so plain sums elsewhere need no change; CUDA reductions are tree-shaped.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

#: numbers per float32 partial sum; the partials (numel / BLOCK of them) are summed in float64
BLOCK = 1024


def row_sum_squares(x: Tensor, block: int = BLOCK) -> Tensor:
    """``sum_j x[r, j]^2`` for every row r of a 2-D tensor, accumulated in float64: shape (rows,).

    Not differentiable (use :func:`sum_squares` in a loss). Rows may be strided views (e.g. a slice
    of ``Z.flatten(1)``); each row must be contiguous along its last dimension for the blocks to be
    views, otherwise ``reshape`` copies."""
    if x.dim() != 2:
        raise ValueError(f"row_sum_squares needs a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.detach()
    R, L = x.shape
    m = L // block
    norms = []  # float32 norms of blocks of `block` numbers (the last block may be shorter)
    if m:
        norms.append(torch.linalg.vector_norm(x[:, : m * block].reshape(R, m, block), dim=-1))  # (R, m)
    if m * block < L or not norms:
        norms.append(torch.linalg.vector_norm(x[:, m * block:], dim=-1, keepdim=True))  # (R, 1)
    n = norms[0] if len(norms) == 1 else torch.cat(norms, dim=1)
    return n.to(torch.float64).square().sum(dim=-1)


def sum_squares_value(x: Tensor, block: int = BLOCK) -> Tensor:
    """``sum x^2`` over every entry, accumulated in float64 (a float64 scalar; no autograd)."""
    return row_sum_squares(x.detach().reshape(1, -1), block)[0]


class _SumSquares(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sum_squares_value(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return x * (2.0 * grad_out).to(x.dtype)


def sum_squares(x: Tensor) -> Tensor:
    """``sum x^2`` accumulated in float64, differentiable: a float64 scalar whose gradient
    ``2 x`` has the dtype of ``x``. Keeps only ``x`` for the backward pass (no ``x ** 2`` temporary)."""
    return _SumSquares.apply(x)


def batched_gram(A: Tensor, B: Tensor, chunk: int = 1 << 12) -> Tensor:
    """``A[t]^T B[t]`` for (T, N, d) tensors A, B, summed over the N rows in float64: (T, d, d).

    Each float32 ``bmm`` sums over at most ``chunk`` rows; the partial (d, d) results are added in
    float64. Python calls: min(T, N / chunk) + 1, each one batched ``bmm`` over views (nothing is
    copied; many tiny calls cost a thread barrier each on a busy CPU). For the moments of two
    independent randn(2e6, 8) one float32 ``bmm`` was off by 3.3e-5 of the largest entry, chunks of
    4096 rows by 9.7e-7 (1024 rows: 4.8e-7, but slower)."""
    if A.shape[:2] != B.shape[:2]:
        raise ValueError(f"batched_gram needs the same (T, N) for both tensors, got {tuple(A.shape)} and {tuple(B.shape)}")
    T, N = A.shape[:2]
    dA, dB = A.shape[-1], B.shape[-1]
    out = torch.zeros(T, dA, dB, dtype=torch.float64, device=A.device)
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return out.add_(torch.bmm(A.transpose(1, 2), B))
    m = N // chunk
    if m and T <= m:
        # few time steps, many rows: per time step, the chunks of rows are the batch of one bmm
        # (a view, no copy); T calls
        for t in range(T):
            a = A[t, : m * chunk].reshape(m, chunk, dA)
            b = B[t, : m * chunk].reshape(m, chunk, dB)
            out[t] += torch.bmm(a.transpose(1, 2), b).to(torch.float64).sum(dim=0)  # (m, dA, dB) partials
    elif m:
        # many time steps: per chunk of rows, one bmm batched over the T time steps; m calls
        for j in range(m):
            s = slice(j * chunk, (j + 1) * chunk)
            out += torch.bmm(A[:, s].transpose(1, 2), B[:, s]).to(torch.float64)
    if m * chunk < N:
        out += torch.bmm(A[:, m * chunk:].transpose(1, 2), B[:, m * chunk:]).to(torch.float64)
    return out


#: torch.compile'd kernels by name (one compile per process); None where compiling is unavailable or
#: has failed (the callers then run their eager pass from then on)
COMPILED: dict[str, object] = {}


def compiled_kernel(name: str, fn, eager: str):
    """``torch.compile(fn, dynamic=True)``, made once per process and kept under ``name``; None (with
    one warning naming the ``eager`` fallback) where torch.compile is unavailable or failed before."""
    if name not in COMPILED:
        try:
            COMPILED[name] = torch.compile(fn, dynamic=True)
        except Exception as exc:  # pragma: no cover - no compiler / unsupported platform
            warnings.warn(f"torch.compile unavailable ({str(exc).splitlines()[0]}); using the eager {eager}")
            COMPILED[name] = None
    return COMPILED[name]


def run_compiled(name: str, fn, what: str, *args):
    """``fn(*args)`` compiled (:func:`compiled_kernel` under ``name``), or None where torch.compile
    is unavailable or the compiled call fails: then one warning names ``what`` and the caller's
    eager pass runs, from then on without trying again."""
    kernel = compiled_kernel(name, fn, what)
    if kernel is None:
        return None
    try:
        return kernel(*args)
    except Exception as exc:  # a compiler error: warn once, then the eager pass from now on
        warnings.warn(f"torch.compile of the {what} failed ({str(exc).splitlines()[0]}); "
                      "using the eager pass (trainer.compile=false silences this)")
        COMPILED[name] = None
        return None


def storage_unused(st) -> bool:
    """True if only the caller's reference to the untyped storage ``st`` is left (no tensor or view
    uses it); False where PyTorch's private use count is not available (then nothing is reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is not None and count(st._cdata) <= 1


class BufferPool:
    """Reusable CPU buffers for the fused passes (the DWE chain terms, dense gradients, psi's
    gradient). The pool keeps only the storages; a storage is
    handed out again once no tensor uses it any more (the autograd graph that saved it was freed,
    the sample made in it dropped, views included), so reuse is safe with ``retain_graph`` or graphs
    kept alive. Why: a fresh multi-MB tensor costs a page fault per 4 kB page on its first write
    (glibc maps large blocks anew each time): 21 ms per 40 MB against 5.5 ms for rewriting a mapped
    one (one CPU thread, measured on the 2-core machine). Bounded: ``per_key`` buffers of each of at
    most ``max_keys`` (shape, dtype) keys, the least recently used key dropped first (a variational
    DWE step uses about 7 keys and up to 16 buffers of one shape); ``train()`` clears the pool when a
    run ends."""

    def __init__(self, per_key: int = 8, max_keys: int = 4):
        self.per_key, self.max_keys = per_key, max_keys
        self.storages: dict[tuple, list] = {}  # insertion order = use order (moved to the end on use)

    def take(self, shape, dtype, device) -> Tensor:
        device = torch.device(device)
        if device.type != "cpu":  # the CUDA caching allocator has no page-fault cost
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype)
        lst = self.storages.pop(key, [])
        self.storages[key] = lst  # most recently used last
        while len(self.storages) > self.max_keys:
            del self.storages[next(iter(self.storages))]
        for st in lst:
            if storage_unused(st):
                return torch.empty(0, dtype=dtype).set_(st, 0, tuple(shape))
        t = torch.empty(shape, dtype=dtype)
        if len(lst) < self.per_key:
            lst.append(t.untyped_storage())
        return t

    def clear(self) -> None:
        self.storages.clear()


#: the pool shared by the fused passes (a variational DWE step with P = Q holds 16 buffers of its
#: (T, P, d) key at once: gathered means, samples, noise, the chain pass's saved tensors, gu / gv)
WORKSPACE = BufferPool(per_key=20, max_keys=12)
