"""Time-sliced word embeddings for analysis: a DWE run folder or an exported folder.

A run folder (``goldstone train model=dwe``) gives the posterior means (or MAP point estimates) of
the word embeddings ``U`` (T, V, d), the vocabulary and the step labels (the model's extra state in
newest good checkpoint, read by checkpoint.load_latest with ``weights_only=True``), and, for variational runs, the
posterior ``q``: per word and dimension a Gaussian chain along time with precision ``B B^T``
(bidiagonal ``B``: ``raw_U`` -> diagonal, ``off_U`` -> sub-diagonal; models/dwe.py). Word presence
(how much data a word has in a step) is the row sum of the step's co-occurrence matrix in the run's
prepared corpus (``data.path`` of its config); steps held out of training count as empty.

Runs trained without the chain prior (``model.coupled=false``) live in unrelated coordinate systems
per step; they are aligned here by the exact chain Procrustes solver (analysis/align.py), and the
same rotations act on their posterior samples.

An exported folder (``goldstone export``, analysis/export.py) is read back the same way (means,
posterior standard deviations, presence counts; no posterior correlations along time).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from goldstone_cli.words import MODEL_NAMES, WordsError, _run_model_name

F64 = torch.float64


class AnalysisError(WordsError):
    """A user-facing problem: unknown word, step or run, or a request the embeddings cannot answer."""


@dataclass
class Posterior:
    """The variational posterior of the word embeddings: per word and dimension a Gaussian chain
    along time (models/dwe.py): means ``mu`` (T, V, d), ``raw`` (T, V, d) and ``off`` (T-1, V, d)."""

    mu: Tensor
    raw: Tensor
    off: Tensor

    def variances(self) -> Tensor:
        """Marginal variances (T, V, d) of every coordinate (before any alignment rotation)."""
        from goldstone_cli.models.dwe import chain_moments

        return chain_moments(self.raw, self.off)[0]


def pair_moments(raw: Tensor, off: Tensor, t0: int, t1: int) -> tuple[Tensor, Tensor, Tensor]:
    """Var(x_t0), Var(x_t1) and Cov(x_t0, x_t1), t0 <= t1, of every chain of ``q`` (shapes (T, ...) ->
    (...)): with ``y_k = eps_k / b_k - a_k y_k+1`` (models/dwe.py ``sample_chain``),
    ``Cov(y_t0, y_t1) = prod_{k=t0}^{t1-1} (-a_k) Var(y_t1)``."""
    from goldstone_cli.models.dwe import bidiagonal, chain_moments

    var = chain_moments(raw, off)[0]  # (T, ...)
    _, a = bidiagonal(raw, off)  # (T-1, ...)
    cov = torch.prod(-a[t0:t1], dim=0) * var[t1] if t1 > t0 else var[t1]
    return var[t0], var[t1], cov


@dataclass
class Embeddings:
    """Word embeddings per time step. Shapes: ``U`` (T, V, d); ``counts`` (T, V); ``rotations``
    (T, d, d) or None: the alignment applied to the means, ``U = mu @ R_t^T``."""

    source: Path
    vocab: list[str]
    labels: list[str]
    years: np.ndarray  # (T,) first year of every step
    year_end: np.ndarray  # (T,) last year (inclusive)
    train_mask: np.ndarray  # (T,) bool: steps with training data
    U: Tensor  # (T, V, d) float64
    counts: Optional[np.ndarray] = None  # (T, V) co-occurrence mass (row sums); None: unknown
    counts_note: str = ""  # why counts are unknown
    posterior: Optional[Posterior] = None
    std: Optional[Tensor] = None  # (T, V, d) posterior std of an exported folder (no correlations)
    rotations: Optional[Tensor] = None  # (T, d, d)
    description: str = ""
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def T(self) -> int:
        return self.U.shape[0]

    @property
    def V(self) -> int:
        return self.U.shape[1]

    @property
    def variational(self) -> bool:
        return self.posterior is not None or self.std is not None

    # ------------------------------------------------------------------ look-ups
    def index(self, word: str) -> int:
        if not self._index:
            self._index.update({w: i for i, w in enumerate(self.vocab)})
        try:
            return self._index[word]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(word, self.vocab, n=5, cutoff=0.6)
            hint = f"; closest vocabulary words: {', '.join(close)}" if close else ""
            raise AnalysisError(f"'{word}' is not in the vocabulary of {self.source} ({self.V} words){hint}") from None

    def step(self, spec: str | int) -> int:
        """A step by its label ('1790-1799'), a year inside it (1795), or '#k' (the k-th step, from 0)."""
        s = str(spec).strip()
        if s in self.labels:
            return self.labels.index(s)
        if s.startswith("#") and s[1:].lstrip("-").isdigit():
            k = int(s[1:])
            if not -self.T <= k < self.T:
                raise AnalysisError(f"step {s} does not exist: the run has {self.T} steps (#0 .. #{self.T - 1})")
            return k % self.T
        if re.fullmatch(r"-?\d+", s):
            y = int(s)
            inside = np.nonzero((self.years <= y) & (y <= self.year_end))[0]
            if len(inside):
                return int(inside[0])
            raise AnalysisError(f"year {y} is in no step of {self.source}: steps {self.labels[0]} .. {self.labels[-1]} "
                                f"({self.T} steps)")
        shown = ", ".join(self.labels[:4]) + (" ..." if self.T > 4 else "")
        raise AnalysisError(f"unknown step {s!r}; give a year, a step label ({shown}) or #INDEX")

    def present(self, t: int, min_count: float) -> np.ndarray:
        """(V,) bool: words with at least ``min_count`` co-occurrence mass in step t."""
        if min_count <= 0:
            return np.ones(self.V, dtype=bool)
        if self.counts is None:
            raise AnalysisError(f"word counts are unknown for {self.source} ({self.counts_note}); pass --min-count 0 "
                                "to treat every word as present")
        return self.counts[t] >= min_count

    # ------------------------------------------------------------------ posterior
    def sample_pair(self, t0: int, t1: int, n: int, generator: torch.Generator,
                    rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``n`` joint posterior samples of the embeddings at steps t0 and t1: two (n, W, d) tensors
        (W = all words or ``rows``), aligned like ``U``.

        Along time each coordinate is a Gauss-Markov chain, so (x_t0, x_t1) is bivariate normal with
        the marginal variances of ``chain_moments`` and, for t0 < t1, the covariance
        ``Sigma_t0,t1 = prod_{k=t0}^{t1-1} (-a_k) Sigma_t1,t1`` (from ``y_k = eps_k/b_k - a_k y_k+1``).
        Exported folders have no correlations along time: the two steps are sampled independently."""
        if not self.variational:
            raise AnalysisError(f"{self.source} has no posterior (a MAP run); credible intervals need "
                                "model.inference=variational")
        sel = slice(None) if rows is None else rows
        if t0 > t1:
            b, a = self.sample_pair(t1, t0, n, generator, rows)
            return a, b
        if self.posterior is not None:
            p = self.posterior
            v0, v1, cov = pair_moments(p.raw[:, sel], p.off[:, sel], t0, t1)  # (W, d) each
            mu0, mu1 = p.mu[t0, sel], p.mu[t1, sel]
            z0 = torch.randn((n,) + tuple(v0.shape), generator=generator, dtype=F64)
            z1 = torch.randn((n,) + tuple(v0.shape), generator=generator, dtype=F64)
            x1 = v1.sqrt() * z1
            cond = (v0 - cov * cov / v1).clamp_min(0.0)  # Var(x_t0 | x_t1)
            x0 = (cov / v1) * x1 + cond.sqrt() * z0
            x0, x1 = mu0 + x0, mu1 + x1
            if self.rotations is not None:
                x0 = x0 @ self.rotations[t0].T
                x1 = x1 @ self.rotations[t1].T
            return x0, x1
        s0, s1 = self.std[t0, sel], self.std[t1, sel]
        e0 = s0 * torch.randn((n,) + tuple(s0.shape), generator=generator, dtype=F64)
        e1 = s1 * torch.randn((n,) + tuple(s0.shape), generator=generator, dtype=F64)
        if self.rotations is not None:  # the std is in the model's axes; U is rotated
            e0, e1 = e0 @ self.rotations[t0].T, e1 @ self.rotations[t1].T
        return self.U[t0, sel] + e0, self.U[t1, sel] + e1

    def sample_paths(self, rows: Sequence[int], n: int, generator: torch.Generator) -> Tensor:
        """``n`` posterior samples of whole paths of the words ``rows``: (n, T, W, d), aligned like ``U``."""
        if not self.variational:
            raise AnalysisError(f"{self.source} has no posterior (a MAP run)")
        idx = torch.as_tensor(list(rows), dtype=torch.int64)
        if self.posterior is None:
            std = self.std[:, idx]
            noise = std * torch.randn((n,) + tuple(std.shape), generator=generator, dtype=F64)  # (n, T, W, d)
            if self.rotations is not None:
                noise = torch.einsum("ntwd,tkd->ntwk", noise, self.rotations)
            return self.U[:, idx] + noise
        from goldstone_cli.models.dwe import sample_chain

        p = self.posterior
        mu, raw, off = p.mu[:, idx], p.raw[:, idx], p.off[:, idx]  # (T, W, d), (T-1, W, d)
        eps = torch.randn((n,) + tuple(mu.shape), generator=generator, dtype=F64)  # (n, T, W, d)
        # the chain is along dim 0 of sample_chain: move samples behind time
        x = sample_chain(mu.unsqueeze(1), raw.unsqueeze(1), off.unsqueeze(1), eps.transpose(0, 1))  # (T, n, W, d)
        x = x.transpose(0, 1)  # (n, T, W, d)
        if self.rotations is not None:
            x = torch.einsum("ntwd,tkd->ntwk", x, self.rotations)
        return x

    def posterior_std(self) -> Optional[Tensor]:
        """(T, V, d) posterior standard deviations in the model's own coordinates (None for MAP)."""
        if self.std is not None:
            return self.std
        if self.posterior is None:
            return None
        return self.posterior.variances().sqrt()


