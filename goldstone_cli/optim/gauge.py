"""Gauge solvers: rotations R_t that lower psi without changing any local loss (paper Sec. 4).

Pure functions over tensors; ``GoldstoneGD`` (goldstone.py) does the bookkeeping.

Conventions (DESIGN.md §2): a symmetric group is a list of tensors of shape (T, N_k, d) whose rows
are embedding vectors; a rotation acts as ``Z_t <- Z_t @ R_t.T`` (i.e. ``z -> R_t z`` for every row,
the same action as the paper's ``Z_t <- R_t Z_t`` on columns). ``M[e] = sum_i z_src,i z_dst,i^T``
(Eq. 15) for every edge e = (src, dst), src < dst, so ``M_tt' = M[e]`` and ``M_t't = M[e]^T``.

For orthogonal R,

    psi(RZ) - psi(Z) = -sum_e w_e (Tr[R_src^T R_dst M[e]^T] - Tr M[e])                  (*)

so every solver works on the (E, d, d) pair moments only; nothing here touches the (T, N, d)
tensors except :func:`rotate_rows_`. All d x d work is meant to run in float64 (callers cast M).

Solvers:

- ``natural`` (Sec. 4.1): gauge fields G~ (T, d, d), Gamma = G~ - G~^T (Eq. 13), the second-order
  expansion L'' (Eq. 14) of (*) with R = expm(Gamma), ``k2`` natural-gradient steps preconditioned by
  the Laplacian pseudo-inverse (Eq. 16) with the learning rate of Eq. 17.
- ``procrustes`` (exact): on a tree the relative rotation across each edge is free, so (*) splits
  into one orthogonal Procrustes problem per edge (an SVD of M[e]); the relative rotations are
  composed along the tree by pointer jumping (an associative scan, O(log depth) batched steps);
  graphs with cycles are finished by block-coordinate sweeps over a graph colouring.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .coupling import Coupling

SOLVERS = ("natural", "procrustes")
ROTATIONS = ("linear", "expm", "cayley")

# Relative size of the identity added before a polar decomposition: breaks the ties of a
# rank-deficient matrix towards the identity (rotate nothing that nothing constrains) while
# changing the optimum by a relative 1e-13 at most.
_TIE_BREAK = 1e-13


# ============================================================================ shared helpers
@contextmanager
def serial_cpu(x: Tensor):
    """Run batched small (d x d) LAPACK calls on CPU tensors on one thread. Threading gains nothing
    on tiny matrices, and on a busy 2-core machine a batched SVD of (100, 100, 100) took 13-40 s
    with 2 threads against 0.2 s with one (oversubscription). No-op for GPU tensors."""
    if x.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def skew(gauge: Tensor) -> Tensor:
    """Gamma = G~ - G~^T (Eq. 13): (..., d, d) -> (..., d, d), skew-symmetric."""
    return gauge - gauge.transpose(-1, -2)


def _eye_like(B: Tensor) -> Tensor:
    return torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand_as(B)


# cuSOLVER's batched Jacobi SVD and eigensolvers take matrices up to 32 x 32 only; for larger ones
# torch loops over the batch: on an H200 3-6 ms per 100 x 100 SVD and 0.6 ms per eigvalsh, 0.8 s of
# each procrustes gauge step of DWE at the paper's size against an Adam step of 0.03-0.08 s. There the d x d work
# below uses iterations built from batched products and inverses instead.
_BATCHED_SOLVER_MAX_D = 32


def _loops_on_device(B: Tensor) -> bool:
    return B.is_cuda and B.shape[-1] > _BATCHED_SOLVER_MAX_D


def polar_factor(B: Tensor, allow_reflections: bool = True) -> Tensor:
    """The orthogonal Q maximizing <Q, B>_F = Tr(Q^T B) for each matrix of a batch (..., d, d).

    Q = U V^T from the SVD B = U S V^T (Kabsch). With ``allow_reflections=False`` Q is restricted to
    SO(d): the sign of the smallest singular direction is flipped where det(U V^T) < 0. On a GPU with
    d > 32 (O(d) only) the same Q comes from :func:`polar_newton`, the SVD taking the matrices where
    that did not converge."""
    scale = B.flatten(-2).norm(dim=-1)[..., None, None]  # (..., 1, 1)
    B = B + _TIE_BREAK * (scale + torch.finfo(B.dtype).tiny) * _eye_like(B)
    if allow_reflections and _loops_on_device(B) and B.numel():
        Q, ok = polar_newton(B)
        if not bool(ok.all()):
            Q[~ok] = _polar_svd(B[~ok].cpu(), True).to(B.device)  # rare: (nearly) singular matrices
        return Q
    return _polar_svd(B, allow_reflections)


def _polar_svd(B: Tensor, allow_reflections: bool) -> Tensor:
    with serial_cpu(B):
        U, _, Vh = torch.linalg.svd(B)
        det = torch.linalg.det(U) * torch.linalg.det(Vh) if not allow_reflections else None
    if not allow_reflections:
        sign = torch.sign(det)  # (...,)
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        U = U.clone()
        U[..., :, -1] *= sign[..., None]
    return U @ Vh


def polar_newton(B: Tensor, max_iter: int = 40, schulz: bool = True) -> tuple[Tensor, Tensor]:
    """Orthogonal polar factor of each (nonsingular) matrix of a batch (..., d, d) by the scaled
    Newton iteration X <- (zeta X + X^{-T} / zeta) / 2, zeta = sqrt(||X^{-1}||_F / ||X||_F) (Higham,
    1986): it keeps the singular vectors, maps every singular value towards 1 and converges
    quadratically (about 10 iterations for condition numbers up to 1e13). With ``schulz`` the
    inverse-free Newton-Schulz step X <- X (3I - X^T X) / 2 takes over once every ||X^T X - I||_F
    < 1/2 (there e = sigma^2 - 1 goes to -3e^2/4 + e^3/4: also quadratic, products only). Batched
    inverses and products only, so it runs at the speed of the GPU where a batched SVD does not.
    Returns (Q, converged): converged (...,) is False where an inverse failed or Q^T Q is not I to
    1e-10."""
    X = B.clone()
    d = B.shape[-1]
    eye = _eye_like(B)
    ok = torch.ones(B.shape[:-2], dtype=torch.bool, device=B.device)
    if not X.numel():
        return X, ok
    inverse_free = False

    def newton(X: Tensor) -> Tensor:
        nonlocal ok
        Y, info = torch.linalg.inv_ex(X)
        ok = ok & (info == 0)
        Y = torch.where(ok[..., None, None], Y, eye)  # failed ones: held at the identity, reported
        zeta = (torch.linalg.matrix_norm(Y) / torch.linalg.matrix_norm(X).clamp_min(torch.finfo(X.dtype).tiny)).sqrt()
        zeta = torch.where(torch.isfinite(zeta) & (zeta > 0), zeta, torch.ones_like(zeta))[..., None, None]
        return torch.where(ok[..., None, None], 0.5 * (zeta * X + Y.transpose(-1, -2) / zeta), eye)

    def newton_schulz(X: Tensor) -> Tensor:
        return 1.5 * X - 0.5 * X @ (X.transpose(-1, -2) @ X)

    for _ in range(max_iter):
        X_new = newton_schulz(X) if inverse_free else newton(X)
        change = float(torch.linalg.matrix_norm(X_new - X).max())
        X = X_new
        if not change > 1e-9 * d ** 0.5:  # converged (or NaN: caught below); one more step squares the error
            X = newton_schulz(X) if inverse_free else newton(X)
            break
        if schulz and not inverse_free:
            inverse_free = float(torch.linalg.matrix_norm(X.transpose(-1, -2) @ X - eye).max()) < 0.5
    resid = torch.linalg.matrix_norm(X.transpose(-1, -2) @ X - eye)
    ok &= torch.isfinite(resid) & (resid <= 1e-10 * d)
    return X, ok


def _dominant_eigenvector_psd(P: Tensor, squarings: int = 11) -> Tensor:
    """Unit eigenvector of the largest eigenvalue of each symmetric PSD (..., d, d) matrix from
    products only: P^(2^k) by repeated squaring (normalized by its trace), its largest column, one
    more power step. (..., d); zero for a zero matrix."""
    X = P
    for _ in range(squarings):
        X = X @ X
        X = X / X.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(P.dtype).tiny)[..., None, None]
    norms = torch.linalg.vector_norm(X, dim=-2)  # (..., d) column norms
    v = torch.take_along_dim(X, norms.argmax(-1)[..., None, None].expand(*X.shape[:-1], 1), dim=-1)  # (..., d, 1)
    v = (P @ v)[..., 0]
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)


def _largest_eigenvalue_psd(P: Tensor, squarings: int = 11) -> Tensor:
    """Largest eigenvalue of each symmetric PSD (..., d, d) matrix from products only: the Rayleigh
    quotient of :func:`_dominant_eigenvector_psd`. Relative error below max_x x^(2^(k+1)) (1 - x),
    under 1e-4 for k=11 squarings."""
    v = _dominant_eigenvector_psd(P, squarings)[..., :, None]
    return (v.transpose(-1, -2) @ P @ v)[..., 0, 0]


def _smallest_eigenvector_sym(S: Tensor) -> Tensor:
    """Unit eigenvector of the smallest eigenvalue of each symmetric (..., d, d) matrix: (..., d).
    ``eigh`` where it is batched; on a GPU with d > 32 the dominant eigenvector of c I - S
    (c = ||S||_F >= lambda_max, so c I - S is PSD), with ``eigh`` for any matrix whose Rayleigh
    quotient it does not bring below zero (the only case the reflection flips use it for)."""
    if not _loops_on_device(S):
        with serial_cpu(S):
            return torch.linalg.eigh(S)[1][..., :, 0]
    c = torch.linalg.matrix_norm(S)[..., None, None]
    u = _dominant_eigenvector_psd(c * _eye_like(S) - S)
    rayleigh = (u[..., None, :] @ S @ u[..., :, None])[..., 0, 0]
    bad = ~(rayleigh < 0)
    if bool(bad.any()):
        u[bad] = torch.linalg.eigh(S[bad].cpu())[1][..., :, 0].to(S.device, S.dtype)
    return u


def _largest_eigvalsh(P: Tensor) -> Tensor:
    if _loops_on_device(P):
        return _largest_eigenvalue_psd(P)
    with serial_cpu(P):
        return torch.linalg.eigvalsh(P)[..., -1]


def rotation_angles(R: Tensor, generator: Tensor | None = None) -> Tensor:
    """Largest rotation angle (radians, in [0, pi]) of each orthogonal (d, d) matrix: (T,).

    From the spectral norm of R - I, which is 2 sin(angle / 2) (a reflection counts as pi); with
    the skew ``generator`` of the linear update I + Gamma, atan of Gamma's largest rotation rate
    (the angle of the orthogonal part of I + Gamma). Symmetric eigenvalues only: cheap, any device."""
    if generator is not None:
        rate = _largest_eigvalsh(generator.transpose(-1, -2) @ generator).clamp_min(0).sqrt()
        return torch.atan(rate)
    D = R - _eye_like(R)
    s = _largest_eigvalsh(D.transpose(-1, -2) @ D).clamp_min(0).sqrt()  # ||R - I||_2
    return 2 * torch.asin((0.5 * s).clamp(max=1.0))


def rotate_rows_(Z: Tensor, R: Tensor, max_chunk_elems: int = 1 << 24) -> None:
    """In place ``Z_t <- Z_t @ R_t^T`` for Z (T, N, d) and R (T, d, d) (cast to Z's dtype).

    Processed in blocks of time steps so the temporary stays below ``max_chunk_elems`` elements."""
    if Z.numel() == 0:
        return
    T, N, d = Z.shape
    Rt = R.to(dtype=Z.dtype, device=Z.device).transpose(1, 2)  # (T, d, d)
    block = max(1, max_chunk_elems // max(N * d, 1))
    for start in range(0, T, block):  # one iteration unless Z is large
        stop = min(T, start + block)
        Z[start:stop] = torch.bmm(Z[start:stop], Rt[start:stop])


def rotate_rows_psi_(Z: Tensor, R: Tensor, coupling: Coupling, block_elems: int | None = None) -> Tensor:
    """:func:`rotate_rows_` that also returns psi of the rotated Z (float64 scalar), computed from
    each block of rotated time steps while it is still in cache: the gauge step's "psi after" without
    a second pass over Z (issue 16). Blocks go forward in t, so both ends of every edge (t, t+o) are
    rotated when its difference is taken; the sums are those of ``Coupling.psi``."""
    from goldstone_cli.numerics import row_sum_squares
    from .coupling import _time_block

    coupling._check(Z)
    T = Z.shape[0]
    psi = torch.zeros((), dtype=torch.float64, device=Z.device)
    if Z.numel() == 0:
        return psi
    if not Z.is_contiguous():  # a parameter with other strides: rotate a contiguous copy, write it back
        Zc = Z.contiguous()
        psi = rotate_rows_psi_(Zc, R, coupling, block_elems)
        Z.copy_(Zc)
        return psi
    flat = Z.view(T, -1)
    L = flat.shape[1]
    Rt = R.to(dtype=Z.dtype, device=Z.device).transpose(1, 2)  # (T, d, d)
    bands = coupling.bands(torch.float64, Z.device)
    step = _time_block(T, L, block_elems, Z)
    diff = torch.empty(step * L, dtype=Z.dtype, device=Z.device)  # reused block temporary
    for s in range(0, T, step):  # blocks of time steps
        e = min(T, s + step)
        Z[s:e] = torch.bmm(Z[s:e], Rt[s:e])
        for band in bands:  # edges (t, t + o) whose later end t + o lies in this block
            o = band.offset
            lo, hi = max(0, s - o), e - o
            if hi > lo:
                db = diff[: (hi - lo) * L].view(hi - lo, L)  # hi - lo <= e - s <= step
                torch.sub(flat[lo + o:hi + o], flat[lo:hi], out=db)
                psi += 0.5 * torch.dot(band.weight[lo:hi], row_sum_squares(db))  # Eq. 3
    return psi


def coupling_gain(R: Tensor, M: Tensor, src: Tensor, dst: Tensor, weight: Tensor) -> Tensor:
    """f(R) = sum_e w_e Tr[R_src^T R_dst M[e]^T]; psi(RZ) = psi(Z) - (f(R) - f(I)) by (*)."""
    rel = torch.bmm(R[src].transpose(1, 2), R[dst])  # (E, d, d)
    return (weight * (rel * M).sum(dim=(1, 2))).sum()


# ============================================================================ natural (Sec. 4.1)
def natural_objective(gauge: Tensor, M: Tensor, src: Tensor, dst: Tensor, weight: Tensor) -> Tensor:
    """L''(G~; M) of Eq. 14, summed over ordered pairs (both directions of every edge):

        sum_{t,t'} A_tt' Tr[(Gamma_t' + 1/2 (Gamma_t' - Gamma_t) Gamma_t) M_tt'],  M_t't = M_tt'^T.

    Derivation in our convention: R_t^T R_t' = I + Gamma_t' - Gamma_t + Gamma_t^2/2 + Gamma_t'^2/2
    - Gamma_t Gamma_t' + O(Gamma^3); inserted in (*) and symmetrized this is exactly Eq. 14 (rows
    rotate as z -> R z, so the paper's column formula carries over unchanged)."""
    G = skew(gauge)  # (T, d, d), Eq. 13
    Ga, Gb = G[src], G[dst]  # (E, d, d)
    Mt = M.transpose(1, 2)
    P1 = Gb + 0.5 * torch.bmm(Gb - Ga, Ga)  # pair (t=src, t'=dst), with M_tt' = M
    P2 = Ga + 0.5 * torch.bmm(Ga - Gb, Gb)  # pair (t=dst, t'=src), with M_t't = M^T
    # Tr(P M) = sum_ij P_ij M_ji
    per_edge = (P1 * Mt).sum(dim=(1, 2)) + (P2 * M).sum(dim=(1, 2))
    return (weight * per_edge).sum()


def natural_gradient(gauge: Tensor, M: Tensor, src: Tensor, dst: Tensor, weight: Tensor) -> Tensor:
    """Analytic gradient of L'' (Eq. 14) with respect to the gauge fields G~: (T, d, d).

    Per edge, with N = M^T: dL''/dGamma_src = w [M + 1/2 (Gamma_dst N - Gamma_src M + M (Gamma_dst -
    Gamma_src))^T] and dL''/dGamma_dst = w [N + 1/2 (Gamma_src M - Gamma_dst N + N (Gamma_src -
    Gamma_dst))^T]; then dL''/dG~ = g - g^T (chain rule through Eq. 13)."""
    return _NaturalGradient(M, src, dst, weight)(gauge)


class _NaturalGradient:
    """:func:`natural_gradient` with the per-edge constants (w M, w M^T) computed once for the k2
    steps of a gauge step, and a chain fast path (edges (t, t+1) in order: slices instead of
    gathers and scatter-adds)."""

    def __init__(self, M: Tensor, src: Tensor, dst: Tensor, weight: Tensor):
        self.M, self.N = M, M.transpose(1, 2)
        self.w = weight.to(M.dtype)[:, None, None]
        self.wM, self.wN = self.w * self.M, self.w * self.N
        self.src, self.dst = src, dst
        E = src.numel()
        self.chain = E > 0 and bool((src == torch.arange(E, device=src.device)).all()) and bool((dst == src + 1).all())

    def __call__(self, gauge: Tensor) -> Tensor:
        G = skew(gauge)  # (T, d, d), Eq. 13
        chain = self.chain and G.shape[0] == self.src.numel() + 1  # no node beyond the last edge
        if chain:
            Ga, Gb = G[:-1], G[1:]
        else:
            Ga, Gb = G[self.src], G[self.dst]  # (E, d, d)
        P = torch.bmm(Gb, self.N) - torch.bmm(Ga, self.M)  # Gamma_dst N - Gamma_src M
        D = Gb - Ga
        grad_a = self.wM + 0.5 * self.w * (P + torch.bmm(self.M, D)).transpose(1, 2)
        grad_b = self.wN - 0.5 * self.w * (P + torch.bmm(self.N, D)).transpose(1, 2)
        if chain:
            g = torch.nn.functional.pad(grad_a, (0, 0, 0, 0, 0, 1)) + torch.nn.functional.pad(grad_b, (0, 0, 0, 0, 1, 0))
        else:
            g = torch.zeros_like(gauge)  # (T, d, d), dL''/dGamma
            g.index_add_(0, self.src, grad_a)
            g.index_add_(0, self.dst, grad_b)
        return g - g.transpose(1, 2)


def natural_learning_rate(total_sq_norm: float, d: int, lr_scale: float = 1.0) -> float:
    """rho' = lr_scale / (T N <Z^2>) with <Z^2> = sum ||z||^2 / (T N d) (Eq. 17), i.e.
    lr_scale * d / sum ||z||^2 over all rows of all tensors of the group and all time steps."""
    if not total_sq_norm > 0:
        return 0.0
    return lr_scale * d / total_sq_norm


class LaplacianPinv:
    """Applies L^+ (the Laplacian pseudo-inverse) in t-space to a (T, ...) tensor (Eq. 16).

    A chain is solved exactly in O(T) per entry with two cumulative sums (the edge "fluxes" of
    L y = b); any other graph uses the dense (T, T) pseudo-inverse, computed once. Small chain
    problems (T * b.numel() <= ``dense_work`` multiply-adds) use the dense product too: one kernel
    beats the recurrences' ten small ones there."""

    DENSE_WORK = 1 << 21

    def __init__(self, coupling: Coupling, device=None, dtype=torch.float64, dense_work: int = DENSE_WORK):
        self.T = coupling.T
        self.chain = coupling.is_chain() and coupling.T > 1
        self.dense_work = dense_work
        self.weight = torch.as_tensor(coupling.weight, dtype=dtype, device=device) if self.chain else None  # (T-1,)
        # T * b.numel() >= T^2: above dense_work a chain never takes the dense product
        needs_dense = not self.chain or self.T * self.T <= dense_work
        self.dense = coupling.laplacian_pinv(dtype=dtype, device=device) if needs_dense else None  # (T, T)

    def __call__(self, b: Tensor) -> Tensor:
        if self.T == 1:
            return torch.zeros_like(b)
        if not self.chain or self.T * b.numel() <= self.dense_work:
            return torch.tensordot(self.dense.to(b.dtype), b, dims=([1], [0]))
        shape = (-1,) + (1,) * (b.dim() - 1)
        b = b - b.mean(dim=0, keepdim=True)  # project out the zero mode (global rotations)
        # (L y)_t = f_{t-1} - f_t with edge flux f_t = w_t (y_{t+1} - y_t), f_{-1} = f_{T-1} = 0
        flux = -torch.cumsum(b, dim=0)[:-1]  # (T-1, ...)
        steps = flux / self.weight.to(b.dtype).view(shape)
        y = torch.cat([torch.zeros_like(b[:1]), torch.cumsum(steps, dim=0)], dim=0)
        return y - y.mean(dim=0, keepdim=True)


def natural_solve(
    gauge: Tensor,
    M: Tensor,
    src: Tensor,
    dst: Tensor,
    weight: Tensor,
    lap_pinv: LaplacianPinv,
    lr: float,
    k2: int,
) -> Tensor:
    """k2 natural-gradient steps G~ <- G~ - rho' L^+ grad L''(G~; M) (Eq. 16, Algorithm 1 line 8)."""
    grad = _NaturalGradient(M, src, dst, weight)
    for _ in range(k2):
        gauge = gauge - lr * lap_pinv(grad(gauge))
    return gauge


def rotation_from_generator(Gamma: Tensor, mode: str) -> Tensor:
    """The (T, d, d) matrix applied to the rows for a skew-symmetric generator Gamma.

    ``linear``: I + Gamma (Algorithm 1, line 9; not orthogonal: scales rotated planes by
    sqrt(1 + angle^2)); ``expm``: the exact rotation expm(Gamma) (Eq. 12); ``cayley``:
    (I - Gamma/2)^-1 (I + Gamma/2), orthogonal and equal to expm(Gamma) up to third order (NaN where
    I - Gamma/2 is singular in floating point: only for a generator so large, ~1/eps, that the 1 is lost;
    the caller refuses a matrix that is not a rotation)."""
    eye = _eye_like(Gamma)
    if mode == "linear":
        return eye + Gamma
    if mode == "expm":
        with serial_cpu(Gamma):
            return torch.linalg.matrix_exp(Gamma)
    if mode == "cayley":
        with serial_cpu(Gamma):
            R, info = torch.linalg.solve_ex(eye - 0.5 * Gamma, eye + 0.5 * Gamma)
        return R.masked_fill((info != 0)[..., None, None], float("nan"))
    raise ValueError(f"unknown rotation {mode!r}; valid: {', '.join(ROTATIONS)}")


# ============================================================================ procrustes (exact)
@dataclass
class ProcrustesPlan:
    """Graph structure for the exact solver, built once per coupling (numpy/scipy, not hot path).

    Spanning forest: every node v has a parent ``parent[v]`` (a root is its own parent) and the
    edge ``tree_edge[v]`` to it; ``tree_transpose[v]`` is True where v is the edge's src (then
    R_v = R_parent Q_e^T, else R_v = R_parent Q_e). ``jumps`` pointer-jumping rounds reach the roots.
    ``colors``: for graphs with cycles, independent node sets with the edges that feed each."""

    T: int
    src: Tensor  # (E,) int64
    dst: Tensor  # (E,)
    weight: Tensor  # (E,) float64
    is_forest: bool
    parent: Tensor  # (T,) int64
    tree_edge: Tensor  # (T,) int64, 0 for roots (masked by is_root)
    tree_transpose: Tensor  # (T,) bool
    is_root: Tensor  # (T,) bool
    jumps: int
    component: Tensor  # (T,) int64
    num_components: int
    colors: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (nodes, e_src, e_dst)

    def to(self, device) -> "ProcrustesPlan":
        mv = lambda x: x.to(device)  # noqa: E731
        return ProcrustesPlan(
            self.T, mv(self.src), mv(self.dst), mv(self.weight), self.is_forest, mv(self.parent),
            mv(self.tree_edge), mv(self.tree_transpose), mv(self.is_root), self.jumps,
            mv(self.component), self.num_components,
            [(mv(a), mv(b), mv(c)) for a, b, c in self.colors],
        )


def procrustes_plan(coupling: Coupling) -> ProcrustesPlan:
    """Spanning forest (maximum weight where there are cycles), parent pointers and colouring."""
    import scipy.sparse as sp
    from scipy.sparse import csgraph

    T, E = coupling.T, coupling.num_edges
    src, dst, w = coupling.src, coupling.dst, coupling.weight
    forest = coupling.is_forest()
    if forest:
        t_src, t_dst = src, dst
    else:
        # maximum-weight spanning forest = minimum spanning forest of (2 max w - w) > 0
        cost = 2.0 * w.max() - w
        mst = csgraph.minimum_spanning_tree(sp.coo_matrix((cost, (src, dst)), shape=(T, T)).tocsr())
        t_src, t_dst = mst.nonzero()
        t_src, t_dst = np.minimum(t_src, t_dst), np.maximum(t_src, t_dst)
    tree = sp.coo_matrix((np.ones(len(t_src)), (t_src, t_dst)), shape=(T, T)).tocsr()
    ncomp, comp = csgraph.connected_components(tree, directed=False)
    parent = np.arange(T)
    roots = np.zeros(T, dtype=bool)
    for c in range(ncomp):  # one BFS per component (setup only; usually one component)
        members = np.nonzero(comp == c)[0]
        root = members[0]
        roots[root] = True
        if len(members) > 1:
            _, pred = csgraph.breadth_first_order(tree, root, directed=False, return_predecessors=True)
            parent[members[members != root]] = pred[members[members != root]]
    # edge id of (min(v, parent), max(v, parent)), looked up by the key src * T + dst
    key = src * T + dst
    order = np.argsort(key, kind="stable")
    lo, hi = np.minimum(np.arange(T), parent), np.maximum(np.arange(T), parent)
    tree_edge = np.zeros(T, dtype=np.int64)
    if E:
        pos = np.clip(np.searchsorted(key[order], lo * T + hi), 0, E - 1)
        tree_edge = np.where(roots, 0, order[pos])
    transpose = (np.arange(T) == lo) & ~roots  # v is the edge's src -> R_v = R_p Q^T
    # pointer-jumping rounds until every node points at its root
    p, jumps = parent.copy(), 0
    while np.any(p != p[p]):
        p, jumps = p[p], jumps + 1

    colors = []
    if not forest:
        colors = _coloring(T, src, dst)
    as_t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64))  # noqa: E731
    color_t = []
    for nodes in colors:
        in_c = np.zeros(T, dtype=bool)
        in_c[nodes] = True
        color_t.append((as_t(nodes), as_t(np.nonzero(in_c[src])[0]), as_t(np.nonzero(in_c[dst])[0])))
    return ProcrustesPlan(
        T=T, src=as_t(src), dst=as_t(dst), weight=torch.as_tensor(w, dtype=torch.float64),
        is_forest=forest, parent=as_t(parent), tree_edge=as_t(tree_edge),
        tree_transpose=torch.as_tensor(transpose), is_root=torch.as_tensor(roots), jumps=jumps,
        component=as_t(comp), num_components=int(ncomp), colors=color_t,
    )


