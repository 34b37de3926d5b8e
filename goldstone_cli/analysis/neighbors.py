"""Nearest neighbours of a word at several steps (the classic table of semantic-change papers).

At step t the candidates are the words present in t (co-occurrence mass >= ``min_count``): a word
without data in t has only the prior's extrapolation there, and would otherwise crowd the table
with words the corpus never shows at that time. The query word's own vector is used whether or not
it is present; its presence is reported with the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings


@dataclass
class StepNeighbors:
    step: int
    label: str
    query_present: bool
    query_count: Optional[float]
    words: list[str]
    cosines: list[float]


def default_steps(emb: Embeddings, n: int = 5) -> list[int]:
    """All trained steps when there are at most ``n``, else ``n`` evenly spaced ones (first and last included)."""
    trained = np.nonzero(emb.train_mask)[0]
    if len(trained) <= n:
        return trained.tolist()
    return trained[np.linspace(0, len(trained) - 1, n).round().astype(int)].tolist()


def neighbors(emb: Embeddings, word: str, steps: Sequence[int], top: int = 10, min_count: float = 1.0) -> list[StepNeighbors]:
    if top < 1:
        raise AnalysisError(f"--top must be at least 1, got {top}")
    i = emb.index(word)
    out = []
    for t in steps:  # a handful of steps, each one batched matrix-vector product over the vocabulary
        E = torch.nn.functional.normalize(emb.U[t], dim=-1)  # (V, d)
        cos = E @ E[i]  # (V,)
        ok = torch.as_tensor(emb.present(t, min_count))
        ok[i] = False
        cos = torch.where(ok, cos, torch.full_like(cos, -float("inf")))
        k = min(top, int(ok.sum()))
        vals, idx = cos.topk(k)
        out.append(StepNeighbors(step=t, label=emb.labels[t], query_present=bool(emb.present(t, min_count)[i]),
                                 query_count=None if emb.counts is None else float(emb.counts[t, i]),
                                 words=[emb.vocab[j] for j in idx.tolist()], cosines=[float(v) for v in vals.tolist()]))
    return out


def neighbors_records(word: str, res: Sequence[StepNeighbors]) -> tuple[list[str], list[list]]:
    header = ["word", "step", "query_present", "query_count", "rank", "neighbor", "cosine"]
    rows = [[word, r.label, r.query_present, "" if r.query_count is None else r.query_count, k + 1, w, round(c, 6)]
            for r in res for k, (w, c) in enumerate(zip(r.words, r.cosines))]
    return header, rows


def neighbors_table(word: str, res: Sequence[StepNeighbors], show_cos: bool = False) -> str:
    from goldstone_cli.analysis.embeddings import format_table

    rows = []
    for r in res:
        flag = "" if r.query_present else f" ('{word}' has no data here)"
        cells = [f"{w} ({c:.2f})" if show_cos else w for w, c in zip(r.words, r.cosines)]
        rows.append([r.label + flag, ", ".join(cells)])
    return format_table(["step", f"nearest neighbours of '{word}'"], rows)