# ----------------------------------------------------------------------------- loading
def _load_state(run_dir: Path) -> dict:
    """The model state of the run's newest good checkpoint (checkpoint.load_latest: weights_only=True,
    checksum verified, prev.pt when last.pt is damaged)."""
    from goldstone_cli import checkpoint as ckpt

    if not ckpt.has_checkpoint(run_dir):
        raise AnalysisError(f"{run_dir} has no checkpoint yet ({run_dir / 'checkpoints' / ckpt.LAST}); "
                            "wait for the run to save one")
    try:
        ck, path = ckpt.load_latest(run_dir / "checkpoints", warn=lambda m: print(m, file=sys.stderr))
    except (ckpt.CheckpointError, FileNotFoundError) as exc:
        raise AnalysisError(f"cannot read checkpoint: {exc}") from None
    if not isinstance(ck.get("model"), dict):
        raise AnalysisError(f"{path} is not a goldstone checkpoint (no model state)")
    return ck["model"]


def _corpus_path(run_dir: Path, data_path: Optional[str]) -> Optional[Path]:
    """``data.path`` of a run: as written (relative to the folder training ran in: the current one,
    or one of the run folder's parents)."""
    if not data_path:
        return None
    p = Path(data_path)
    if p.is_absolute():
        return p
    for base in [Path.cwd()] + list(run_dir.resolve().parents):
        if (base / p / "manifest.json").is_file():
            return base / p
    return p


