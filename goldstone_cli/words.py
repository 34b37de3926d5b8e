"""Reading trained word-embedding runs: word aging (paper Table 2), first/last cosines (Fig. 4) and
the alignment baseline (orthogonal Procrustes of each time step onto its neighbour after training).

A DWE run folder holds ``config.yaml`` and ``checkpoints/last.pt``; the model's state carries the
vocabulary and the time steps (``_extra_state``), so a run is self-contained.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

MODEL_NAMES = ("dwe",)


class WordsError(ValueError):
    """A user-facing problem (unknown word, year out of range, not a word-embedding run)."""


@dataclass
class WordRun:
    run_dir: Path
    vocab: list[str]
    years: np.ndarray  # (T,) first year of every step
    year_end: np.ndarray  # (T,) last year of every step (inclusive)
    labels: list[str]  # (T,)
    train_mask: np.ndarray  # (T,) bool: steps with training data
    U: Tensor  # (T, V, d) word embeddings (posterior means)
    Vc: Tensor  # (T, V, d) context embeddings
    coupled: bool
    inference: str
    optimizer: str
    aligned: bool = False
    data_path: Optional[Path] = None  # the prepared corpus the run was trained on
    _step_counts: Optional[np.ndarray] = None

    def step_counts(self) -> np.ndarray:
        """(T, V) co-occurrence mass of every word in every step (row sums of the corpus matrices),
        read from the run's prepared corpus (``data.path`` of its config); steps held out of training
        count as empty (analysis/embeddings.py ``_run_counts``)."""
        if self._step_counts is None:
            from goldstone_cli.analysis.embeddings import _run_counts

            counts, note = _run_counts(self.run_dir, self.data_path, self.vocab, len(self.labels), self.train_mask)
            if counts is None:
                raise WordsError(f"--min-count (default 1: answers must occur in the target step) needs the run's "
                                 f"corpus, but {note}; run from the folder the run was trained in, or pass "
                                 "--min-count 0 to allow every word")
            self._step_counts = counts
        return self._step_counts

    @property
    def label(self) -> str:
        base = f"{self.optimizer}{'' if self.coupled else ', uncoupled'}"
        return base + (" + Procrustes alignment" if self.aligned else "")

    def index(self, word: str) -> int:
        try:
            return self._index[word]
        except AttributeError:
            self._index = {w: i for i, w in enumerate(self.vocab)}
            return self.index(word)
        except KeyError:
            close = difflib.get_close_matches(word, self.vocab, n=5, cutoff=0.6)
            hint = f"; closest vocabulary words: {', '.join(close)}" if close else ""
            raise WordsError(f"'{word}' is not in the vocabulary of {self.run_dir} ({len(self.vocab)} words){hint}") from None

    def step_of_year(self, year: int) -> int:
        """The time step whose years contain ``year``."""
        first, last = int(self.years[0]), int(self.year_end[-1])
        if not first <= year <= last:
            raise WordsError(f"year {year} is outside the run's range {first}-{last} "
                             f"({len(self.years)} steps: {self.labels[0]} .. {self.labels[-1]})")
        k = int(np.searchsorted(self.years, year, side="right") - 1)
        if year > int(self.year_end[k]):  # between two steps (SemEval: 1861-1959)
            raise WordsError(f"year {year} is in no step of {self.run_dir}: steps {self.labels[0]} .. "
                             f"{self.labels[-1]} ({len(self.years)} steps; it falls between {self.labels[k]} and "
                             f"{self.labels[k + 1]}); give a year inside a step")
        return k


# ----------------------------------------------------------------------------- finding and loading runs
def _run_model_name(run_dir: Path) -> Optional[str]:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return str(cfg["model"]["name"])
    except Exception:
        return None


def find_latest_run(root: str | Path = "outputs") -> Path:
    """The newest word-embedding run (by its last checkpoint's time) under ``root``."""
    root = Path(root)
    best, best_t = None, -1.0
    if root.is_dir():
        for cfg in root.rglob("config.yaml"):
            run = cfg.parent
            # one process's last.pt / prev.pt, or a distributed run's sharded last.dcp / prev.dcp
            candidates = [run / "checkpoints" / f for f in ("last.pt", "prev.pt", "last.dcp/meta.pt", "prev.dcp/meta.pt")]
            ck = next((c for c in candidates if c.is_file()), candidates[0])
            if ck.is_file() and _run_model_name(run) in MODEL_NAMES and ck.stat().st_mtime > best_t:
                best, best_t = run, ck.stat().st_mtime
    if best is None:
        raise WordsError(f"no finished word-embedding run under {root}/; train one with `goldstone train model=dwe` "
                         "or pass --run DIR")
    return best


def load_run(run_dir: str | Path, align: Optional[bool] = None) -> WordRun:
    """Load a DWE run's embeddings. ``align``: apply Procrustes alignment (None: only for runs
    trained without the chain prior, i.e. the alignment baseline)."""
    import yaml

    from goldstone_cli import checkpoint as ckpt
    from goldstone_cli.analysis.embeddings import _corpus_path

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise WordsError(f"{run_dir} is not a run folder (no config.yaml)")
    name = _run_model_name(run_dir)
    if name not in MODEL_NAMES:
        raise WordsError(f"{run_dir} is a '{name}' run, not a word-embedding run (model=dwe)")
    if not ckpt.has_checkpoint(run_dir):
        raise WordsError(f"{run_dir} has no checkpoint yet ({run_dir / 'checkpoints' / ckpt.LAST}); "
                         "wait for the run to save one")
    try:  # last.pt, or prev.pt with a warning when last.pt is damaged
        state, path = ckpt.load_latest(run_dir / "checkpoints", warn=lambda m: print(m, file=sys.stderr))
    except ckpt.CheckpointError as exc:
        raise WordsError(str(exc)) from None
    state = state["model"]
    extra = state.get("_extra_state")
    if extra is None:
        raise WordsError(f"{path} has no vocabulary (trained with an older version?)")
    if "mu_U" in state:
        U, Vc = state["mu_U"], state["mu_V"]
    else:
        U, Vc = state["U"], state["V_"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    opt = cfg["optimizer"]
    opt_name = str(opt["name"]) if opt["name"] != "goldstone" else f"goldstone-{opt.get('solver')}({opt.get('base')})"
    run = WordRun(run_dir=run_dir, vocab=list(extra["vocab"]), years=np.asarray(extra["years"]),
                  year_end=np.asarray(extra["year_end"]), labels=list(extra["labels"]),
                  train_mask=np.asarray(extra["train_mask"], dtype=bool), U=U.float(), Vc=Vc.float(),
                  coupled=bool(extra["coupled"]), inference=str(extra["inference"]), optimizer=opt_name,
                  data_path=_corpus_path(run_dir, (cfg.get("data") or {}).get("path")))
    if align or (align is None and not run.coupled):
        run.U, run.Vc = procrustes_align(run.U, run.Vc, run.train_mask)
        run.aligned = True
    return run


# ----------------------------------------------------------------------------- alignment baseline
def procrustes_align(U: Tensor, Vc: Tensor, train_mask: Optional[np.ndarray] = None) -> tuple[Tensor, Tensor]:
    """Rotate every time step onto its (aligned) predecessor, as HistWords-style pipelines do after
    training independent models: ``W_t = argmin_{W orthogonal} ||Z_t W - Z_{t-1} W_{t-1}||_F`` with
    ``Z_t = [U_t; V_t]``, by an SVD per step (orthogonal Procrustes). Steps without training data
    (``train_mask`` False) are skipped and keep their predecessor's rotation. Returns (U', V')."""
    T = U.shape[0]
    mask = np.ones(T, dtype=bool) if train_mask is None else np.asarray(train_mask, dtype=bool)
    steps = np.nonzero(mask)[0]
    Z = torch.cat([U, Vc], dim=1).to(torch.float64)  # (T, 2V, d)
    # relative rotation of each trained step onto the previous trained step, all at once
    M = torch.bmm(Z[steps[1:]].transpose(1, 2), Z[steps[:-1]])  # (S-1, d, d) = Z_t^T Z_prev
    P, _, Qh = torch.linalg.svd(M)
    Q = P @ Qh  # (S-1, d, d): Z_t Q ~ Z_prev
    d = U.shape[-1]
    W = torch.empty(T, d, d, dtype=torch.float64)
    cur = torch.eye(d, dtype=torch.float64)
    k = 0
    for t in range(T):  # composing T small d x d matrices (post-processing, not a training hot path)
        if mask[t] and t != steps[0]:
            cur = Q[k] @ cur
            k += 1
        W[t] = cur
    W = W.to(U.dtype)
    return torch.bmm(U, W), torch.bmm(Vc, W)


# ----------------------------------------------------------------------------- queries
def age_words(run: WordRun, words: Sequence[str], source_year: Optional[int] = None, target_year: Optional[int] = None,
              top: int = 5, exclude_query: bool = True, min_count: float = 0.0) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each query word, the ``top`` words whose embedding at ``target_year`` has the largest
    cosine with the query's embedding at ``source_year`` (paper Table 2; defaults: last step to first).
    ``min_count`` > 0 keeps only answers that occur in the target step with at least this
    co-occurrence mass (a word absent from a step has only its prior-smoothed embedding there)."""
    if top < 1:
        raise WordsError(f"--top must be at least 1, got {top}")
    if not min_count >= 0:
        raise WordsError(f"--min-count must be >= 0 (co-occurrence mass in the target step), got {min_count}")
    idx = [run.index(w) for w in words]  # unknown words fail before any work
    s = run.step_of_year(source_year) if source_year is not None else run.U.shape[0] - 1
    t = run.step_of_year(target_year) if target_year is not None else 0
    target = torch.nn.functional.normalize(run.U[t], dim=-1)  # (V, d)
    query = torch.nn.functional.normalize(run.U[s, idx], dim=-1)  # (W, d)
    cos = query @ target.T  # (W, V)
    if exclude_query:
        cos[torch.arange(len(idx)), torch.as_tensor(idx)] = -float("inf")
    if min_count > 0:
        cos[:, ~torch.as_tensor(run.step_counts()[t] >= min_count)] = -float("inf")
    n_ok = int(torch.isfinite(cos).sum(dim=1).min())  # candidates left for every query
    if n_ok == 0:
        if min_count > 0 and not run.train_mask[t]:
            raise WordsError(f"step {run.labels[t]} was held out of training, so no word has data there (its "
                             "embeddings are the prior's interpolation); choose a trained step with --to, or pass "
                             "--min-count 0 to answer from every word")
        most = float(run.step_counts()[t].max()) if min_count > 0 else 0.0
        raise WordsError(f"no word of step {run.labels[t]} is left to answer with"
                         + (f": --min-count {min_count:g} is above every word's co-occurrence mass there (the most: "
                            f"{most:g}); lower it" if min_count > 0 else ""))
    vals, nbr = cos.topk(min(top, n_ok), dim=1)
    return [(w, [(run.vocab[j], float(v)) for j, v in zip(nbr[i].tolist(), vals[i].tolist())])
            for i, w in enumerate(words)]


def first_last_cosines(run: WordRun, min_count: float = 0.0) -> Tensor:
    """cos(u_i,first, u_i,last) for every word (Fig. 4): (V,). ``min_count`` > 0 keeps only the
    words with at least this co-occurrence mass in both the first and the last step."""
    cos = torch.nn.functional.cosine_similarity(run.U[0], run.U[-1], dim=-1, eps=1e-12)
    if min_count > 0:
        c = run.step_counts()
        cos = cos[torch.as_tensor((c[0] >= min_count) & (c[-1] >= min_count))]
        if cos.numel() == 0:
            raise WordsError(f"no word occurs with co-occurrence mass >= {min_count} in both the first and the last step")
    return cos


def cosine_summary(cos: Tensor) -> dict[str, float]:
    c = cos.to(torch.float64)
    qs = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], dtype=torch.float64)
    vals = torch.quantile(c, qs)
    out = {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(qs.tolist(), vals.tolist())}
    out["median"] = out.pop("q50")
    out["mean"] = float(c.mean())
    out["frac_above_0.5"] = float((c > 0.5).double().mean())
    out["frac_negative"] = float((c < 0).double().mean())
    return out


def record_cosine_summary(run: WordRun, summary: dict[str, float], min_count: float = 0.0) -> None:
    """Add the quantiles to the run's ``summary.json`` under ``first_last_cosine`` (atomic), keyed
    ``raw`` / ``aligned`` (+ ``_min<count>`` when restricted to frequent words)."""
    key = ("aligned" if run.aligned else "raw") + (f"_min{min_count:g}" if min_count > 0 else "")
    from goldstone_cli.io import atomic_write_json

    path = run.run_dir / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("first_last_cosine", {})[key] = summary
    atomic_write_json(path, data)


def plot_first_last(runs: Sequence[WordRun], out_png: str | Path, bins: int = 60, min_count: float = 0.0) -> Path:
    """Fig. 4: histograms of cos(u_i,first, u_i,last) over the vocabulary, one per run."""
    from goldstone_cli.io import atomic_path
    from goldstone_cli.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["tab:green", "tab:purple", "tab:orange", "tab:blue"]
    edges = np.linspace(-1, 1, bins + 1)
    for k, run in enumerate(runs):
        cos = first_last_cosines(run, min_count).numpy()
        med = float(np.median(cos))
        ax.hist(cos, bins=edges, alpha=0.55, color=colors[k % len(colors)],
                label=f"{run.label} (median {med:.2f})")
    first, last = runs[0].labels[0], runs[0].labels[-1]
    which = f", words with mass >= {min_count:g} in both" if min_count > 0 else ""
    ax.set_xlabel(f"cos(u_i,first, u_i,last): first step {first}, last step {last}{which}")
    ax.set_ylabel("number of words")
    ax.set_xlim(-1, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_png


def format_age_words(results: list[list[tuple[str, list[tuple[str, float]]]]], runs: Sequence[WordRun],
                     source: str, targets: Sequence[str]) -> str:
    """A plain-text table: one row per query word, one column per run (headed by its method, its
    folder's name where two runs' methods read the same, and its target step)."""
    labels = [r.label for r in runs]
    names = [f"{lab} [{r.run_dir.name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
    header = [f"query ({source})"] + [f"{n} ({t})" for n, t in zip(names, targets)]
    rows = []
    for i, (word, _) in enumerate(results[0]):
        rows.append([word] + [", ".join(w for w, _ in res[i][1]) for res in results])
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