def _coloring(T: int, src: np.ndarray, dst: np.ndarray) -> list[np.ndarray]:
    """Independent node sets covering every node with an edge: a 2-colouring (red-black) when the
    graph is bipartite, else a greedy largest-degree-first colouring. Isolated nodes are left out."""
    import scipy.sparse as sp
    from scipy.sparse import csgraph

    adj = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(T, T)).tocsr()
    adj = ((adj + adj.T) > 0).tocsr()
    deg = np.diff(adj.indptr)
    active = deg > 0
    ncomp, comp = csgraph.connected_components(adj, directed=False)
    parity = np.zeros(T, dtype=np.int64)
    for c in range(ncomp):
        members = np.nonzero(comp == c)[0]
        if len(members) < 2:
            continue
        order, pred = csgraph.breadth_first_order(adj, members[0], directed=False, return_predecessors=True)
        for v in order[1:]:  # BFS order: the parent's parity is already set (setup only)
            parity[v] = 1 - parity[pred[v]]
    if np.all(parity[src] != parity[dst]):
        return [np.nonzero(active & (parity == k))[0] for k in (0, 1)]
    color = np.full(T, -1, dtype=np.int64)
    for v in np.argsort(-deg, kind="stable"):
        if not active[v]:
            continue
        used = set(color[adj.indices[adj.indptr[v]:adj.indptr[v + 1]]].tolist())
        c = 0
        while c in used:
            c += 1
        color[v] = c
    return [np.nonzero(color == k)[0] for k in range(color.max() + 1)]


