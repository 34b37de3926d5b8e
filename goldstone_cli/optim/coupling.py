"""The symmetry-breaking coupling psi over time steps (paper Eq. 3, DESIGN.md §1-2).

    psi(Z) = 1/2 sum_{t,t'} Lap[t,t'] <Z_t, Z_t'> = 1/2 sum_{edges (t,t')} w_tt' ||Z_t - Z_t'||^2

``Lap = Deg - A`` is the Laplacian of a sparse weighted graph over the T time steps. Tensors of a
symmetric group have shape ``(T, N, d)``; a rotation acts as ``Z_t <- Z_t @ R_t.T``.

Edges are stored grouped by their *offset* ``o = t' - t > 0``: for each distinct offset one dense
weight vector ``w_o`` of length ``T - o`` (zero where there is no edge). A chain has the single
offset 1, so every operation is a handful of slice operations over the whole tensor: no Python loop
over time steps or rows. A general graph costs one such pass per distinct offset.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from goldstone_cli.kernels import native as native_loops
from goldstone_cli.numerics import COMPILED, WORKSPACE, batched_gram, row_sum_squares, run_compiled


@dataclass(frozen=True)
class _Band:
    offset: int
    weight: Tensor  # (T - offset,), weight of edge (t, t + offset); 0 where absent


class Coupling:
    """Undirected weighted graph over T time steps, with the operations the models and the gauge
    solvers need: ``psi``, ``L @ Z``, the pair moments ``M_tt'`` (Eq. 15) and the Laplacian."""

    def __init__(self, T: int, src: Sequence[int], dst: Sequence[int], weight: Sequence[float]):
        src_a = np.asarray(src, dtype=np.int64).reshape(-1)
        dst_a = np.asarray(dst, dtype=np.int64).reshape(-1)
        w_a = np.asarray(weight, dtype=np.float64).reshape(-1)
        if T < 1:
            raise ValueError(f"a coupling needs at least one time step, got T={T}")
        if not (len(src_a) == len(dst_a) == len(w_a)):
            raise ValueError("src, dst and weight must have the same length")
        if len(src_a) and (src_a.min() < 0 or dst_a.min() < 0 or max(src_a.max(), dst_a.max()) >= T):
            raise ValueError(f"edge endpoints must lie in [0, {T - 1}]")
        if np.any(src_a == dst_a):
            raise ValueError("self-loops do not couple anything; remove edges with src == dst")
        if np.any(~np.isfinite(w_a)) or np.any(w_a < 0):
            raise ValueError("coupling weights must be finite and non-negative")
        lo, hi = np.minimum(src_a, dst_a), np.maximum(src_a, dst_a)
        keep = w_a > 0
        lo, hi, w_a = lo[keep], hi[keep], w_a[keep]
        # merge duplicate edges by summing their weights
        key = lo * T + hi
        uniq, inv = np.unique(key, return_inverse=True)
        w_sum = np.zeros(len(uniq))
        np.add.at(w_sum, inv, w_a)
        self.T = int(T)
        self.src = (uniq // T).astype(np.int64)  # (E,), src < dst
        self.dst = (uniq % T).astype(np.int64)  # (E,)
        self.weight = w_sum  # (E,) float64
        self._bands_cache: dict[tuple, object] = {}  # per (dtype, device): bands, degrees

    # ------------------------------------------------------------------ constructors
    @classmethod
    def chain(cls, T: int, weight: float | Sequence[float] | Tensor) -> "Coupling":
        """Chain t - t+1 with a uniform weight ``lambda`` (Eq. 7) or per-edge weights (length T-1)."""
        w = np.asarray(weight.cpu() if isinstance(weight, Tensor) else weight, dtype=np.float64)
        if w.ndim == 0:
            w = np.full(max(T - 1, 0), float(w))
        if w.shape != (max(T - 1, 0),):
            raise ValueError(f"a chain over T={T} steps needs {T - 1} edge weights, got {w.shape[0]}")
        idx = np.arange(T - 1)
        return cls(T, idx, idx + 1, w)

    @classmethod
    def from_adjacency(cls, A) -> "Coupling":
        """From a symmetric (T, T) adjacency matrix: numpy, torch or scipy.sparse."""
        try:
            import scipy.sparse as sp
        except ImportError:  # pragma: no cover - scipy is a dependency
            sp = None
        if sp is not None and sp.issparse(A):
            A = sp.coo_matrix(A)
            T = A.shape[0]
            rows, cols, vals = A.row, A.col, A.data
            dense_check = sp.csr_matrix(A)
            if A.shape[0] != A.shape[1] or abs(dense_check - dense_check.T).max() > 1e-12 * (abs(vals).max() if len(vals) else 1):
                raise ValueError("the adjacency matrix must be square and symmetric")
        else:
            A = np.asarray(A.cpu() if isinstance(A, Tensor) else A, dtype=np.float64)
            if A.ndim != 2 or A.shape[0] != A.shape[1]:
                raise ValueError(f"the adjacency matrix must be square, got shape {A.shape}")
            if not np.allclose(A, A.T):
                raise ValueError("the adjacency matrix must be symmetric")
            T = A.shape[0]
            rows, cols = np.nonzero(A)
            vals = A[rows, cols]
        upper = rows < cols
        return cls(T, rows[upper], cols[upper], vals[upper])

    # ------------------------------------------------------------------ structure
    @property
    def num_edges(self) -> int:
        return len(self.src)

    def is_chain(self) -> bool:
        return self.num_edges == self.T - 1 and bool(np.all(self.dst - self.src == 1))

    def is_forest(self) -> bool:
        """True if the graph has no cycle (union-find over the edges)."""
        parent = list(range(self.T))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, b in zip(self.src.tolist(), self.dst.tolist()):
            ra, rb = find(a), find(b)
            if ra == rb:
                return False
            parent[ra] = rb
        return True

    def is_connected(self) -> bool:
        lap = self.laplacian(torch.float64)
        return self.T == 1 or bool(torch.linalg.eigvalsh(lap)[1] > 1e-10 * lap.diagonal().max())

    def degree(self) -> np.ndarray:
        deg = np.zeros(self.T)
        np.add.at(deg, self.src, self.weight)
        np.add.at(deg, self.dst, self.weight)
        return deg

    def laplacian(self, dtype=torch.float64, device=None) -> Tensor:
        """Dense (T, T) Laplacian ``Deg - A`` (T is small: time steps, not rows)."""
        A = np.zeros((self.T, self.T))
        A[self.src, self.dst] = self.weight
        A[self.dst, self.src] = self.weight
        return torch.as_tensor(np.diag(A.sum(1)) - A, dtype=dtype, device=device)

    def laplacian_pinv(self, dtype=torch.float64, device=None) -> Tensor:
        """Moore-Penrose pseudo-inverse of the Laplacian: eigendecomposition with the (near-)zero
        eigenvalues of the connected components left at zero (paper, below Eq. 16)."""
        lap = self.laplacian(torch.float64)
        evals, evecs = torch.linalg.eigh(lap)
        tol = max(self.T, 1) * torch.finfo(torch.float64).eps * max(float(evals.abs().max()), 1.0) * 10
        inv = torch.where(evals > tol, 1.0 / evals, torch.zeros_like(evals))
        return ((evecs * inv) @ evecs.T).to(dtype=dtype, device=device)

    def _degree_tensor(self, dtype, device) -> Tensor:
        key = ("degree", dtype, str(device))
        if key not in self._bands_cache:
            self._bands_cache[key] = torch.as_tensor(self.degree(), dtype=dtype, device=device)
        return self._bands_cache[key]

    def bands(self, dtype=torch.float64, device=None) -> list[_Band]:
        key = (dtype, str(device))
        if key not in self._bands_cache:
            offsets = self.dst - self.src
            bands = []
            for o in np.unique(offsets).tolist():
                sel = offsets == o
                w = np.zeros(self.T - o)
                w[self.src[sel]] = self.weight[sel]
                bands.append(_Band(int(o), torch.as_tensor(w, dtype=dtype, device=device)))
            self._bands_cache[key] = bands
        return self._bands_cache[key]

    # ------------------------------------------------------------------ operations on (T, N, d)
    def psi(self, tensors: Sequence[Tensor] | Tensor, value_dtype: Optional[torch.dtype] = None) -> Tensor:
        """psi (Eq. 3 / Eq. 6) summed over the tensors of a group; differentiable.

        The value is computed without keeping any (T, N, d) temporary alive for the backward pass;
        the gradient is ``L @ Z`` (one pass per offset, in place). Each tensor's psi is a float64 sum,
        returned in ``value_dtype`` (default the tensor's dtype; ``torch.float64`` keeps it whole, e.g.
        for a reported loss: the gradients are the same bit for bit, the incoming scalar gradient being
        rounded to the tensor's dtype)."""
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        total = None
        for Z in tensors:
            v = _Psi.apply(Z, self, value_dtype)
            total = v if total is None else total + v
        return total

    def psi_value(self, tensors: Sequence[Tensor] | Tensor) -> Tensor:
        """psi without autograd (for diagnostics)."""
        with torch.no_grad():
            return self.psi(tensors).detach()

    def laplacian_apply(self, Z: Tensor) -> Tensor:
        """``(L @ Z)[t] = Deg[t] Z_t - sum_t' A[t,t'] Z_t'`` for Z of shape (T, ...); the gradient of psi."""
        self._check(Z)
        if Z.dim() >= 2 and _banded_applies(Z):  # a GPU: one batched product (Z read once, out written once)
            out = torch.empty_like(Z, memory_format=torch.contiguous_format)
            banded_laplacian_(Z.reshape(self.T, -1), self, 0.0, out.view(self.T, -1))
            return out
        shape = (-1,) + (1,) * (Z.dim() - 1)
        out = Z * self._degree_tensor(Z.dtype, Z.device).view(shape)
        for band in self.bands(Z.dtype, Z.device):
            o, w = band.offset, band.weight.view(shape)
            out[:-o].addcmul_(w, Z[o:], value=-1.0)
            out[o:].addcmul_(w, Z[:-o], value=-1.0)
        return out

    def pair_moments(self, tensors: Sequence[Tensor] | Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``M_tt' = sum_k Z_k[t]^T Z_k[t']`` (Eq. 15) for every edge (src[e], dst[e]): shape (E, d, d).

        With rows as embedding vectors, ``M[e] = sum_i z_src,i z_dst,i^T``. Cost O(T N d^2) per offset.
        The sums over rows accumulate in float64 (``numerics.batched_gram``); the result has ``dtype``
        (default: the tensors' dtype)."""
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        Z0 = tensors[0]
        d = Z0.shape[-1]
        out = torch.zeros(self.num_edges, d, d, dtype=torch.float64, device=Z0.device)
        offsets = self.dst - self.src
        for band in self.bands(Z0.dtype, Z0.device):
            o = band.offset
            m = None
            for Z in tensors:
                self._check(Z)
                # (T-o, d, N) @ (T-o, N, d) -> (T-o, d, d); entry t is Z_t^T Z_{t+o}
                mz = batched_gram(Z[:-o], Z[o:])
                m = mz if m is None else m + mz
            edges = np.nonzero(offsets == o)[0]
            out[torch.as_tensor(edges, device=out.device)] = m[torch.as_tensor(self.src[edges], device=out.device)]
        return out.to(Z0.dtype if dtype is None else dtype)

    def self_moments(self, tensors: Sequence[Tensor] | Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``M_tt = sum_k Z_k[t]^T Z_k[t]``: shape (T, d, d), summed over rows in float64, returned in
        ``dtype`` (default: the tensors' dtype)."""
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        m = None
        for Z in tensors:
            self._check(Z)
            mz = batched_gram(Z, Z)
            m = mz if m is None else m + mz
        return m.to(tensors[0].dtype if dtype is None else dtype)

    def edge_weights(self, dtype=torch.float64, device=None) -> Tensor:
        return torch.as_tensor(self.weight, dtype=dtype, device=device)

    def edge_index(self, device=None) -> tuple[Tensor, Tensor]:
        return (torch.as_tensor(self.src, device=device), torch.as_tensor(self.dst, device=device))

    def _check(self, Z: Tensor) -> None:
        if Z.shape[0] != self.T:
            raise ValueError(f"expected a tensor with T={self.T} time steps first, got shape {tuple(Z.shape)}")

    def __repr__(self) -> str:
        kind = "chain" if self.is_chain() else "graph"
        return f"Coupling({kind}, T={self.T}, edges={self.num_edges})"


#: elements of one time block of the fused passes below: a few such blocks stay in the CPU caches
FUSED_BLOCK_ELEMS = 1 << 22
#: the same on a GPU: large (few kernel launches) but bounded, so a gauge step's temporaries stay small
GPU_BLOCK_ELEMS = 1 << 26


#: how ``gamma Z + L Z`` is formed where neither the native loop nor a compiled kernel runs, per device
#: type: "banded" (:func:`banded_laplacian_`: one batched matrix product over blocks of time steps,
#: Z read about once and ``out`` written once) or "elementwise" (per band a product and two
#: multiply-adds in cache-sized time blocks: about 8 passes over memory on a GPU, where no cache
#: holds a block, but cache-resident on the CPU). Devices not listed use "elementwise".
LAPLACIAN_METHOD = {"cpu": "elementwise", "cuda": "banded"}
#: time steps per block of the banded product (at least twice the largest edge offset)
BANDED_ROWS = 32


def _banded_applies(Z: Tensor) -> bool:
    """True where :func:`quadratic_terms_` and :meth:`Coupling.laplacian_apply` use the banded
    product for Z: its device's :data:`LAPLACIAN_METHOD`, a contiguous Z, no autograd through it."""
    return (LAPLACIAN_METHOD.get(Z.device.type, "elementwise") == "banded" and Z.is_contiguous()
            and not (Z.requires_grad and torch.is_grad_enabled()))


@dataclass(frozen=True)
class _BandedBlocks:
    """The Laplacian cut into blocks of ``rows`` time steps (see :func:`banded_laplacian_`)."""

    rows: int  # b: time steps per middle block
    halo: int  # h: the largest edge offset (columns each block needs on either side)
    parts: tuple  # ((r0, r1, c0, c1, Lap[r0:r1, c0:c1], I[r0:r1, c0:c1]), ...): the first and last rows
    mid: Tensor | None  # (M, b, b + 2h): rows [m b, (m+1) b), columns [m b - h, (m+1) b + h), m = 1..M
    mid_eye: Tensor | None  # the identity's entries at the same places (gamma is added through it)


def _banded_blocks(coupling: "Coupling", dtype: torch.dtype, device, rows: int = BANDED_ROWS) -> _BandedBlocks:
    """:class:`_BandedBlocks` of ``coupling``, made once per dtype and device (T x T numbers)."""
    key = ("banded", dtype, str(device), rows)
    cache = coupling._bands_cache
    if key not in cache:
        T = coupling.T
        lap = coupling.laplacian(torch.float64)
        eye = torch.eye(T, dtype=torch.float64)
        h = int((coupling.dst - coupling.src).max()) if coupling.num_edges else 0
        b = max(rows, 2 * h)
        M = (T - h) // b - 1  # middle blocks end at (M + 1) b + h <= T
        conv = lambda a: a.to(dtype=dtype, device=device).contiguous()  # noqa: E731
        if M < 1:  # short T or long edges: one dense (T, T) product
            parts, mid, mid_eye = ((0, T, 0, T, conv(lap), conv(eye)),), None, None
        else:
            r0 = (M + 1) * b  # the last rows [r0, T) (between h and h + b of them)
            parts = tuple((a, z, c, e, conv(lap[a:z, c:e]), conv(eye[a:z, c:e]))
                          for a, z, c, e in ((0, b, 0, b + h), (r0, T, r0 - h, T)))
            m = torch.arange(1, M + 1)[:, None]
            ri = (m * b + torch.arange(b))[:, :, None]  # (M, b, 1) rows
            ci = (m * b - h + torch.arange(b + 2 * h))[:, None, :]  # (M, 1, b + 2h) columns
            mid, mid_eye = conv(lap[ri, ci]), conv(eye[ri, ci])
        cache[key] = _BandedBlocks(b, h, parts, mid, mid_eye)
    return cache[key]


def banded_laplacian_(flat: Tensor, coupling: "Coupling", gamma: float, out: Tensor) -> Tensor:
    """``out <- (gamma I + Lap) @ flat`` for ``flat`` (T, L) and ``out`` (T, L), both contiguous, as
    three matrix products: the first and the last rows, and one batched product of all middle blocks
    of ``b`` time steps, each against its window of ``b + 2h`` rows of ``flat`` (overlapping views;
    h = the largest edge offset). Reads ``flat`` (1 + 2h/b) times and writes ``out`` once, with about
    2(b + 2h) flops per number: bandwidth-bound, where the elementwise pass makes ~8 passes.
    In full float32 precision whatever ``torch.set_float32_matmul_precision`` says: a TF32 product
    would lose the small differences the coupling's gradient is made of. As the elementwise pass
    but the sums' order (float rounding); a non-finite entry spreads (as NaN) over its block's rows
    (0 * inf), where the elementwise pass keeps it to its neighbours."""
    T, L = flat.shape
    if out.shape != flat.shape or not (flat.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"banded_laplacian_ needs contiguous (T, L) tensors of one shape, got "
                         f"{tuple(flat.shape)} and {tuple(out.shape)}")
    blk = _banded_blocks(coupling, flat.dtype, flat.device)
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":  # (a global setting: left alone where it is already the default)
        torch.set_float32_matmul_precision("highest")
    try:
        for r0, r1, c0, c1, A, eye in blk.parts:
            torch.mm(A.add(eye, alpha=gamma) if gamma else A, flat[c0:c1], out=out[r0:r1])
        if blk.mid is not None:
            M, b, w = blk.mid.shape
            windows = flat.as_strided((M, w, L), (b * L, L, 1), flat.storage_offset() + (b - blk.halo) * L)
            A = blk.mid.add(blk.mid_eye, alpha=gamma) if gamma else blk.mid
            torch.bmm(A, windows, out=out[b:(M + 1) * b].view(M, b, L))
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)
    return out


def _time_block(T: int, L: int, block_elems: int | None, Z: Tensor) -> int:
    """Time steps per block of the fused passes: about ``block_elems`` numbers (default
    ``FUSED_BLOCK_ELEMS``) on the CPU; on a GPU (no cache to fit, every block costs kernel launches)
    about ``GPU_BLOCK_ELEMS`` numbers unless ``block_elems`` is given."""
    if block_elems is None and Z.device.type != "cpu":
        # few launches, but temporaries bounded (2^26 numbers: 256 MB in float32) at DWE paper size
        return max(1, min(T, GPU_BLOCK_ELEMS // max(L, 1)))
    return max(1, min(T, (block_elems or FUSED_BLOCK_ELEMS) // max(L, 1)))


def _chain_quadratic_kernel(Z: Tensor, out: Tensor, w: Tensor, diag: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quadratic_terms_` of a chain (edges (t, t+1), weights ``w`` (T-1,), ``diag = gamma +
    Deg``) written as whole-tensor expressions for ``torch.compile``, which turns them into one loop
    nest (Z (T, L), out (T, L) written in place); the sums are taken in float64."""
    nxt = F.pad(Z[1:], (0, 0, 0, 1))  # Z_{t+1}, 0 after the last step
    prv = F.pad(Z[:-1], (0, 0, 1, 0))  # Z_{t-1}
    wr = F.pad(w, (0, 1))[:, None]  # w_t (edge t, t+1), 0 for t = T-1
    wl = F.pad(w, (1, 0))[:, None]  # w_{t-1}
    out.copy_(diag[:, None] * Z - wr * nxt - wl * prv)
    diff = (nxt - Z).to(torch.float64)
    z = Z.to(torch.float64)
    return (z * z).sum(), 0.5 * (wr.to(torch.float64) * diff * diff).sum()  # Eq. 3


_COMPILED = COMPILED  # "chain": the compiled kernel, or None once compiling failed


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory: the same storage and intersecting byte ranges
    (exact for contiguous tensors, conservative for strided ones). O(dims), no pass over data."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:  # [first, last] byte of t in its storage
        lo = t.storage_offset() * t.element_size()
        hi = lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size() - 1
        return lo, hi

    (alo, ahi), (blo, bhi) = span(a), span(b)
    return alo <= bhi and blo <= ahi


def quadratic_terms_(Z: Tensor, coupling: Coupling, gamma: float = 0.0, out: Tensor | None = None,
                     block_elems: int | None = None, sum_squares: bool = True,
                     compiled: bool = False, native: bool = True) -> tuple[Tensor, Tensor]:
    """``(sum ||Z||^2, psi(Z))`` (Eq. 3 / Eq. 6), both float64 scalars, and, if ``out`` is given,
    ``out <- gamma Z + L @ Z`` (the gradient of ``gamma/2 ||Z||^2 + psi``) in place, in ONE pass
    over Z: blocks of time steps small enough to stay in cache, so Z is read from memory about once
    and ``out`` written once, and no (T, N, d) temporary is made (issue 16). Sums accumulate in
    float64 per time step (``numerics.row_sum_squares``); no autograd. ``sum_squares=False``: the
    first value is 0 (not computed).

    A chain over float32 CPU tensors runs the native loop ``gs_chain_quadratic_f32``
    (``goldstone_cli/kernels``: one read of Z, one write of ``out``, float64 sums; 4-5x faster than
    the blocked PyTorch pass below) unless ``native=False`` or it is unavailable; ``compiled`` (the
    ``torch.compile``d kernel) applies where the native loop does not.

    ``out`` must not share memory with Z (ValueError): every path reads steps of Z after it has
    written ``out`` at others (the blocked pass, one step per block at large N d, would read its
    own output silently)."""
    coupling._check(Z)
    Z = Z.detach()
    T = Z.shape[0]
    if out is not None and out.shape != Z.shape:
        raise ValueError(f"out must have Z's shape {tuple(Z.shape)}, got {tuple(out.shape)}")
    if out is not None and _may_overlap(Z, out):
        raise ValueError("out must not overlap Z (out <- gamma Z + L Z reads Z while writing out): pass a separate "
                         "buffer")
    if native and coupling.is_chain() and native_loops.usable(Z, out):
        lib = native_loops.library()
        if lib is not None:
            res = _native_chain(lib, Z, coupling, gamma, out, sum_squares)
            if out is not None:  # written through its pointer: autograd must see it modified
                torch.autograd.graph.increment_version(out)
            return res
    if compiled and out is not None and T > 1 and coupling.is_chain() and Z.is_contiguous() and out.is_contiguous():
        w = coupling.bands(Z.dtype, Z.device)[0].weight
        diag = coupling._degree_tensor(Z.dtype, Z.device) + gamma
        res = run_compiled("chain", _chain_quadratic_kernel, "quadratic terms", Z.view(T, -1), out.view(T, -1), w, diag)
        if res is not None:
            return res
    flat = Z.reshape(T, -1)  # (T, N d), a view of a contiguous parameter
    L = flat.shape[1]
    go = out.view(T, -1) if out is not None else None
    if go is not None and _banded_applies(Z) and go.is_contiguous():
        banded_laplacian_(flat, coupling, gamma, go)  # gamma Z + L Z in one product (a GPU)
        go = None  # the sums below only
    bands = coupling.bands(torch.float64, Z.device)
    bands32 = coupling.bands(Z.dtype, Z.device)
    diag = coupling._degree_tensor(Z.dtype, Z.device) + gamma  # (T,) gamma + Deg_t
    step = _time_block(T, L, block_elems, Z)
    diff = torch.empty(min(step, T) * L, dtype=Z.dtype, device=Z.device)  # reused block temporary
    sq = torch.zeros((), dtype=torch.float64, device=Z.device)
    psi = torch.zeros((), dtype=torch.float64, device=Z.device)
    for s in range(0, T, step):  # blocks of time steps, not single rows or steps (unless N d is large)
        e = min(T, s + step)
        zb = flat[s:e]  # (b, L)
        if sum_squares:
            sq += row_sum_squares(zb).sum()
        for band in bands:
            o = band.offset
            hi = min(e, T - o)  # edges (t, t + o) with t in [s, hi)
            if hi > s:
                db = diff[: (hi - s) * L].view(hi - s, L)
                torch.sub(flat[s + o:hi + o], flat[s:hi], out=db)
                psi += 0.5 * torch.dot(band.weight[s:hi], row_sum_squares(db))  # Eq. 3
        if go is not None:
            ob = go[s:e]
            torch.mul(zb, diag[s:e, None], out=ob)  # (gamma + Deg_t) Z_t
            for b32 in bands32:
                o, w = b32.offset, b32.weight
                hi = min(e, T - o)
                if hi > s:  # - w_t Z_{t+o} on row t
                    go[s:hi].addcmul_(w[s:hi, None], flat[s + o:hi + o], value=-1.0)
                lo = max(s, o)
                if e > lo:  # - w_{t-o} Z_{t-o} on row t
                    go[lo:e].addcmul_(w[lo - o:e - o, None], flat[lo - o:e - o], value=-1.0)
    return sq, psi


def _native_chain(lib, Z: Tensor, coupling: Coupling, gamma: float, out: Tensor | None,
                  sum_squares: bool) -> tuple[Tensor, Tensor]:
    """:func:`quadratic_terms_` of a chain by the native loop, its columns split over the threads."""
    T = Z.shape[0]
    L = Z[0].numel() if T else 0
    bands = coupling.bands(torch.float32, Z.device)
    w = bands[0].weight.contiguous() if bands else torch.zeros(1)  # (T-1,) edge weights
    diag = (coupling._degree_tensor(torch.float32, Z.device) + gamma).contiguous()  # (T,) gamma + Deg_t
    zp, op, wp, dp = (native_loops.ptr(t) for t in (Z, out, w, diag))

    def part(c0: int, c1: int) -> tuple[float, float]:
        sums = (ctypes.c_double * 2)()
        lib.gs_chain_quadratic_f32(zp, op, wp, dp, T, L, c0, c1, sums)
        return sums[0], sums[1]

    parts = native_loops.parallel_columns(part, L)
    sq = sum(p[0] for p in parts) if sum_squares else 0.0
    psi = sum(p[1] for p in parts)
    return (torch.tensor(sq, dtype=torch.float64), torch.tensor(psi, dtype=torch.float64))


class _Psi(torch.autograd.Function):
    """psi for one tensor with a memory-lean backward: grad = L @ Z."""

    @staticmethod
    def forward(ctx, Z: Tensor, coupling: Coupling, value_dtype: Optional[torch.dtype] = None) -> Tensor:
        coupling._check(Z)
        ctx.coupling = coupling
        ctx.save_for_backward(Z)
        # ||Z_t+o - Z_t||^2 per time step in float64, over cache-sized blocks (no (T, N, d) temporary)
        _, total = quadratic_terms_(Z, coupling, sum_squares=False)
        return total.to(Z.dtype if value_dtype is None else value_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (Z,) = ctx.saved_tensors
        grad_out = grad_out.to(Z.dtype)  # a float64 value (value_dtype) gets the gradient of a value of Z's dtype
        if Z.device.type == "cpu":  # L @ Z in one pass into a pooled buffer (a fresh one costs page faults)
            out = WORKSPACE.take(Z.shape, Z.dtype, Z.device)
            quadratic_terms_(Z, ctx.coupling, 0.0, out, sum_squares=False)
            g = float(grad_out)
            return (out if g == 1.0 else out.mul_(g)), None, None
        return grad_out * ctx.coupling.laplacian_apply(Z), None, None