def _run_counts(run_dir: Path, data_path: Optional[Path], vocab: list[str], T: int,
                train_mask: np.ndarray) -> tuple[Optional[np.ndarray], str]:
    from goldstone_cli.data.cooc import CoocFormatError, load_cooc

    if data_path is None:
        return None, "the run's config names no data.path"
    try:
        cooc = load_cooc(data_path)
    except (CoocFormatError, FileNotFoundError, OSError) as exc:
        return None, f"its corpus {data_path} cannot be read: {exc}"
    if list(cooc.vocab) != vocab or cooc.T != T:
        return None, f"the corpus at {data_path} has another vocabulary or other steps than the run"
    counts = np.stack([np.asarray(m.sum(axis=1), dtype=np.float64).reshape(-1) for m in cooc.matrices])  # (T, V)
    counts[~train_mask] = 0.0  # held-out steps: the model saw no data there
    return counts, ""


def load_embeddings(path: str | Path, align: Optional[bool] = None) -> Embeddings:
    """A DWE run folder or an exported folder (``goldstone export``). ``align``: chain-Procrustes
    align the steps (None: only runs trained without the chain prior)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path} does not exist; give a run folder (outputs/dwe/...) or an exported folder")
    if (path / "export.json").is_file():
        from goldstone_cli.analysis.export import load_export

        emb = load_export(path)
        if align:
            _align_in_place(emb)
        return emb
    if not (path / "config.yaml").is_file():
        raise AnalysisError(f"{path} is not a run folder (no config.yaml) nor an exported folder (no export.json)")
    name = _run_model_name(path)
    if name not in MODEL_NAMES:
        raise AnalysisError(f"{path} is a '{name}' run, not a word-embedding run (model=dwe)")
    import yaml

    state = _load_state(path)
    extra = state.get("_extra_state")
    if not isinstance(extra, dict) or "vocab" not in extra:
        raise AnalysisError(f"{path}/checkpoints/last.pt has no vocabulary (trained with an older version?)")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    post = None
    if "mu_U" in state:
        U = state["mu_U"].to(F64)
        post = Posterior(mu=U, raw=state["raw_U"].to(F64), off=state["off_U"].to(F64))
    else:
        U = state["U"].to(F64)
    vocab = [str(w) for w in extra["vocab"]]
    train_mask = np.asarray(extra["train_mask"], dtype=bool)
    data_path = _corpus_path(path, (cfg.get("data") or {}).get("path"))
    counts, note = _run_counts(path, data_path, vocab, U.shape[0], train_mask)
    opt = cfg.get("optimizer", {})
    opt_name = str(opt.get("name")) if opt.get("name") != "goldstone" else f"goldstone-{opt.get('solver')}({opt.get('base')})"
    coupled = bool(extra.get("coupled", True))
    emb = Embeddings(source=path, vocab=vocab, labels=[str(x) for x in extra["labels"]],
                     years=np.asarray(extra["years"], dtype=np.int64),
                     year_end=np.asarray(extra["year_end"], dtype=np.int64), train_mask=train_mask, U=U,
                     counts=counts, counts_note=note, posterior=post,
                     description=f"{opt_name}{'' if coupled else ', no chain prior'}, "
                                 f"{extra.get('inference', 'map')}")
    if align or (align is None and not coupled):
        _align_in_place(emb, with_contexts=state.get("mu_V", state.get("V_")))
    return emb


def _align_in_place(emb: Embeddings, with_contexts: Optional[Tensor] = None) -> None:
    """Chain Procrustes over O(d) of the trained steps (word and context vectors together, like the
    training's gauge step); untrained steps take the rotation of the trained step before them."""
    from goldstone_cli.analysis.align import chain_rotations

    Z = emb.U if with_contexts is None else torch.cat([emb.U, with_contexts.to(F64)], dim=1)  # (T, N, d)
    steps = np.nonzero(emb.train_mask)[0]
    R_tr = chain_rotations([Z[t] for t in steps.tolist()])  # (S, d, d)
    d = emb.U.shape[-1]
    R = torch.empty(emb.T, d, d, dtype=F64)
    pos = np.clip(np.searchsorted(steps, np.arange(emb.T), side="right") - 1, 0, len(steps) - 1)  # (T,)
    R[:] = R_tr[torch.as_tensor(pos)]
    emb.U = emb.U @ R.transpose(1, 2)
    emb.rotations = R if emb.rotations is None else R @ emb.rotations
    emb.description += " + chain Procrustes alignment"


# ----------------------------------------------------------------------------- output helpers
def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(str(header[c]))] + [len(str(r[c])) for r in rows]) for c in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_csv_json(out_dir: Path, stem: str, header: Sequence[str], rows: Sequence[Sequence], meta: dict) -> tuple[Path, Path]:
    """``stem.csv`` (one row per record) and ``stem.json`` (``meta`` + the records), written atomically."""
    import csv
    import io

    from goldstone_cli.io import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_json(json_path, {**meta, "records": [dict(zip(header, r)) for r in rows]})
    return csv_path, json_path


def safe_stem(text: str) -> str:
    """A file-name part from a label or word (letters, digits, '-', '_', '.'; the rest '_')."""
    return re.sub(r"[^\w.-]", "_", text)[:80] or "_"


def default_out(emb: Embeddings) -> Path:
    """Where analysis files go by default: ``<run or export folder>/analysis/``."""
    return emb.source / "analysis"