def edge_procrustes(M: Tensor, allow_reflections: bool = True) -> Tensor:
    """Relative rotations Q_e = argmax_Q <Q, M[e]>_F = R_src^T R_dst minimizing each edge's term of
    (*) on its own: (E, d, d)."""
    return polar_factor(M, allow_reflections)


def tree_rotations(Q: Tensor, plan: ProcrustesPlan) -> Tensor:
    """Compose edge rotations Q (E, d, d) along the spanning forest: R_root = I and
    R_v = R_parent(v) C_v with C_v = Q_e or Q_e^T. Pointer jumping (C_v <- C_p(v) C_v,
    p(v) <- p(p(v))) is an associative scan: ``plan.jumps`` batched rounds, not T sequential ones."""
    T, d = plan.T, Q.shape[-1]
    eye = torch.eye(d, dtype=Q.dtype, device=Q.device).expand(T, d, d)
    if Q.shape[0] == 0:
        return eye.clone()
    C = Q[plan.tree_edge]  # (T, d, d)
    C = torch.where(plan.tree_transpose[:, None, None], C.transpose(1, 2), C)
    C = torch.where(plan.is_root[:, None, None], eye, C)
    p = plan.parent
    for _ in range(plan.jumps):
        C = torch.bmm(C[p], C)
        p = p[p]
    return C


