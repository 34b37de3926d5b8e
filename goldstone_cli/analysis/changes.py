"""Which words changed between two steps: cosine distance of the embeddings, with its uncertainty.

For every word i, ``dist_i = 1 - cos(u_i,t0, u_i,t1)`` of the posterior means (or MAP estimates).
For variational runs the distance is also computed on ``samples`` joint posterior draws of
``(u_i,t0, u_i,t1)`` (embeddings.py ``sample_pair``: exact bivariate marginals of the Gauss-Markov
chain, so the posterior correlation between the two steps is kept): its posterior mean and an
equal-tailed credible interval. Posterior noise inflates the distance of an uncertain word (two
noisy draws are less aligned than their means), so for a word with little data the posterior mean
lies well above the distance of the means and the interval is wide: the width says how well the
data pin the distance down. Words are ranked by the distance of the means (``by="mean"``) or by
the posterior mean of the distance (``by="posterior"``).

Words with less than ``min_count`` co-occurrence mass in either step have no data there: their
embedding is the prior's extrapolation from other steps. They are marked, not ranked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings

F64 = torch.float64
BY = ("mean", "posterior")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos over the last dimension (0 for identical directions, 2 for opposite); zero vectors give 1."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def check_sampling(samples: int, level: float) -> None:
    """AnalysisError unless ``samples`` posterior draws can give a ``level`` credible interval."""
    if not 0 < level < 1:
        raise AnalysisError(f"--level must be between 0 and 1, got {level}")
    if samples < 2:
        raise AnalysisError(f"--samples must be at least 2, got {samples}")


def posterior_distance_stats(emb: Embeddings, t0: int, t1: int, samples: int, level: float, seed: int,
                             rows: Optional[torch.Tensor] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lower, upper) of the posterior of 1 - cos(u_t0, u_t1) per word, from ``samples`` draws."""
    check_sampling(samples, level)
    g = torch.Generator().manual_seed(seed)
    W = emb.V if rows is None else len(rows)
    chunk = max(1, (1 << 24) // max(1, 2 * W * emb.U.shape[-1]))  # samples per batch (bounded memory)
    dist = []
    for s in range(0, samples, chunk):  # batches of samples, each vectorized over words and dimensions
        x0, x1 = emb.sample_pair(t0, t1, min(chunk, samples - s), g, rows)  # (n, W, d) each
        dist.append(cosine_distance(x0, x1))
    D = torch.cat(dist)  # (S, W)
    q = torch.quantile(D, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64), dim=0)  # (2, W)
    return D.mean(0).numpy(), q[0].numpy(), q[1].numpy()


@dataclass
class Changes:
    t0: int
    t1: int
    distance: np.ndarray  # (V,) 1 - cos of the means
    ranked: np.ndarray  # (R,) word indices, most changed first
    unranked: np.ndarray  # word indices without data in either step
    count0: Optional[np.ndarray]  # (V,)
    count1: Optional[np.ndarray]
    post_mean: Optional[np.ndarray] = None  # (V,)
    post_lo: Optional[np.ndarray] = None
    post_hi: Optional[np.ndarray] = None
    level: float = 0.9
    by: str = "mean"
    min_count: float = 1.0
    status: list[str] = field(default_factory=list)  # (V,) 'ranked' or why not


