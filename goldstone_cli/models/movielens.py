"""Model 2: sparse dynamic Bernoulli matrix factorization of MovieLens ratings (paper Sec. 3.2, 5.2).

    log p(x | u_t,i, v_t,j) = log sigma(x u_t,i . v_t,j)                        (Eq. 8)
    l(X_t; Z_t) = -sum_{ratings (i, j, x) in bin t} log sigma(x u_t,i . v_t,j)
                  + gamma/2 ||Z_t||_F^2                                          (Eq. 9)
    psi(Z) = lambda/2 sum_t sum_rows ||z_t+1,i - z_t,i||^2  over all rows of U and V   (Eq. 6)

``U`` (T, n_users, d) and ``V`` (T, n_items, d) hold one embedding per user / movie and time bin;
``Z_t = (U_t, V_t)`` rotates as one group. Only the *training* ratings enter the loss. The gamma
term runs over the full tensors, so a (user, bin) row without ratings is pulled to zero by gamma
and interpolated between its neighbouring bins by the chain prior psi; that is also what
validation and test ratings in such a bin are predicted from.

Memory (full ML-20M: 138,493 users + 26,744 movies, T=100, d=30, float32): one copy of the
parameters is 1.98 GB. The likelihood is computed by a custom autograd function that gathers the
rows of one chunk of ratings at a time and recomputes them in the backward pass, so no
(n_ratings, d) tensor is ever kept; its backward writes ``gamma Z`` and the scatter-added
likelihood gradient into one buffer per parameter. With psi's lean backward (``Coupling.psi``)
a step needs parameters + gradients + the gradient of psi while it is added, and AdaGrad its
accumulator plus one temporary: measured peak RSS 9.9 GB for a full-batch AdaGrad step and a
gauge step on ML-20M-shaped data (bench/movielens_step.py, docs/benchmarks.md).

Row sharding (``shard``, trainer.distributed): users AND items are sharded (RowShard blocks); a rank
keeps the ratings of its users (``ratings_of_users``) and, every step, gathers all of V for them
(``RowShard.gather_rows``; its backward reduce-scatters V's gradient). That moves the same bytes per
step as replicating V and all-reducing its gradient (an all-reduce is a reduce-scatter plus an
all-gather), but every rank stores and updates only 1/world of V and of its optimizer state, and the
gauge step needs no special case for a replicated tensor. ``items="replicated"`` (model.items) is
the other layout: every rank holds all of V, its gradient is all-reduced (``reduce_gradients``),
every rank updates all of it, and V's prior and psi are counted on rank 0 (bench/distributed.py
measures both; docs/scaling.md). Minibatches are drawn over the global
training ratings from the same generator state on every rank; each rank keeps the draws that fall
on its users, so results do not depend on the number of ranks.

Speed (issue 16): ``loss_terms`` (what the trainer calls) runs :class:`_FusedLoss` instead of
``local_loss() + psi()``: the rows of each rating are gathered once and its gradient scatter-added
in the same pass, the gamma term, psi and ``gamma Z + L Z`` come from one cache-blocked pass per
parameter, and the gradient's storage is reused between steps (no page faults of a fresh
multi-MB tensor). Same numbers up to float rounding (tests/test_fused_steps.py); timings in
docs/benchmarks.md, "Roofline (issue 16)".
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.kernels import native as native_loops
from goldstone_cli.models.base import DynamicModel
from goldstone_cli.numerics import COMPILED, run_compiled, storage_unused, sum_squares, sum_squares_value
from goldstone_cli.optim.coupling import Coupling, quadratic_terms_
from goldstone_cli.optim.gauge import serial_cpu

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
METRICS = ("ll", "acc", "auc")


class RatingsLike(Protocol):
    """What the model needs from the data (``goldstone_cli.data.movielens.MovieLensData`` has it)."""

    user: np.ndarray  # (n,) int in [0, n_users)
    item: np.ndarray  # (n,) int in [0, n_items)
    t: np.ndarray  # (n,) int in [0, T)
    x: np.ndarray  # (n,) +1 / -1
    split: np.ndarray  # (n,) 0 train, 1 validation, 2 test
    n_users: int
    n_items: int
    T: int


# ----------------------------------------------------------------------------- the likelihood
class _LocalLoss(torch.autograd.Function):
    """``scale * sum_r softplus(-x_r u_ru . v_rv) + gamma/2 (||U||^2 + ||V||^2)`` (Eqs. 8-9).

    ``-log sigma(y) = softplus(-y)``. Rows are gathered chunk by chunk (``chunk`` ratings at a time)
    in the forward pass and gathered again in the backward pass, so memory stays O(chunk * d) on top
    of the parameters. ``ru``/``rv`` index the flattened ``(T*n_users, d)``/``(T*n_items, d)`` views.
    The float64 sum is returned in ``value_dtype`` (None: U's dtype); the incoming gradient is rounded
    to U's dtype, so the gradients do not depend on it."""

    @staticmethod
    def forward(ctx, U: Tensor, V: Tensor, ru: Tensor, rv: Tensor, x: Tensor, scale: float, gamma: float,
                chunk: int, value_dtype: Optional[torch.dtype] = None) -> Tensor:
        d = U.shape[-1]
        Uf, Vf = U.view(-1, d), V.view(-1, d)
        nll = torch.zeros((), dtype=torch.float64, device=U.device)
        for s in range(0, ru.numel(), chunk):  # chunks of ratings, not rows or time steps
            e = s + chunk
            logit = torch.einsum("nd,nd->n", Uf.index_select(0, ru[s:e]), Vf.index_select(0, rv[s:e]))  # (c,)
            nll += F.softplus(-x[s:e] * logit).sum(dtype=torch.float64)  # Eq. 8
        # gamma/2 ||Z||^2 of Eq. 9 over every row and bin, accumulated in float64 without a (T, N, d)
        # temporary (one float32 vector_norm was 11% low for ML-20M-shaped U, V at their initialization)
        reg = sum_squares_value(U) + sum_squares_value(V)
        ctx.save_for_backward(U, V, ru, rv, x)
        ctx.scale, ctx.gamma, ctx.chunk = scale, gamma, chunk
        return (scale * nll + 0.5 * gamma * reg).to(U.dtype if value_dtype is None else value_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        U, V, ru, rv, x = ctx.saved_tensors
        d = U.shape[-1]
        Uf, Vf = U.view(-1, d), V.view(-1, d)
        g = grad_out.to(U.dtype)
        gU = U.mul(g * ctx.gamma)  # (T, n_users, d): d/dU of gamma/2 ||U||^2, then the likelihood added in place
        gV = V.mul(g * ctx.gamma)  # (T, n_items, d)
        gUf, gVf = gU.view(-1, d), gV.view(-1, d)
        for s in range(0, ru.numel(), ctx.chunk):
            e = s + ctx.chunk
            iu, iv, xs = ru[s:e], rv[s:e], x[s:e]
            u, v = Uf.index_select(0, iu), Vf.index_select(0, iv)  # (c, d) each
            logit = torch.einsum("nd,nd->n", u, v)
            # d/dlogit softplus(-x logit) = -x sigmoid(-x logit)
            w = (-xs * torch.sigmoid(-xs * logit)) * (g * ctx.scale)  # (c,)
            gUf.index_add_(0, iu, v.mul_(w[:, None]))
            gVf.index_add_(0, iv, u.mul_(w[:, None]))
        return gU, gV, None, None, None, None, None, None, None


def bernoulli_local_loss(U: Tensor, V: Tensor, ru: Tensor, rv: Tensor, x: Tensor, gamma: float,
                         scale: float = 1.0, chunk: int = 1 << 20,
                         value_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``sum_t l(X_t; Z_t)`` of Eq. 9 for the ratings at flat rows ``ru`` of U and ``rv`` of V.

    ``ru = t * n_users + user``, ``rv = t * n_items + item`` (int64, shape (n,)), ``x`` in {+1, -1};
    the likelihood sum is multiplied by ``scale`` (``n_train / batch`` for a minibatch). The value is
    a float64 sum returned in ``value_dtype`` (default U's dtype; ``torch.float64`` keeps it whole, e.g.
    for a reported loss; the gradients are the same either way)."""
    return _LocalLoss.apply(U, V, ru, rv, x, float(scale), float(gamma), int(chunk), value_dtype)


class GradBuffer:
    """The storage of one parameter's gradient, handed out again at the next step once nothing else
    holds it (issue 16: a fresh multi-MB gradient every step cost page faults, 2x the step time).

    Only the untyped storage is kept, so the tensor returned by :meth:`get` is the only tensor on it
    and autograd adopts it as ``.grad`` without a copy. ``zero_grad(set_to_none=True)`` drops that
    tensor; if any other tensor still uses the storage (someone kept ``p.grad`` or a view of it),
    a new buffer is allocated instead, so a kept gradient is never overwritten."""

    def __init__(self) -> None:
        self._storage = None
        self._key = None

    def get(self, like: Tensor) -> Tensor:
        key = (like.shape, like.dtype, like.device)
        st = self._storage
        if st is not None and self._key == key and storage_unused(st):
            return torch.empty(0, dtype=like.dtype, device=like.device).set_(st, 0, like.shape)
        t = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self._storage, self._key = t.untyped_storage(), key
        return t


def _bin_cuts(U: Tensor, V: Tensor, ru: Tensor, rv: Tensor, grads: bool, min_ratings: int = 1 << 16) -> list[int]:
    """Where to split the ratings between the threads: at time-bin boundaries, so that no two
    threads add into the same row of gU or gV (a rating of bin t touches only bin t's rows of both).
    One range unless there are several threads, enough ratings, (T, N, d) parameters and ratings
    sorted by bin with the same bin on both sides (as the model's are)."""
    n, k = ru.numel(), torch.get_num_threads()
    if k < 2 or n < 2 * min_ratings:
        return [0, n]
    if grads and not (U.dim() == V.dim() == 3 and U.shape[0] == V.shape[0]):
        return [0, n]
    if not grads:  # values only: any split is safe
        return [n * i // k for i in range(k + 1)]
    tb = torch.div(ru, U.shape[1], rounding_mode="floor")
    if not (bool((tb[1:] >= tb[:-1]).all()) and torch.equal(tb, torch.div(rv, V.shape[1], rounding_mode="floor"))):
        return [0, n]
    targets = torch.tensor([n * i // k for i in range(1, k)])
    starts = torch.searchsorted(tb, tb[targets])  # the first rating of the bin each target falls in
    return sorted({0, n, *(int(c) for c in starts)})


def _ratings_kernel(Uf: Tensor, Vf: Tensor, iu: Tensor, iv: Tensor, x: Tensor, scale: float, gU: Tensor,
                    gV: Tensor) -> Tensor:
    """:func:`ratings_pass` with gradients as whole-tensor expressions for ``torch.compile``, which
    makes them one loop over the ratings (Inductor: the two row gathers, the dot product, softplus
    and sigmoid, and the scatter-adds as atomic adds into ``gU``, ``gV`` in place): each rating's rows
    read once and its gradient rows added once, no (ratings, d) temporary. Float64 sum (Eq. 8)."""
    u, v = Uf[iu], Vf[iv]
    mx = -x * (u * v).sum(-1)  # -x u.v
    nll = F.softplus(mx).sum(dtype=torch.float64)
    w = torch.sigmoid(mx) * (-x * scale)  # d/dlogit of scale softplus(-x logit)
    gU.index_add_(0, iu, v * w[:, None])
    gV.index_add_(0, iv, u * w[:, None])
    return nll


_COMPILED = COMPILED  # "ratings": the compiled kernel, or None once compiling failed
#: the eager ratings pass's gradient by device type: "bags" (one weighted row sum per run of equal
#: rows, :func:`_bag_gradients`; counted 1.70x of the ML-20M step's bound on a GPU, 2.05x before) or
#: "scatter" (each rating's scaled rows scatter-added; bench/roofline.py times both on a GPU)
RATINGS_GRADIENT = {"cpu": "bags", "cuda": "bags"}


def _runs(rows: Tensor, chunk: int) -> list[tuple[int, int, Tensor, Tensor]]:
    """Runs of equal values in ``rows``, cut at run boundaries into chunks of about ``chunk`` entries
    (every run of a chunk starts within ``chunk`` entries of the chunk's start): per chunk ``(start,
    stop, row of each run, first entry of each run minus start)``, the last two as ``F.embedding_bag``
    takes them."""
    n = rows.numel()
    if n == 0:
        return []
    vals, counts = torch.unique_consecutive(rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # (runs,) first entry of each run
    marks = torch.arange(0, n, chunk, device=rows.device)
    cuts = sorted({0, vals.numel(), *torch.searchsorted(starts, marks).tolist()})  # run indices
    at = torch.cat([starts, starts.new_tensor([n])])[cuts].tolist()  # their first entries (one sync)
    return [(a, b, vals[c0:c1], starts[c0:c1] - a) for a, b, c0, c1 in zip(at[:-1], at[1:], cuts[:-1], cuts[1:])]


class RatingGroups:
    """The ratings of one step grouped by row for the eager gradient pass (:func:`_bag_gradients`):
    the runs of equal U row in rating order (the model's ratings are sorted by it) and, through a
    stable sort, the runs of equal V row. Each run's gradient row is one weighted sum of the other
    side's rows (``F.embedding_bag``), added once, instead of one scaled (ratings, d) temporary per
    side scatter-added rating by rating (issue 16: 64d bytes per rating on a GPU, now about 36d).
    Built on first use and kept (the model keeps the full batch's); 2 int64 per rating."""

    def __init__(self, ru: Tensor, rv: Tensor, chunk: int):
        self.ru, self.rv, self.chunk = ru, rv, int(chunk)

    def matches(self, ru: Tensor, rv: Tensor, chunk: int) -> bool:
        return ru is self.ru and rv is self.rv and chunk == self.chunk

    @functools.cached_property
    def u_runs(self) -> list[tuple[int, int, Tensor, Tensor]]:
        return _runs(self.ru, self.chunk)

    @functools.cached_property
    def v_order(self) -> Tensor:  # (n,) the ratings by V row
        return torch.sort(self.rv, stable=True).indices

    @functools.cached_property
    def v_cols(self) -> Tensor:  # (n,) their U rows in that order
        return self.ru.index_select(0, self.v_order)

    @functools.cached_property
    def v_runs(self) -> list[tuple[int, int, Tensor, Tensor]]:
        return _runs(self.rv.index_select(0, self.v_order), self.chunk)


def _bag_gradients(Uf: Tensor, Vf: Tensor, rv: Tensor, w: Tensor, gUf: Tensor, gVf: Tensor,
                   groups: RatingGroups) -> None:
    """``gU[i] += sum_{r: ru_r = i} w_r V[rv_r]`` and ``gV[j] += sum_{r: rv_r = j} w_r U[ru_r]``
    (the likelihood part of Eq. 9's gradient, ``w`` = d/dlogit), one weighted row sum per run of
    :class:`RatingGroups` and one add per distinct row (no index repeats: deterministic on a GPU)."""
    Ud, Vd = Uf.detach(), Vf.detach()  # weights without grad: embedding_bag's forward-only kernel
    for s, e, rows, offsets in groups.u_runs:
        gUf.index_add_(0, rows, F.embedding_bag(rv[s:e], Vd, offsets, mode="sum", per_sample_weights=w[s:e]))
    for s, e, rows, offsets in groups.v_runs:
        wv = w.index_select(0, groups.v_order[s:e])
        gVf.index_add_(0, rows, F.embedding_bag(groups.v_cols[s:e], Ud, offsets, mode="sum", per_sample_weights=wv))


def _rating_out_of_range(r: int, ru: Tensor, rv: Tensor, nu: int, nv: int):
    raise IndexError(f"rating {r} points at row {int(ru[r])} of U ({nu} rows) and {int(rv[r])} of V ({nv} rows): "
                     f"out of range")


def _check_rating_rows(ru: Tensor, rv: Tensor, nu: int, nv: int) -> None:
    """IndexError naming the first rating whose row lies outside U's ``nu`` or V's ``nv`` rows: one
    aminmax per index vector and one sync (2M ratings, d = 30: 0.8-1.3 ms, 0.7% of the pass)."""
    if ru.numel():
        (lu, hu), (lv, hv) = torch.stack([torch.stack(torch.aminmax(ru)), torch.stack(torch.aminmax(rv))]).tolist()
        if lu < 0 or hu >= nu or lv < 0 or hv >= nv:
            bad = (ru < 0) | (ru >= nu) | (rv < 0) | (rv >= nv)
            _rating_out_of_range(int(torch.nonzero(bad)[0, 0]), ru, rv, nu, nv)


@torch.no_grad()  # the gradient is computed here, added into gU, gV: no graph
def ratings_pass(U: Tensor, V: Tensor, ru: Tensor, rv: Tensor, x: Tensor, scale: float, gU: Tensor | None,
                 gV: Tensor | None, chunk: int = 1 << 20, native: bool = True, compiled: bool = False,
                 groups: RatingGroups | None = None) -> Tensor:
    """``sum_r softplus(-x_r u_ru . v_rv)`` (Eq. 8; float64 scalar) and, if ``gU`` is given, the
    gradient of ``scale`` times it added into ``gU``, ``gV`` (rows of the flattened (T*N, d) views).
    Float32 CPU
    tensors run the native loop ``gs_bernoulli_ratings_f32`` (goldstone_cli/kernels: each rating's
    two rows read once, its gradient added in rating order); elsewhere, with
    gradients and ``compiled`` (``trainer.compile``), one ``torch.compile``d loop over all ratings
    (:func:`_ratings_kernel`; the scatter-adds' order is then the compiler's); anything else (or
    ``native=False``) the chunked PyTorch loop below: the dot products chunk by chunk, then the
    gradient one row sum per run of equal rows (:func:`_bag_gradients` with ``groups``, a
    :class:`RatingGroups` of these ratings, built here if not given; :data:`RATINGS_GRADIENT`);
    the same numbers up to float rounding. Row indices out of range are an IndexError before
    anything is added into ``gU``, ``gV``; ``gU`` and ``gV`` sharing memory with each other or with an
    input (the pass adds into them while it reads the inputs) a ValueError (O(1), as
    ``coupling.quadratic_terms_``'s ``out``)."""
    if U.dim() < 1 or V.dim() < 1 or V.shape[-1] != U.shape[-1]:
        raise ValueError(f"U (..., d) and V (..., d) need the same last dimension d, got {tuple(U.shape)} and "
                         f"{tuple(V.shape)}")
    d = U.shape[-1]
    nu, nv = math.prod(U.shape[:-1]), math.prod(V.shape[:-1])  # rows of the flat (nu, d) / (nv, d) views
    if not (ru.shape == rv.shape == x.shape and ru.dim() == 1):
        raise ValueError(f"ru, rv and x must be vectors of one length, got {tuple(ru.shape)}, {tuple(rv.shape)}, "
                         f"{tuple(x.shape)}")
    if (gU is None) != (gV is None) or (gU is not None and (gU.shape != U.shape or gV.shape != V.shape)):
        raise ValueError("gU and gV must both be given, shaped like U and V, or both be None")
    if gU is not None:  # gU is gV (or gU = U, ...) was accepted and silently wrong: refused, O(1)
        native_loops.refuse_overlap({"gU": gU, "gV": gV}, {"U": U, "V": V, "ru": ru, "rv": rv, "x": x},
                                    "the ratings pass")
    if native and native_loops.usable(U, V, x, gU, gV) and native_loops.usable(ru, rv, dtype=torch.int64):
        lib = native_loops.library()
        if lib is not None:
            _check_rating_rows(ru, rv, nu, nv)  # all of them first: the C loop adds as it goes
            p, i64 = native_loops.ptr, native_loops.i64p
            ptrs = (p(U), p(V), p(ru, i64), p(rv, i64), p(x))

            def part(s: int, e: int) -> float:  # ratings [s, e); a bad row index (checked above) stops it
                nll = lib.gs_bernoulli_ratings_f32(*ptrs[:2], p(ru[s:], i64), p(rv[s:], i64), p(x[s:]), e - s, d,
                                                   nu, nv, scale, p(gU), p(gV))
                if nll < 0:  # a sum of softplus values is >= 0: the loop stopped at a bad row index
                    _rating_out_of_range(s + int(-1.0 - nll), ru, rv, nu, nv)
                return nll

            parts = native_loops.parallel_ranges(part, _bin_cuts(U, V, ru, rv, gU is not None))
            if gU is not None:  # written through their pointers: autograd must see them modified
                torch.autograd.graph.increment_version((gU, gV))
            return torch.tensor(sum(parts), dtype=torch.float64)
    if d == 0:  # no numbers in the gradients (and embedding_bag refuses rows of 0 numbers)
        gU = gV = None
    Uf, Vf = U.view(nu, d), V.view(nv, d)
    if compiled and gU is not None and ru.numel():
        nll = run_compiled("ratings", _ratings_kernel, "ratings pass", Uf, Vf, ru, rv, x, scale, gU.view(nu, d),
                           gV.view(nv, d))
        if nll is not None:
            return nll
    nll = torch.zeros((), dtype=torch.float64, device=U.device)
    bags = gU is not None and RATINGS_GRADIENT.get(U.device.type, "bags") == "bags"
    w = torch.empty_like(x) if bags else None  # (n,) d/dlogit of scale softplus(-x logit)
    gUf, gVf = (gU.view(nu, d), gV.view(nv, d)) if gU is not None else (None, None)
    for s in range(0, ru.numel(), chunk):  # chunks of ratings, not rows or time steps
        e = s + chunk
        iu, iv, xs = ru[s:e], rv[s:e], x[s:e]
        u, v = Uf.index_select(0, iu), Vf.index_select(0, iv)  # (c, d) each
        mx = torch.einsum("nd,nd->n", u, v).mul_(-xs)  # (c,) -x u.v
        nll += F.softplus(mx).sum(dtype=torch.float64)  # Eq. 8: -log sigma(y) = softplus(-y)
        if gU is None:
            continue
        ws = torch.sigmoid(mx, out=w[s:e] if bags else mx).mul_(xs).mul_(-scale)  # d/dlogit: -x sigmoid(-x logit)
        if not bags:  # "scatter": the other side's row, scaled, added rating by rating
            with serial_cpu(ws):  # CPU index_add_ ran 10x faster on one thread than on two (issue 16)
                gUf.index_add_(0, iu, v.mul_(ws[:, None]))
                gVf.index_add_(0, iv, u.mul_(ws[:, None]))
    if bags and ru.numel():
        if groups is None or not groups.matches(ru, rv, chunk):
            groups = RatingGroups(ru, rv, chunk)
        _bag_gradients(Uf, Vf, rv, w, gUf, gVf, groups)  # on all threads: 1.3-1.6x faster than on one
    return nll


class _FusedLoss(torch.autograd.Function):
    """``(local, psi)`` of Eqs. 6, 8, 9 for (U, V), with the gradient computed in the forward pass.

    One pass over the ratings gathers each rating's two rows once, adds its term of Eq. 8 and
    scatter-adds its gradient; one cache-blocked pass per parameter (``coupling.quadratic_terms_``)
    gives ``gamma/2 ||Z||^2``, psi and the gradient ``gamma Z + L @ Z`` into a reused buffer
    (:class:`GradBuffer`). The backward pass only hands the buffers to autograd (scaled in place if
    the two outputs are weighted differently). Same values and gradient as ``local_loss() + psi()``
    (the chunked ``_LocalLoss`` and ``Coupling.psi``) up to float rounding; tests compare them. Both
    values are float64 sums, returned in ``value_dtype`` (default float64: the reported loss carries no
    float32 rounding); the incoming gradients are rounded to the parameters' dtype, so the gradients
    are those of values of the parameters' dtype, bit for bit."""

    @staticmethod
    def forward(ctx, U: Tensor, V: Tensor, ru: Tensor, rv: Tensor, x: Tensor, scale: float, gamma: float,
                chunk: int, coupling: Coupling, buffers: tuple, need_grad: bool, compiled: bool = False,
                native: bool = True, groups: RatingGroups | None = None,
                value_dtype: torch.dtype = torch.float64):
        gU = buffers[0].get(U) if need_grad else None
        gV = buffers[1].get(V) if need_grad else None
        sq_u, psi_u = quadratic_terms_(U, coupling, gamma, gU, compiled=compiled, native=native)  # gU <- gamma U + L U
        sq_v, psi_v = quadratic_terms_(V, coupling, gamma, gV, compiled=compiled, native=native)
        nll = ratings_pass(U, V, ru, rv, x, scale, gU, gV, chunk, native, compiled, groups)  # Eq. 8, its gradient
        if need_grad:
            ctx.grads = (gU, gV)
            ctx.coupling, ctx.gamma = coupling, gamma
            ctx.save_for_backward(U, V)
        local = scale * nll + 0.5 * gamma * (sq_u + sq_v)  # Eq. 9, summed over t
        ctx.dt = U.dtype
        # float64 sums kept float64 (VALUE_DTYPE): no float32 rounding in the reported loss and psi
        return local.to(value_dtype), (psi_u + psi_v).to(value_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_local: Tensor, g_psi: Tensor):
        if not hasattr(ctx, "grads"):
            raise RuntimeError("the MovieLens loss was computed without gradients (under no_grad)")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("backward through the MovieLens loss twice: compute loss_terms() again")
        # rounded to the parameters' dtype first: float64 values (value_dtype) get the gradients that
        # values of the parameters' dtype got, bit for bit
        gl, gp = float(g_local.to(ctx.dt)), float(g_psi.to(ctx.dt))
        if gl != 1.0 or gp != 1.0:  # buffers hold gamma Z + lik + L Z: weight as gl (gamma Z + lik) + gp L Z
            for G, Z in zip(grads, ctx.saved_tensors):
                G.mul_(gl)
                if gp != gl:
                    G.add_(ctx.coupling.laplacian_apply(Z.detach()), alpha=gp - gl)
        gU, gV = grads
        del grads
        return gU, gV, None, None, None, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- metrics
def auc_score(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties given average ranks.

    ``scores`` (n,), ``positive`` (n,) bool. O(n log n), no Python loop; NaN if a class is empty."""
    n = scores.numel()
    n_pos = int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of the last member of each tie group
    mean_rank = last - (counts.to(torch.float64) - 1.0) / 2.0  # (groups,)
    rank_sum = mean_rank[group][positive[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(logit: Tensor, x: Tensor) -> dict[str, float]:
    """Mean log-likelihood per rating (Eq. 8), accuracy of ``sign(logit)`` and AUC."""
    if logit.numel() == 0:
        return {"ll": float("nan"), "acc": float("nan"), "auc": float("nan")}
    ll = -F.softplus(-x * logit).sum(dtype=torch.float64) / logit.numel()
    pred = torch.where(logit > 0, 1.0, -1.0).to(x.dtype)
    acc = (pred == x).sum(dtype=torch.float64) / logit.numel()
    return {"ll": float(ll), "acc": float(acc), "auc": auc_score(logit, x > 0)}


# ----------------------------------------------------------------------------- the model
class SparseDynamicBernoulliMF(DynamicModel):
    """Paper Eqs. 6, 8, 9 on binarized, time-binned ratings (see the module docstring).

    Args:
        data: ratings (``MovieLensData`` or anything with the fields of :class:`RatingsLike`).
        d: embedding dimension (paper: 30).
        coupling: lambda of Eq. 6 (paper: 10).
        gamma: the local regularizer of Eq. 9 (paper: 1).
        init_scale: standard deviation of the i.i.d. normal initialization.
        batch_size: ``None`` for full-batch gradients (paper); else the number of training ratings
            drawn uniformly with replacement per step, the likelihood scaled by n_train / batch_size
            (an unbiased estimate; the gamma term and psi stay exact).
        chunk_size: ratings gathered at once (memory: about ``4 chunk_size d`` numbers).
        seed: initialization seed (initialized in float32 on the CPU, then cast and moved, so the
            same seed gives the same start on every device).
        items: with a sharded ``shard``, ``"sharded"`` (each rank holds a block of the item rows and
            gathers all of them every step) or ``"replicated"`` (each rank holds all of V and
            all-reduces its gradient); ignored on one process.
    """

    target_metric = "val_ll"
    target_lower_is_better = False
    best_metric = "val_ll"
    best_lower_is_better = False
    headline_metrics = (("test_ll", "test LL/rating"), ("test_auc", "test AUC"), ("val_ll", "validation LL/rating"))
    #: the dtype of the loss terms (``loss_terms``, ``local_loss``, ``psi``): float64 whatever the
    #: parameters' dtype. The likelihood, gamma term and psi are float64 sums; kept float64 and added in
    #: float64, the reported loss carries no float32 rounding (up to 6e-8 relative: about 0.5 at the
    #: full-batch loss of ML-20M's 20M ratings, about 1e7 at the start). Scalars only: the incoming
    #: scalar gradients are rounded to the parameters' dtype, so the gradients are bit for bit those of
    #: float32 terms and the step costs the same.
    VALUE_DTYPE = torch.float64

    def __init__(self, data: RatingsLike, d: int = 30, coupling: float = 10.0, gamma: float = 1.0,
                 init_scale: float = 0.1, batch_size: Optional[int] = None, chunk_size: int = 1 << 20,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 shard: Optional[RowShard] = None, items: str = "sharded"):
        super().__init__()
        if items not in ("sharded", "replicated"):
            raise ValueError(f"items must be 'sharded' or 'replicated', got {items!r}")
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        T, n_users, n_items = int(data.T), int(data.n_users), int(data.n_items)
        _check_ratings(data)
        self.T, self.n_users, self.n_items, self.d = T, n_users, n_items, d
        self.gamma = float(gamma)
        self.batch_size = batch_size
        self.chunk_size = int(chunk_size)
        device = torch.device(device)

        self.shard = shard if shard is not None else RowShard.single()
        self.items_replicated = self.shard.distributed and items == "replicated"
        self.compile_steps = False  # trainer.compile: the gamma / psi pass through torch.compile
        self.native = True  # the C loops of goldstone_cli/kernels where available (GOLDSTONE_NATIVE)
        if self.shard.distributed:
            self._init_sharded(data, init_scale, seed, dtype, device)
            self.coupling = Coupling.chain(T, coupling)  # Eq. 6 / Eq. 7
            return
        g = torch.Generator().manual_seed(int(seed))
        self.U = nn.Parameter(
            (init_scale * torch.randn(T, n_users, d, generator=g)).to(device=device, dtype=dtype))  # (T, n_users, d)
        self.V = nn.Parameter(
            (init_scale * torch.randn(T, n_items, d, generator=g)).to(device=device, dtype=dtype))  # (T, n_items, d)
        self.coupling = Coupling.chain(T, coupling)  # Eq. 6 / Eq. 7
        self._grad_buffers = (GradBuffer(), GradBuffer())  # reused storage of U.grad, V.grad

        self._splits: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        user = np.asarray(data.user, dtype=np.int64)
        item = np.asarray(data.item, dtype=np.int64)
        tbin = np.asarray(data.t, dtype=np.int64)
        split = np.asarray(data.split)
        for name, code in SPLIT_CODES.items():
            m = split == code
            ru = tbin[m] * n_users + user[m]  # (n_split,) flat row of U
            rv = tbin[m] * n_items + item[m]  # (n_split,) flat row of V
            x = np.asarray(data.x)[m]
            if name == "train":  # bin-major, then user: the gathers and scatter-adds walk memory in order
                order = np.argsort(ru, kind="stable")
                ru, rv, x = ru[order], rv[order], x[order]
            self._splits[name] = (torch.from_numpy(ru).to(device), torch.from_numpy(rv).to(device),
                                  torch.from_numpy(x.astype(np.float32)).to(device=device, dtype=dtype))
        self.n_train = int(self._splits["train"][0].numel())
        self._train_groups = RatingGroups(*self._splits["train"][:2], self.chunk_size)  # built if used
        if self.n_train == 0:
            raise ValueError("the data have no training ratings (split == 0); check the split fractions")

    def set_compile(self, on: bool) -> None:
        """``trainer.compile``: run the gamma term / psi pass and the ratings pass of each step
        through ``torch.compile`` where the native C loops do not run (a GPU, no compiler,
        ``GOLDSTONE_NATIVE=0``, float64); falls back to the eager passes, with a warning, where
        compiling fails."""
        self.compile_steps = bool(on)

    # ------------------------------------------------------------------ DynamicModel interface
    def symmetric_groups(self) -> list[list[nn.Parameter]]:
        return [[self.U, self.V]]

    def sharded_params(self) -> dict[str, int]:
        if not self.shard.distributed:
            return {}
        return {"U": self.n_users} if self.items_replicated else {"U": self.n_users, "V": self.n_items}

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.V] if self.items_replicated else []

    def reduce_gradients(self) -> None:
        """``items="replicated"``: sum V's gradient over the ranks (each rank's holds its users'
        likelihood; rank 0's also V's prior and psi), so that every rank takes the same step."""
        if self.items_replicated and self.V.grad is not None:
            self.shard.all_reduce_sum_(self.V.grad, float64=False)  # W numbers per entry

    def _all_items(self, gather) -> Tensor:
        """All of V on this rank: itself when replicated, else gathered (``gather``)."""
        return self.V if self.items_replicated or not self.shard.distributed else gather(self.V, self.n_items)

    def psi(self) -> Tensor:
        """Eq. 6's coupling, a :data:`VALUE_DTYPE` scalar (``Coupling.psi``'s float64 sums kept, the
        gradients unchanged); with replicated items V's part is counted on rank 0 only (psi of a group
        is the sum of its tensors' psi)."""
        mine = [self.U] if self.items_replicated and not self.shard.is_main() else [self.U, self.V]
        return self.coupling.psi(mine, self.VALUE_DTYPE)

    def _batch(self, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor, float]:
        """The training ratings of this step (all, or a minibatch drawn from ``generator``) and the
        likelihood's scale."""
        ru, rv, x = self._splits["train"]
        scale = 1.0
        if self.batch_size is not None and self.batch_size < self.n_train:
            idx = torch.randint(self.n_train, (self.batch_size,), generator=generator, device=ru.device)
            idx = torch.sort(idx).values  # keep the memory order of the sorted training ratings
            ru, rv, x = ru[idx], rv[idx], x[idx]
            scale = self.n_train / self.batch_size  # unbiased estimate of the full likelihood sum
        return ru, rv, x, scale

    def local_loss(self, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.shard.distributed:
            return self._local_loss_sharded(generator)
        ru, rv, x, scale = self._batch(generator)
        return bernoulli_local_loss(self.U, self.V, ru, rv, x, self.gamma, scale, self.chunk_size, self.VALUE_DTYPE)

    def loss_terms(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """``local + psi`` in one fused pass (:class:`_FusedLoss`); equal to the base class's
        ``local_loss() + psi()`` up to float rounding, about 3x faster (bench/roofline.py).
        Sharded: this rank's ``local_loss() + psi()`` (the fused pass works on one process's rows)."""
        if self.shard.distributed:
            return super().loss_terms(generator)
        ru, rv, x, scale = self._batch(generator)
        need_grad = torch.is_grad_enabled() and (self.U.requires_grad or self.V.requires_grad)
        local, psi = _FusedLoss.apply(self.U, self.V, ru, rv, x, float(scale), self.gamma, self.chunk_size,
                                      self.coupling, self._grad_buffers, need_grad, self.compile_steps,
                                      self.native, self._train_groups, self.VALUE_DTYPE)
        return {"total": local + psi, "local": local, "psi": psi}

    @torch.no_grad()
    def logits(self, split: str) -> Tensor:
        """``u_t,i . v_t,j`` for every rating of ``split`` ('train', 'val', 'test'): shape (n_split,).
        Sharded: the ratings of this rank's users."""
        ru, rv, _ = self._splits[split]
        V = self._all_items(self.shard.all_gather_rows)  # all items (self.V on one process)
        Uf, Vf = self.U.view(-1, self.d), V.reshape(-1, self.d)
        out = torch.empty(ru.numel(), dtype=self.U.dtype, device=self.U.device)  # (n_split,)
        for s in range(0, ru.numel(), self.chunk_size):
            e = s + self.chunk_size
            out[s:e] = torch.einsum("nd,nd->n", Uf.index_select(0, ru[s:e]), Vf.index_select(0, rv[s:e]))
        return out

    def metric_names(self) -> list[str]:
        return [f"{split}_{m}" for split in ("val", "test") for m in METRICS]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out mean log-likelihood per rating, accuracy and AUC on validation and test."""
        out: dict[str, float] = {}
        for split in ("val", "test"):
            logit, x = self.logits(split), self._splits[split][2]
            if self.shard.distributed:  # every rank's ratings: the metrics (AUC ranks) are global
                logit, x = self.shard.all_gather_varlen(logit), self.shard.all_gather_varlen(x)
            res = binary_metrics(logit, x)
            out.update({f"{split}_{k}": v for k, v in res.items()})
        return out

    def split_sizes(self) -> dict[str, int]:
        return {k: int(v[0].numel()) for k, v in self._splits.items()}

    # ------------------------------------------------------------------ row sharding
    def _init_sharded(self, data: RatingsLike, init_scale: float, seed: int, dtype: torch.dtype,
                      device: torch.device) -> None:
        """This rank's blocks of U (users) and V (items) of the one-process initialization, the
        ratings of its users, and where its training ratings sit in the global training order."""
        T, n_users, n_items, sh = self.T, self.n_users, self.n_items, self.shard
        g = torch.Generator().manual_seed(int(seed))
        U = init_scale * torch.randn(T, n_users, d := self.d, generator=g)  # the one-process draws, in order
        V = init_scale * torch.randn(T, n_items, d, generator=g)
        self.U = nn.Parameter(sh.take(U).to(device=device, dtype=dtype).contiguous())  # (T, my users, d)
        V = V if self.items_replicated else sh.take(V)  # (T, all items, d) or (T, my items, d)
        self.V = nn.Parameter(V.to(device=device, dtype=dtype).contiguous())
        del U, V
        u0, u1 = sh.rows(n_users)
        n_local = u1 - u0
        held = getattr(data, "user_rows", None)  # UserRatings: only the users [held[0], held[1])
        if held is not None and tuple(held) != (u0, u1):
            raise ValueError(f"rank {sh.rank} holds the ratings of users {tuple(held)}, but its block is {(u0, u1)}")
        mine = ratings_of_users(data, u0, u1)
        user, item = data.user[mine] - u0, data.item[mine]
        tbin, split, xs = data.t[mine], np.asarray(data.split)[mine], np.asarray(data.x)[mine]
        self._splits = {}
        for name, code in SPLIT_CODES.items():
            m = split == code
            ru = tbin[m] * n_local + user[m]  # (n_split,) flat row of this rank's U
            rv = tbin[m] * n_items + item[m]  # (n_split,) flat row of the gathered V
            x = xs[m]
            if name == "train":  # (bin, user) order: this rank's part of the one-process order
                order = np.argsort(ru, kind="stable")
                ru, rv, x = ru[order], rv[order], x[order]
            self._splits[name] = (torch.from_numpy(ru).to(device), torch.from_numpy(rv).to(device),
                                  torch.from_numpy(x.astype(np.float32)).to(device=device, dtype=dtype))
        # the one-process training order is bin-major, then user, so rank r's ratings of bin t form one
        # contiguous run of it: from the counts of every (bin, rank), where each run starts
        counts = torch.zeros(sh.world, T, dtype=torch.int64)
        counts[sh.rank] = torch.from_numpy(np.bincount(tbin[split == 0], minlength=T).astype(np.int64))
        counts = sh.all_reduce_sum_(counts.to(sh.device or "cpu")).cpu()  # (world, T); NCCL needs CUDA tensors
        starts = (torch.cumsum(counts.T.reshape(-1), 0) - counts.T.reshape(-1)).view(T, sh.world)  # (T, world)
        self.n_train = int(counts.sum())
        self._local_train = int(counts[sh.rank].sum())
        self._bin_start = starts[:, 0].contiguous().to(device)  # (T,) global start of bin t
        self._my_start = starts[:, sh.rank].to(device)  # (T,) global start of my run in bin t
        self._my_count = counts[sh.rank].to(device)  # (T,)
        self._my_local_start = (torch.cumsum(counts[sh.rank], 0) - counts[sh.rank]).to(device)  # (T,)
        if self.n_train == 0:
            raise ValueError("the data have no training ratings (split == 0); check the split fractions")

    def _local_loss_sharded(self, generator: Optional[torch.Generator]) -> Tensor:
        """This rank's share of Eq. 9: the likelihood of its users' ratings (against all of V, gathered)
        and gamma/2 of its own rows of U and V."""
        ru, rv, x = self._splits["train"]
        scale = 1.0
        if self.batch_size is not None and self.batch_size < self.n_train:
            # the one-process draw (same generator state on every rank), then the draws on my users
            idx = torch.randint(self.n_train, (self.batch_size,), generator=generator, device=ru.device)
            idx = torch.sort(idx).values
            t = torch.searchsorted(self._bin_start, idx, right=True) - 1  # bin of each draw
            off = idx - self._my_start[t]
            keep = (off >= 0) & (off < self._my_count[t])
            local = self._my_local_start[t[keep]] + off[keep]  # positions in this rank's sorted ratings
            ru, rv, x = ru[local], rv[local], x[local]
            scale = self.n_train / self.batch_size
        V = self._all_items(self.shard.gather_rows)  # (T, n_items, d)
        nll = bernoulli_local_loss(self.U, V, ru, rv, x, 0.0, scale, self.chunk_size, torch.float64)
        reg = sum_squares(self.U)  # float64; each rank its own rows, once (replicated V: on rank 0)
        if not self.items_replicated or self.shard.is_main():
            reg = reg + sum_squares(self.V)
        return (nll + 0.5 * self.gamma * reg).to(self.VALUE_DTYPE)  # float64 sums, added in float64


def ratings_of_users(data: RatingsLike, start: int, stop: int) -> np.ndarray:
    """Indices (file order) of the ratings of users ``start <= user < stop``: one rank's rows."""
    user = np.asarray(data.user)
    return np.flatnonzero((user >= start) & (user < stop))


def _check_ratings(data: RatingsLike) -> None:
    """Clear errors for arrays that cannot be MovieLens ratings of this shape."""
    n = np.asarray(data.x).shape[0]
    for name in ("user", "item", "t", "split"):
        a = np.asarray(getattr(data, name))
        if a.shape != (n,):
            raise ValueError(f"data.{name} has shape {a.shape}, expected ({n},) like data.x")
    for name, hi in (("user", data.n_users), ("item", data.n_items), ("t", data.T)):
        a = np.asarray(getattr(data, name))
        if n and (a.min() < 0 or a.max() >= hi):
            raise ValueError(f"data.{name} must lie in [0, {hi}), got [{a.min()}, {a.max()}]")
    if n and not (np.abs(np.asarray(data.x)) == 1).all():
        raise ValueError("data.x must hold binarized ratings +1 / -1 (Eq. 8)")
    split = np.asarray(data.split)
    if n and (split.min() < 0 or split.max() > 2):
        raise ValueError("data.split must be 0 (train), 1 (validation) or 2 (test)")