def global_fix(R: Tensor, M_self: Tensor, plan: ProcrustesPlan, allow_reflections: bool = True) -> Tensor:
    """Left-multiply each connected component by the R0 that moves Z least:
    argmin_R0 sum_t ||Z_t R_t^T R0^T - Z_t||^2 = argmax Tr(R0 K), K = sum_t R_t M_tt -> R0 = polar(K^T)."""
    K = torch.zeros(plan.num_components, *R.shape[1:], dtype=R.dtype, device=R.device)
    K.index_add_(0, plan.component, torch.bmm(R, M_self))
    R0 = polar_factor(K.transpose(1, 2), allow_reflections)  # (C, d, d)
    return torch.bmm(R0[plan.component], R)


def _sweep(R: Tensor, M: Tensor, plan: ProcrustesPlan, allow_reflections: bool) -> Tensor:
    """One block-coordinate sweep: each colour class at once, every R_t set to the exact maximizer of
    Tr(R_t^T B_t), B_t = sum_{edges} w R_neighbour M_neighbour,t (M[e]^T if t = src, M[e] if t = dst)."""
    w = plan.weight[:, None, None].to(M.dtype)
    for nodes, e_src, e_dst in plan.colors:
        B = torch.zeros_like(R)  # (T, d, d)
        B.index_add_(0, plan.src[e_src], w[e_src] * torch.bmm(R[plan.dst[e_src]], M[e_src].transpose(1, 2)))
        B.index_add_(0, plan.dst[e_dst], w[e_dst] * torch.bmm(R[plan.src[e_dst]], M[e_dst]))
        R = R.index_copy(0, nodes, polar_factor(B[nodes], allow_reflections))
    return R