def word_changes(emb: Embeddings, t0: int, t1: int, min_count: float = 1.0, samples: int = 200,
                 level: float = 0.9, seed: int = 0, by: str = "mean") -> Changes:
    """Rank the words by how much they moved between steps t0 and t1 (see the module docstring)."""
    if t0 == t1:
        raise AnalysisError(f"--from and --to are the same step ({emb.labels[t0]}); choose two different steps")
    if by not in BY:
        raise AnalysisError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    if by != "mean" and not emb.variational:
        raise AnalysisError(f"--by {by} needs a posterior; {emb.source} is a MAP run (use --by mean)")
    dist = cosine_distance(emb.U[t0], emb.U[t1]).numpy()  # (V,)
    p0, p1 = emb.present(t0, min_count), emb.present(t1, min_count)
    ok = p0 & p1
    status = []
    for a, b in zip(p0.tolist(), p1.tolist()):  # one label per word for the table and CSV
        if a and b:
            status.append("ranked")
        elif not a and not b:
            status.append(f"no data in {emb.labels[t0]} and {emb.labels[t1]}")
        else:
            status.append(f"no data in {emb.labels[t0] if not a else emb.labels[t1]}")
    ch = Changes(t0=t0, t1=t1, distance=dist, ranked=np.zeros(0, np.int64), unranked=np.nonzero(~ok)[0],
                 count0=None if emb.counts is None else emb.counts[t0], count1=None if emb.counts is None else emb.counts[t1],
                 level=level, by=by, min_count=min_count, status=status)
    if emb.variational:
        ch.post_mean, ch.post_lo, ch.post_hi = posterior_distance_stats(emb, t0, t1, samples, level, seed)
    key = dist if by == "mean" else ch.post_mean
    idx = np.nonzero(ok)[0]
    ch.ranked = idx[np.lexsort((idx, -key[idx]))]  # largest first, ties by vocabulary order
    if len(ch.ranked) == 0:
        why = (f"step {emb.labels[t0] if not emb.train_mask[t0] else emb.labels[t1]} was held out of training"
               if not (emb.train_mask[t0] and emb.train_mask[t1]) else f"no word has co-occurrence mass >= {min_count} "
               "in both steps")
        raise AnalysisError(f"no word can be ranked between {emb.labels[t0]} and {emb.labels[t1]}: {why}")
    return ch


def change_records(emb: Embeddings, ch: Changes) -> tuple[list[str], list[list]]:
    """Header and one row per vocabulary word (ranked first, then the unranked ones)."""
    header = ["rank", "word", "distance"]
    if ch.post_mean is not None:
        header += ["posterior_mean", f"ci{int(round(ch.level * 100))}_low", f"ci{int(round(ch.level * 100))}_high"]
    header += [f"count_{emb.labels[ch.t0]}", f"count_{emb.labels[ch.t1]}", "status"]
    rank = {int(i): r + 1 for r, i in enumerate(ch.ranked.tolist())}
    rows = []
    for i in list(ch.ranked.tolist()) + list(ch.unranked.tolist()):
        row: list = [rank.get(i, ""), emb.vocab[i], round(float(ch.distance[i]), 6)]
        if ch.post_mean is not None:
            row += [round(float(ch.post_mean[i]), 6), round(float(ch.post_lo[i]), 6), round(float(ch.post_hi[i]), 6)]
        row += ["" if ch.count0 is None else float(ch.count0[i]), "" if ch.count1 is None else float(ch.count1[i]),
                ch.status[i]]
        rows.append(row)
    return header, rows


def changes_table(emb: Embeddings, ch: Changes, idx: np.ndarray) -> str:
    from goldstone_cli.analysis.embeddings import format_table

    lvl = int(round(ch.level * 100))
    header = ["rank", "word", "1-cos(means)"]
    if ch.post_mean is not None:
        header += ["posterior mean", f"{lvl}% interval"]
    if ch.count0 is not None:
        header += [f"mass {emb.labels[ch.t0]}", f"mass {emb.labels[ch.t1]}"]
    rank = {int(i): r + 1 for r, i in enumerate(ch.ranked.tolist())}
    rows = []
    for i in idx.tolist():
        row = [str(rank[i]), emb.vocab[i], f"{ch.distance[i]:.3f}"]
        if ch.post_mean is not None:
            row += [f"{ch.post_mean[i]:.3f}", f"[{ch.post_lo[i]:.3f}, {ch.post_hi[i]:.3f}]"]
        if ch.count0 is not None:
            row += [f"{ch.count0[i]:,.0f}", f"{ch.count1[i]:,.0f}"]
        rows.append(row)
    return format_table(header, rows)
