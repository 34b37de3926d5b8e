"""SemEval-2020 Task 1: graded and binary change scores for the targets, and the official measures.

Graded score (subtask 2) of a target: the cosine distance ``1 - cos(u_t0, u_t1)`` between the two
periods (``score="mean"``: of the posterior means; ``"posterior"``: the posterior mean of the distance,
variational runs). Binary decision (subtask 1): score > threshold, with the threshold ``"mean"`` or
``"median"`` of the targets' graded scores (unsupervised: no labels are used), or a number.

Measures: subtask 1 accuracy (fraction of targets whose decision equals the truth), subtask 2
Spearman's rank correlation (Pearson correlation of the rank vectors, ties given their average rank,
the definition scipy.stats.spearmanr uses).

Answer files in the task's submission format: ``answer/task1/<language>.txt`` and
``answer/task2/<language>.txt``, lines ``target<TAB>value``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings
from goldstone_cli.io import read_lines


@dataclass
class LSCPrediction:
    targets: list[str]
    graded: list[float]
    binary: list[int]
    threshold: float
    language: str = "english"


def read_targets(path: str | Path) -> list[str]:
    """The first tab-separated field of each non-blank line, stripped. Lines end at "\\n" only
    (``io.read_lines``): a target may hold U+2028, \\x85, \\x0c, ... (``str.splitlines`` split it)."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"targets file {path} does not exist")
    words = [ln.split("\t")[0].strip() for ln in read_lines(path) if ln.strip()]
    if not words:
        raise AnalysisError(f"targets file {path} is empty")
    if len(set(words)) != len(words):
        raise AnalysisError(f"targets file {path} lists a word twice")
    return words


def lsc_predict(emb: Embeddings, targets_file: str | Path, t0: int, t1: int, threshold: str = "mean",
                score: str = "mean", samples: int = 200, seed: int = 0) -> LSCPrediction:
    import torch

    from goldstone_cli.analysis.changes import cosine_distance, posterior_distance_stats

    if t0 == t1:
        raise AnalysisError(f"--from and --to are the same step ({emb.labels[t0]}); choose two different steps")
    targets = read_targets(targets_file)
    vocab = set(emb.vocab)
    missing = [t for t in targets if t not in vocab]
    if missing:
        raise AnalysisError(f"{len(missing)} targets are not in the vocabulary of {emb.source}: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} (prepare the corpus with --source semeval:DIR, "
                            "which keeps every target that occurs)")
    idx = torch.as_tensor([emb.index(t) for t in targets])
    if score == "mean":
        g = cosine_distance(emb.U[t0, idx], emb.U[t1, idx]).numpy()
    elif score == "posterior":
        g = posterior_distance_stats(emb, t0, t1, samples, 0.9, seed, rows=idx)[0]
    else:
        raise AnalysisError(f"--score must be 'mean' or 'posterior', got {score!r}")
    if threshold == "mean":
        thr = float(np.mean(g))
    elif threshold == "median":
        thr = float(np.median(g))
    else:
        try:
            thr = float(threshold)
        except ValueError:
            raise AnalysisError(f"--threshold must be 'mean', 'median' or a number, got {threshold!r}") from None
    lang = {"eng": "english", "ger": "german", "lat": "latin", "swe": "swedish"}
    name = Path(targets_file).resolve().parent.name
    language = next((v for k, v in lang.items() if name.endswith("_" + k)), "english")
    return LSCPrediction(targets=targets, graded=[float(x) for x in g], binary=[int(x > thr) for x in g],
                         threshold=thr, language=language)


def read_truth(path: str | Path, targets: Sequence[str]) -> tuple[dict, dict]:
    """``truth/binary.txt`` and ``truth/graded.txt`` (``path`` is the truth folder or the folder above it):
    lines ``target<TAB>value`` ending at "\\n" only (``io.read_lines``), stripped, the two fields
    separated by tabs or spaces (not by the other whitespace ``str.split`` knows, which a target may
    hold, as :func:`read_targets` reads it)."""
    path = Path(path)
    if (path / "truth").is_dir() and not (path / "binary.txt").is_file():
        path = path / "truth"
    out = []
    for name, conv in (("binary.txt", int), ("graded.txt", float)):
        f = path / name
        if not f.is_file():
            raise AnalysisError(f"no {name} in {path} (the truth folder holds binary.txt and graded.txt)")
        vals = {}
        for k, ln in enumerate(read_lines(f), start=1):
            if not ln.strip():
                continue
            parts = re.split(r"[ \t]+", ln.strip())  # not at U+2028, \x85, ... inside a target (str.split)
            if len(parts) != 2:
                raise AnalysisError(f"{f}, line {k}: expected 'target<TAB>value', got {ln[:60]!r}")
            try:
                vals[parts[0]] = conv(parts[1])
            except ValueError:
                raise AnalysisError(f"{f}, line {k}: {parts[1]!r} is not a {'0/1' if conv is int else 'number'}") from None
        lack = [t for t in targets if t not in vals]
        if lack:
            raise AnalysisError(f"{f} has no value for {len(lack)} targets, e.g. {', '.join(lack[:3])}")
        out.append(vals)
    return out[0], out[1]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    start = np.r_[True, xs[1:] != xs[:-1]]  # first element of each tie group
    gid = np.cumsum(start) - 1  # (n,) group of each sorted element
    first = np.nonzero(start)[0]
    last = np.r_[first[1:], len(x)] - 1
    avg = (first + last) / 2.0 + 1.0  # average rank of each group
    r = np.empty(len(x))
    r[order] = avg[gid]
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def evaluate(pred: LSCPrediction, true_binary: dict, true_graded: dict) -> dict:
    tb = np.array([true_binary[w] for w in pred.targets])
    correct = int((np.asarray(pred.binary) == tb).sum())
    return {"accuracy": correct / len(pred.targets), "correct": correct,
            "spearman": spearman(pred.graded, [true_graded[w] for w in pred.targets])}


def write_answers(pred: LSCPrediction, folder: Path) -> list[Path]:
    from goldstone_cli.io import atomic_write_text

    p1 = folder / "answer" / "task1" / f"{pred.language}.txt"
    p2 = folder / "answer" / "task2" / f"{pred.language}.txt"
    atomic_write_text(p1, "".join(f"{w}\t{b}\n" for w, b in zip(pred.targets, pred.binary)))
    atomic_write_text(p2, "".join(f"{w}\t{g:.6f}\n" for w, g in zip(pred.targets, pred.graded)))
    return [p1, p2]