def procrustes_solve(
    M: Tensor,
    M_self: Tensor,
    plan: ProcrustesPlan,
    allow_reflections: bool = True,
    max_sweeps: int = 100,
    tol: float = 1e-10,
    psi0: float | None = None,
) -> tuple[Tensor, dict]:
    """Rotations R (T, d, d) minimizing psi(RZ) given the pair moments M (E, d, d) and the self
    moments M_self (T, d, d) (both float64 recommended).

    On a forest the result is the exact global minimum (per-edge Kabsch + composition). With cycles,
    start from the better of the identity and the spanning-tree solution, then sweep until the
    decrease of psi in a sweep is at most ``tol`` times psi (relative; ``psi0`` = psi(Z) sets the
    scale, else sum_e w Tr M[e]) or ``max_sweeps`` is reached; psi never rises. Finally fix the
    global rotation of each component to move Z least."""
    src, dst, w = plan.src, plan.dst, plan.weight.to(M.dtype)
    T, d = plan.T, M_self.shape[-1]
    info = {"sweeps": 0}
    R = tree_rotations(edge_procrustes(M, allow_reflections), plan)  # (T, d, d)
    if not plan.is_forest:
        eye = torch.eye(d, dtype=M.dtype, device=M.device).expand(T, d, d).clone()
        f_id, f_tree = coupling_gain(eye, M, src, dst, w), coupling_gain(R, M, src, dst, w)
        if f_id > f_tree:
            R, f = eye, f_id
        else:
            f = f_tree
        # psi(RZ) = psi(Z) - (f(R) - f(I)); without psi0 use the scale of the coupling terms
        psi_now = (float(psi0) if psi0 is not None else abs(float(f_id))) - float(f - f_id)
        for sweep in range(max_sweeps):
            R_new = _sweep(R, M, plan, allow_reflections)
            f_new = coupling_gain(R_new, M, src, dst, w)
            gain = float(f_new - f)
            info["sweeps"] = sweep + 1
            if gain < 0:  # cannot happen in exact arithmetic; keep the better one
                break
            R, f = R_new, f_new
            psi_now = max(psi_now - gain, 0.0)
            if gain <= tol * max(psi_now, torch.finfo(M.dtype).tiny):
                break
    return global_fix(R, M_self, plan, allow_reflections), info


