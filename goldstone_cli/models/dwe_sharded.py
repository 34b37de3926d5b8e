"""Dynamic Word Embeddings with word rows and context rows sharded across ranks (issue 17).

The model is the one of ``dwe.py`` (same likelihood, prior, variational family and parameter
names); only where the rows live changes. With a :class:`~goldstone_cli.distributed.shard.RowShard`
of ``world`` ranks, rank r holds its block of the V words (``RowShard.rows(V)``) of every
(T, V, d) tensor: the word embeddings (``mu_U`` / ``U``), the context embeddings (``mu_V`` /
``V_``) and (variational) the Cholesky factors of both. It holds the training counts of its words
only (its rows of every n+_t), the row sums c (T, V) of all words (the negatives' c^0.75 needs
every context's count) and its rows of the held-out sets.

One step on a minibatch (``rows`` words x ``cols`` contexts, drawn from the same generator on every
rank, so the draw does not depend on the rank count; the variational noise likewise):

- each rank takes the minibatch words it owns and forms their samples u (T, P_r, d);
- each rank forms the samples v of the minibatch contexts it owns; one ``all_gather`` makes the
  (T, Q, d) context block of the whole minibatch on every rank (:class:`_GatherSegments`);
- each rank computes the likelihood of its P_r x Q block; in the backward pass the gradient of
  the gathered block is reduce-scattered back to the owners of the contexts.

So a step moves 2 T Q d numbers (gather + reduce-scatter), independent of V for a fixed minibatch
size; the word rows never move. Why not
DTensor / FSDP2: the minibatch touches a random subset of rows of each sharded table, which
``Shard(1)`` redistribution cannot express without gathering whole tables (T V d per step); FSDP2
all-gathers whole parameters. ``local_loss``, ``psi`` and the gradients are this rank's share
(summed over ranks they are the one-process values); ``evaluate`` returns global metrics on every
rank.

Data (``goldstone_cli.models.dwe_split``): the held-out thinning of ``dwe.split_counts`` draws over
the upper triangle of each whole symmetric matrix, so on several ranks rank 0 runs the split once
and stores it by word rows next to the prepared corpus (``by_word-<key>/``, checksummed); every
rank then copies only its words' rows out of the memory-mapped files (about 1/world of the counts).
Without a prepared folder, or where that folder cannot be written, every rank reads each step's
count file once and keeps its rows: one full step in memory at a time, not T.

Initialization: drawn for the GLOBAL problem from ``seed`` exactly as ``DynamicWordEmbeddings``
draws it (each rank keeps its rows), so a sharded run starts where a one-process run starts. A
tensor of more than ``FULL_INIT_MAX`` numbers is drawn one time step at a time instead (no rank
ever holds a whole (T, V, d) draw; the start then differs from the one-process model's draw, but
still not with the rank count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from goldstone_cli.distributed import collective
from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.models.base import DynamicModel
from goldstone_cli.models.dwe_split import HeldOut, StepSource, load_rows_distributed, split_rows
from goldstone_cli.models.dwe import (
    DynamicWordEmbeddings,
    WordCounts,
    _matvec64,
    _pooled_randn,
    block_positives,
    chain_terms,
    cosine_quantiles,
    draw_minibatch,
    prior_precision,
    register_counts,
    skipgram_block_fused,
)
from goldstone_cli.numerics import sum_squares
from goldstone_cli.optim.coupling import Coupling

#: tensors with at most this many numbers are initialized by one global draw (like dwe.py)
FULL_INIT_MAX = 1 << 27


# ============================================================================ collectives
class _GatherSegments(torch.autograd.Function):
    """Concatenate along dim 1 the (T, k_r, d) blocks of all ranks (rank order), k_r known on
    every rank; the backward pass reduce-scatters the gradient back to the blocks' owners."""

    @staticmethod
    def forward(ctx, local: Tensor, shard: RowShard, sizes: tuple[int, ...]) -> Tensor:
        ctx.shard, ctx.sizes = shard, sizes
        k = max(sizes)
        T, _, d = local.shape
        padded = local.new_zeros(T, k, d)
        padded[:, : local.shape[1]] = local
        out = local.new_empty(shard.world * T, k, d)
        collective.run(collective.all_gather_single, out, padded, group=shard.group)
        out = out.view(shard.world, T, k, d)
        return torch.cat([out[r, :, :n] for r, n in enumerate(sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard, sizes = ctx.shard, ctx.sizes
        k = max(sizes)
        T, _, d = grad.shape
        full = grad.new_zeros(shard.world, T, k, d)
        pos = 0
        for r, n in enumerate(sizes):
            full[r, :, :n] = grad[:, pos:pos + n]
            pos += n
        out = grad.new_empty(T, k, d)
        collective.run(collective.reduce_scatter_single, out, full.view(shard.world * T, k, d), op=dist.ReduceOp.SUM,
                       group=shard.group)
        return out[:, : sizes[shard.rank]], None, None


def gather_segments(local: Tensor, shard: RowShard, sizes: Sequence[int]) -> Tensor:
    if not shard.distributed:
        return local
    return _GatherSegments.apply(local, shard, tuple(int(s) for s in sizes))


# ============================================================================ model
class ShardedDynamicWordEmbeddings(DynamicModel):
    """``DynamicWordEmbeddings`` with its word and context rows sharded by ``shard`` (see the module
    docstring). With ``RowShard.single()`` it computes what the one-process model computes.

    ``by_word``: on several ranks, read this rank's rows of the split from the by-word folder of a
    prepared corpus (written by rank 0 on first use; ``False``: every rank splits from the count
    files). ``progress``: a progress bar while rank 0 writes that folder. ``data_bytes_read``: the
    bytes this rank copied out of the folder (0 when it split from the count files).
    ``before_parameters(nnz_local)``: called on every rank once its rows of the split are read (with
    its stored training nonzeros), before any count tensor or parameter is made: the memory check of
    ``build_sharded_dwe`` (collectives inside: every rank calls it at the same point)."""

    target_metric = DynamicWordEmbeddings.target_metric
    target_lower_is_better = DynamicWordEmbeddings.target_lower_is_better
    best_metric = None
    best_lower_is_better = False
    headline_metrics = DynamicWordEmbeddings.headline_metrics
    #: the dtype of the loss terms (``local_loss``, ``psi``, ``loss_terms``), as DynamicWordEmbeddings':
    #: float64 sums kept float64 whatever the parameters' dtype (the incoming scalar gradients are
    #: rounded to the parameters' dtype: the gradients are those of float32 terms, bit for bit)
    VALUE_DTYPE = DynamicWordEmbeddings.VALUE_DTYPE

    def __init__(self, src: StepSource | WordCounts, shard: Optional[RowShard] = None, d: int = 100,
                 inference: str = "variational", D: float = 1e-3, sigma0: float = 1.0, neg_ratio: float = 1.0,
                 neg_exponent: float = 0.75, coupled: bool = True, batch_words: int = 1000,
                 batch_contexts: int = 1000, init_mean_std: float = 0.1, init_std: float = 0.1,
                 test_steps: float = 0.1, test_mass: float = 0.1, split_seed: int = 0, eval_chunk: int = 1 << 22,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 val_mass: float = 0.0, by_word: bool = True, progress: bool = False,
                 before_parameters: Optional[Callable[[int], None]] = None):
        super().__init__()
        if inference not in ("variational", "map"):
            raise ValueError(f"inference must be 'variational' or 'map', got {inference!r}")
        if d < 1 or D <= 0 or sigma0 <= 0 or neg_ratio < 0 or init_mean_std <= 0 or init_std <= 0:
            raise ValueError("d, D, sigma0, init_mean_std and init_std must be positive, neg_ratio >= 0")
        if isinstance(src, WordCounts):
            src = StepSource.from_word_counts(src)
        if src.T < 2:
            raise ValueError(f"dynamic word embeddings need at least 2 time steps, got {src.T}")
        self.shard = shard if shard is not None else RowShard.single()
        T, V = src.T, src.V
        self.variational = inference == "variational"
        self.T, self.V, self.d = T, V, d
        self.start, self.stop = self.shard.rows(V)
        self.n_local = self.stop - self.start
        self.neg_ratio, self.neg_exponent = float(neg_ratio), float(neg_exponent)
        self.inv_var0 = 1.0 / sigma0 ** 2
        self.batch_words = V if batch_words <= 0 else min(batch_words, V)
        self.batch_contexts = V if batch_contexts <= 0 else min(batch_contexts, V)
        self.eval_chunk = int(eval_chunk)
        self.vocab, self.years, self.year_end = list(src.vocab), np.asarray(src.years).copy(), np.asarray(src.year_end).copy()
        self.labels = list(src.labels)
        device = torch.device(device)

        # ---- prior (dwe.py): w_t = 1/(D tau_t); the normalization constant is counted on rank 0
        tau = np.diff(np.asarray(src.times, dtype=np.float64))
        w = 1.0 / (D * tau) if coupled else np.zeros(T - 1)
        self.coupled = bool(coupled)
        self.coupling = Coupling.chain(T, w)
        self.register_buffer("w", torch.as_tensor(w, dtype=dtype, device=device), persistent=False)
        _, logdet = np.linalg.slogdet(prior_precision(w, self.inv_var0))
        n_chains = 2 * V * d
        if self.variational:
            const = -n_chains * (0.5 * logdet + 0.5 * T)
        else:
            const = -n_chains * (0.5 * logdet - 0.5 * T * math.log(2 * math.pi))
        self._const = const if self.shard.is_main() else 0.0

        # ---- data: this rank's rows of every step, the row sums of all words
        split_args = (self.start, self.stop, test_steps, test_mass, split_seed, val_mass)
        if by_word and self.shard.distributed:
            split = load_rows_distributed(src, self.shard, *split_args, progress=progress)
        else:
            split = split_rows(src, *split_args)
        self.data_bytes_read = split.bytes_read
        if before_parameters is not None:
            before_parameters(int(sum(m.nnz for m in split.train)))
        self.compile_logits = False  # trainer.compile (set_compile)
        self.native = True  # the native C loops of dwe.py (logits pass, minibatch positives, chain terms)
        train, c, self.test_steps = split.train, split.c, split.test_steps
        held, mass, val = split.held, split.mass, split.val
        self.train_mask = np.array([t not in self.test_steps for t in range(T)])
        self._train_rows = train
        self._c64 = c  # (T, V) float64 training row sums (the evaluation's training likelihood)
        self._set_train_counts(train, c, dtype, device)
        self._eval_sets = {"steps": held, "mass": mass}
        self._val_sets = val
        if self._val_sets:
            self.best_metric = self.target_metric = "ll_val"

        # ---- parameters: the global draw of dwe.py, this rank's rows
        g = torch.Generator().manual_seed(seed)

        def randn(n_steps: int, std: float) -> nn.Parameter:
            if n_steps * V * d <= FULL_INIT_MAX:
                x = torch.randn(n_steps, V, d, generator=g, dtype=torch.float64)[:, self.start:self.stop]
            else:  # one step at a time: never a whole (T, V, d) draw (clone: a view would keep each
                # step's whole (V, d) draw alive until the stack, all T of them)
                x = torch.stack([torch.randn(V, d, generator=g, dtype=torch.float64)[self.start:self.stop].clone()
                                 for _ in range(n_steps)])
            return nn.Parameter((std * x).to(device, dtype).contiguous())

        n = self.n_local
        if self.variational:
            self.mu_U = randn(T, init_mean_std)  # (T, V_local, d)
            self.mu_V = randn(T, init_mean_std)  # (T, V_local, d)
            raw0 = math.log(math.expm1(1.0 / init_std))
            self.raw_U = nn.Parameter(torch.full((T, n, d), raw0, dtype=dtype, device=device))
            self.raw_V = nn.Parameter(torch.full((T, n, d), raw0, dtype=dtype, device=device))
            self.off_U = nn.Parameter(torch.zeros(T - 1, n, d, dtype=dtype, device=device))
            self.off_V = nn.Parameter(torch.zeros(T - 1, n, d, dtype=dtype, device=device))
        else:
            self.U = randn(T, init_mean_std)
            self.V_ = randn(T, init_mean_std)

    # ------------------------------------------------------------------ data tensors
    def _set_train_counts(self, train: Sequence[sp.csr_matrix], c: np.ndarray, dtype, device) -> None:
        """One CSR over local rows ``t * V_local + (i - start)`` for all steps, the row sums c (T, V)
        of all words and the negatives' normalized c^0.75 (T, V)."""
        stacked = sp.vstack(train, format="csr") if train else sp.csr_matrix((0, self.V))
        register_counts(self, stacked, c, dtype, device)

    def _block_positives(self, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positive counts of the local words ``rows`` (global indices) x the contexts ``cols`` at
        every step, as (t, p, q, n) with p, q positions in ``rows`` / ``cols`` (CSR rows are local)."""
        return block_positives(self.crow, self.col, self.val, rows - self.start, cols, self.T, self.n_local, self.V,
                               self.native)

    def _mine(self, index: Tensor) -> Tensor:
        return (index >= self.start) & (index < self.stop)

    def _sizes(self, index: Tensor) -> list[int]:
        """How many of the (sorted) global rows ``index`` each rank owns."""
        bounds = torch.tensor([self.shard.rows(self.V, r)[0] for r in range(self.shard.world)] + [self.V],
                              device=index.device)
        counts = torch.searchsorted(index, bounds)
        return (counts[1:] - counts[:-1]).tolist()

    # ------------------------------------------------------------------ DynamicModel interface
    def symmetric_groups(self) -> list[list[nn.Parameter]]:
        return [[self.mu_U, self.mu_V]] if self.variational else [[self.U, self.V_]]

    def means(self) -> tuple[Tensor, Tensor]:
        """This rank's rows of the posterior means (variational) or point estimates (MAP)."""
        return (self.mu_U, self.mu_V) if self.variational else (self.U, self.V_)

    def sharded_params(self) -> dict[str, int]:
        if not self.shard.distributed:
            return {}
        names = ("mu_U", "mu_V", "raw_U", "raw_V", "off_U", "off_V") if self.variational else ("U", "V_")
        return {n: self.V for n in names}

    def psi(self) -> Tensor:
        """This rank's share of psi (its rows of the means), a :data:`VALUE_DTYPE` scalar."""
        return self.coupling.psi(self.symmetric_groups()[0], self.VALUE_DTYPE)

    def local_loss(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """This rank's share of ``DynamicWordEmbeddings.local_loss``: the same global draws (rows,
        contexts, noise), the likelihood of its words x all minibatch contexts, the prior and entropy
        terms of its rows; the constant on rank 0. A :data:`VALUE_DTYPE` scalar: its float64 sums are
        added in float64."""
        vd = self.VALUE_DTYPE
        mu_u, mu_v = self.means()
        dev = mu_u.device
        P, Q = self.batch_words, self.batch_contexts
        rows, cols = draw_minibatch(self.V, P, Q, generator, dev)
        scale_r, scale_c = self.V / P, self.V / Q
        mr, mc = self._mine(rows), self._mine(cols)
        my_rows, my_cols = rows[mr], cols[mc]
        lr, lc = my_rows - self.start, my_cols - self.start  # local row indices
        if self.variational:
            # the single-process model's draws (dwe._pooled_randn: the C normal draws on the CPU)
            eps_u = _pooled_randn((self.T, P, self.d), generator, mu_u, self.native)
            eps_v = _pooled_randn((self.T, Q, self.d), generator, mu_u, self.native)
            ru, ou = self.raw_U[:, lr], self.off_U[:, lr]
            rv, ov = self.raw_V[:, lc], self.off_V[:, lc]
            # the sample, the covariance part of the prior and the entropy in one pass (dwe.chain_terms)
            u, terms_u = chain_terms(mu_u[:, lr], ru, ou, eps_u[:, mr], self.w, self.inv_var0,
                                     native=self.native, value_dtype=vd)  # (T, P_r, d)
            v_mine, terms_v = chain_terms(mu_v[:, lc], rv, ov, eps_v[:, mc], self.w, self.inv_var0,
                                          native=self.native, value_dtype=vd)  # (T, Q_r, d)
            var_terms = scale_r * terms_u + scale_c * terms_v
        else:
            u, v_mine = mu_u[:, lr], mu_v[:, lc]
            var_terms = 0.0
        v = gather_segments(v_mine, self.shard, self._sizes(cols))  # (T, Q, d): every minibatch context
        pt, pp, pq, pn = self._block_positives(my_rows, cols)
        # the (T, P_r, Q) logits formed in chunks, gradients in the same pass (as dwe.py's default)
        ll = skipgram_block_fused(u, v, self.c[:, my_rows], self.cneg[:, cols], self.neg_ratio, pt, pp, pq, pn,
                                  compiled=self.compile_logits, native=self.native, value_dtype=vd)
        zero_mean = (0.5 * self.inv_var0 * (sum_squares(mu_u) + sum_squares(mu_v))).to(vd)  # float64 sums
        return -scale_r * scale_c * ll + zero_mean + var_terms + self._const

    def metric_names(self) -> list[str]:
        return ["ll_test", "ll_test_steps", "ll_test_mass", "ll_train", "cos_first_last_q10",
                "cos_first_last_median", "cos_first_last_q90"] + (["ll_val"] if self._val_sets else [])

    def _all_contexts(self, t: int) -> Tensor:
        """The context embeddings of every word at step t: (V, d), gathered."""
        mu_v = self.means()[1][t]
        return self.shard.all_gather_rows(mu_v.contiguous(), self.V, dim=0)

    def _rows_loglik(self, U: Tensor, Vt: Tensor, h: HeldOut) -> tuple[float, float]:
        """This rank's part of ``dwe.heldout_loglik``: positives of its rows, negatives of its rows
        against all contexts (with the whole matrix's c; each row's sum over the V contexts in float64
        from float32 partials of at most 1,024, ``dwe._matvec64``), and the global number of points."""
        dev, dt = U.device, U.dtype
        c = h.c
        cp = c ** self.neg_exponent
        cneg = torch.as_tensor(cp / cp.sum(), dtype=dt, device=dev)  # (V,)
        coo = h.rows.tocoo()
        rows = torch.as_tensor(coo.row.astype(np.int64), device=dev)
        cols = torch.as_tensor(coo.col.astype(np.int64), device=dev)
        vals = torch.as_tensor(coo.data, dtype=torch.float64, device=dev)
        step = max(1, self.eval_chunk // max(U.shape[1], 1))
        pos = 0.0
        for s in range(0, len(rows), step):
            x = (U[rows[s:s + step]] * Vt[cols[s:s + step]]).sum(-1)
            pos += float((vals[s:s + step] * F.logsigmoid(x).to(torch.float64)).sum())
        c_rows = torch.as_tensor(c[self.start:self.stop], dtype=torch.float64, device=dev)
        neg = 0.0
        rstep = max(1, self.eval_chunk // self.V)
        for s in range(0, U.shape[0], rstep):
            L = F.logsigmoid(-(U[s:s + rstep] @ Vt.T))  # (rstep, V)
            neg += float(torch.dot(c_rows[s:s + rstep], _matvec64(L, cneg)))
        return pos + self.neg_ratio * neg, float(c.sum() * (1.0 + self.neg_ratio))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``DynamicWordEmbeddings.evaluate`` on the sharded rows: every rank computes its words'
        part of each held-out likelihood against the gathered contexts; one float64 all-reduce sums
        them; the cosine quantiles are taken over the gathered cosines of all words."""
        mu_u, _ = self.means()
        sets = [("steps", h) for h in self._eval_sets["steps"]] + [("mass", h) for h in self._eval_sets["mass"]] \
            + [("val", h) for h in self._val_sets]
        steps = np.nonzero(self.train_mask)[0]
        steps = steps[np.linspace(0, len(steps) - 1, min(4, len(steps))).round().astype(int)]
        train_sets = [("train", HeldOut(int(t), self._train_rows[t], self._c64[t]))
                      for t in steps.tolist() if self._c64[t].sum() > 0]
        by_step: dict[int, list[tuple[int, HeldOut]]] = {}
        for k, (_, h) in enumerate(sets + train_sets):
            by_step.setdefault(h.t, []).append((k, h))
        ll = torch.zeros(len(sets) + len(train_sets), dtype=torch.float64, device=mu_u.device)
        n_points = [0.0] * ll.numel()
        for t in sorted(by_step):  # the same order on every rank: collectives inside
            Vt = self._all_contexts(t)
            for k, h in by_step[t]:
                a, b = self._rows_loglik(mu_u[t], Vt, h)
                ll[k] += a
                n_points[k] = b
        ll = self.shard.all_reduce_sum_(ll).tolist()
        sums = {name: [0.0, 0.0] for name in ("steps", "mass", "val", "train")}
        for (name, _), a, b in zip(sets + train_sets, ll, n_points):
            sums[name][0] += a
            sums[name][1] += b
        out: dict[str, float] = {}
        for name in ("steps", "mass"):
            a, b = sums[name]
            out[f"ll_test_{name}"] = a / b if b > 0 else float("nan")
        tot_ll, tot_n = sums["steps"][0] + sums["mass"][0], sums["steps"][1] + sums["mass"][1]
        out["ll_test"] = tot_ll / tot_n if tot_n > 0 else float("nan")
        if self._val_sets:
            out["ll_val"] = sums["val"][0] / sums["val"][1] if sums["val"][1] > 0 else float("nan")
        out["ll_train"] = sums["train"][0] / sums["train"][1] if sums["train"][1] > 0 else float("nan")
        cos = F.cosine_similarity(mu_u[0], mu_u[-1], dim=-1, eps=1e-12)  # (V_local,)
        out.update(cosine_quantiles(self.shard.all_gather_rows(cos.contiguous(), self.V, dim=0)))
        return out

    # ------------------------------------------------------------------ persistence of metadata
    # the same corpus metadata as the one-process model (vocab, years, labels, ...)
    set_compile = DynamicWordEmbeddings.set_compile
    get_extra_state = DynamicWordEmbeddings.get_extra_state
    set_extra_state = DynamicWordEmbeddings.set_extra_state


# ============================================================================ model registry
def build_sharded_dwe(cfg, device: torch.device, dtype: torch.dtype, shard: RowShard) -> ShardedDynamicWordEmbeddings:
    """``model=dwe`` under ``trainer.distributed=true``: rank 0 prepares the corpus folder on first
    use (as the one-process builder does) and its by-word split, then every rank opens them and
    copies its rows of each step."""
    from goldstone_cli.data.cooc import existing_output_state, read_manifest
    from goldstone_cli.distributed.errors import PeerRankError, exit_code_of
    from goldstone_cli.models.dwe import check_corpus_settings, load_word_counts

    data_cfg = cfg.data
    path = Path(str(data_cfg.path))
    failed = torch.zeros(1, dtype=torch.int64, device=device)
    error: Optional[BaseException] = None
    if shard.is_main() and existing_output_state(path) in ("missing", "empty"):
        try:
            load_word_counts(data_cfg, progress=bool(cfg.trainer.progress))  # prepares it (one process only)
        except BaseException as exc:  # re-raised below, after the other ranks have heard of it
            error, failed[0] = exc, exit_code_of(exc)  # >= 1: the code rank 0 exits with
    shard.all_reduce_max_(failed)
    if error is not None:
        raise error
    if int(failed[0]):
        raise PeerRankError(f"rank 0 could not prepare the corpus at {path} (rank 0 printed why)",
                            exit_code=int(failed[0]))
    if data_cfg.get("source"):  # the folder must hold the corpus the config asks for (as load_word_counts checks)
        check_corpus_settings(path, read_manifest(path).get("settings", {}), data_cfg)
    src = StepSource.from_prepared(path, verify=bool(data_cfg.get("verify", False)))
    m = cfg.model
    check = None
    if cfg.trainer.get("memory_check", True):  # every rank, before its (T, V_local, d) tensors are made
        from goldstone_cli.models.memory import check_sharded_dwe_fits

        start, stop = shard.rows(src.V)

        def memory_check(nnz_local: int) -> None:
            check_sharded_dwe_fits(src.V, src.T, nnz_local, cfg, device, dtype, shard, rows=stop - start)

        check = memory_check
    return ShardedDynamicWordEmbeddings(
        src, shard=shard, d=m.d, inference=m.inference, D=m.D, sigma0=m.sigma0, neg_ratio=m.neg_ratio,
        neg_exponent=m.neg_exponent, coupled=m.coupled, batch_words=m.batch_words, batch_contexts=m.batch_contexts,
        init_mean_std=m.init_mean_std, init_std=m.init_std, test_steps=m.test_steps, test_mass=m.test_mass,
        split_seed=m.split_seed, eval_chunk=m.eval_chunk, val_mass=m.get("val_mass", 0.0), seed=cfg.seed,
        dtype=dtype, device=device, progress=bool(cfg.trainer.progress) and shard.is_main(), before_parameters=check)