# ============================================================================ reflections for natural
def wall_edges(M: Tensor) -> Tensor:
    """Edges that are reflection domain walls: det M[e] < 0, i.e. the best orthogonal alignment of
    the two time steps (the polar factor of M[e]) is a reflection. (E,) bool."""
    if M.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=M.device)
    with serial_cpu(M):
        return torch.linalg.slogdet(M).sign < 0


def reflection_flips(M: Tensor, plan: ProcrustesPlan) -> tuple[Tensor, Tensor] | None:
    """Exact reflections A (T, d, d) that remove the reflection domain walls of a tree, for the
    ``natural`` solver over O(d); None if there is no wall.

    The natural gradient moves in so(d), the identity component of O(d), so it cannot undo a wall
    where one side is a mirror image of the other (det M[e] < 0). Across each wall edge we put the
    Householder reflection Q_e = I - 2 u u^T that maximizes the edge's gain Tr(Q_e M[e]^T) = Tr M[e]
    - 2 u^T M[e] u among reflections: u is the eigenvector of the smallest eigenvalue of
    sym(M[e]) = (M[e] + M[e]^T)/2, the direction in which the two sides disagree most. det M[e] < 0
    implies that eigenvalue is negative (det(S + K) >= det S >= 0 for S positive semidefinite, K
    skew), so every flip lowers that edge's term of psi by -2 w_e lambda_min > 0 and leaves the other
    edges unchanged (both their ends are reflected alike). The flips are composed along the spanning
    tree like Procrustes rotations (``tree_rotations``); on a graph with cycles the result is kept
    only if it lowers psi. The remaining relative rotation across a former wall lies in SO(d), where
    the natural steps can reach it. Returns (A, walls) with ``walls`` the (E,) bool wall mask."""
    walls = wall_edges(M)
    if not bool(walls.any()):
        return None
    sym = 0.5 * (M[walls] + M[walls].transpose(1, 2))
    u = _smallest_eigenvector_sym(sym)  # (W, d): eigenvector of the smallest eigenvalue
    Q = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).repeat(M.shape[0], 1, 1)
    Q[walls] = Q[walls] - 2 * u[:, :, None] * u[:, None, :]
    A = tree_rotations(Q, plan)
    if not plan.is_forest:
        w = plan.weight.to(M.dtype)
        if coupling_gain(A, M, plan.src, plan.dst, w) <= coupling_gain(_eye_like(A), M, plan.src, plan.dst, w):
            return None
    return A, walls
