"""Corpora with planted semantic changes, and how well a run recovers them.

Generated text (deterministic for a seed): ``n_topics`` topics of ``words_per_topic`` words each
(``t03w07`` is word 7 of topic 3). Every sentence picks one topic and draws its tokens from that
topic's words, so words of a topic co-occur and words of different topics do not. A *planted* word
(``drift0``, ``drift1``, ...) appears, at the same rate as any other word, in sentences of topic A
before its change year and of topic B from then on (a sense that is replaced); ``stable0``, ... are
control words of the same frequency that keep their topic.

Two layouts:
- :func:`make_dated_corpus`: ``OUT/texts/<year>.txt`` (the dated-folder format that
  ``goldstone data prepare corpus --source OUT/texts`` reads) and the truth ``OUT/planted.tsv``
  (``word  change_year  topic_before  topic_after``; controls have an empty change year);
- :func:`make_semeval_corpus`: the SemEval-2020 Task 1 layout (``corpus1/lemma/*.txt.gz``,
  ``corpus2/lemma/*.txt.gz``, ``targets.txt``, ``truth/binary.txt``, ``truth/graded.txt``) with
  targets ``<word>_nn``: in corpus 2 a fraction g of a target's sentences come from a new topic; the
  graded truth is g and the binary truth is 1 where g >= 0.1 (a sense gained).

:func:`evaluate_planted` ranks the words of a run with :func:`analysis.changes.word_changes` between
its first and last trained steps and reports the precision of the top K (K = number of planted
words) and, for each planted word, the change year read off its distance curve (the split of the
curve ``1 - cos(u_t, u_first)`` into two constant pieces with the least squared error; the estimate
is the first year of the second piece).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings
from goldstone_cli.io import read_lines

TRUTH_FILE = "planted.tsv"


def _topic_words(n_topics: int, words_per_topic: int) -> list[list[str]]:
    return [[f"t{k:02d}w{j:02d}" for j in range(words_per_topic)] for k in range(n_topics)]


def _sentences(rng: np.random.Generator, topic_words: list[list[str]], n: int, length: int,
               special: dict[int, list[str]]) -> list[list[str]]:
    """``n`` sentences of ``length`` tokens; ``special[k]`` are extra words that belong to topic k now."""
    K = len(topic_words)
    topics = rng.integers(0, K, size=n)  # (n,)
    out = []
    for k in topics.tolist():  # text generation (a few thousand sentences), not a hot path
        pool = topic_words[k] + special.get(k, [])
        out.append([pool[j] for j in rng.integers(0, len(pool), size=length).tolist()])
    return out


@dataclass
class PlantedTruth:
    words: list[str]  # planted words
    change_years: list[int]
    controls: list[str]


def make_dated_corpus(out: str | Path, first_year: int = 1900, last_year: int = 1959,
                      change_years: Sequence[int] = (1915, 1930, 1945), n_topics: int = 10, words_per_topic: int = 15,
                      sentences_per_year: int = 150, sentence_length: int = 12, n_controls: int = 3,
                      seed: int = 0, force: bool = False) -> Path:
    """Write a planted-drift corpus in the dated-folder format (see the module docstring)."""
    from goldstone_cli.io import atomic_write_text

    out = Path(out)
    if (out / TRUTH_FILE).exists() and not force:
        raise AnalysisError(f"{out} already holds a generated corpus; choose another --out or pass --force")
    if not all(first_year < y <= last_year for y in change_years):
        raise AnalysisError(f"change years {list(change_years)} must lie in ({first_year}, {last_year}]")
    if n_topics < 2 * len(change_years) + n_controls:
        raise AnalysisError("need at least two topics per planted word plus one per control word")
    rng = np.random.default_rng(seed)
    tw = _topic_words(n_topics, words_per_topic)
    planted = [f"drift{i}" for i in range(len(change_years))]
    controls = [f"stable{i}" for i in range(n_controls)]
    before = [2 * i for i in range(len(planted))]  # topic A of drift i
    after = [2 * i + 1 for i in range(len(planted))]  # topic B of drift i
    home = [2 * len(planted) + i for i in range(n_controls)]
    texts = out / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    for year in range(first_year, last_year + 1):
        special: dict[int, list[str]] = {}
        for w, y, a, b in zip(planted, change_years, before, after):
            special.setdefault(a if year < y else b, []).append(w)
        for w, h in zip(controls, home):
            special.setdefault(h, []).append(w)
        sents = _sentences(rng, tw, sentences_per_year, sentence_length, special)
        atomic_write_text(texts / f"{year}.txt", "\n".join(" ".join(s) + "." for s in sents) + "\n")
    lines = ["word\tchange_year\ttopic_before\ttopic_after"]
    lines += [f"{w}\t{y}\t{a}\t{b}" for w, y, a, b in zip(planted, change_years, before, after)]
    lines += [f"{w}\t\t{h}\t{h}" for w, h in zip(controls, home)]
    atomic_write_text(out / TRUTH_FILE, "\n".join(lines) + "\n")
    return out


def read_truth(path: str | Path) -> PlantedTruth:
    path = Path(path)
    f = path / TRUTH_FILE if path.is_dir() else path
    if not f.is_file():
        raise AnalysisError(f"no {TRUTH_FILE} at {path}; generate a corpus with `goldstone data make-planted`")
    words, years, controls = [], [], []
    for k, ln in enumerate(read_lines(f)[1:], start=2):  # lines end at "\n" only: a word may hold U+2028, ...
        if not ln.strip():
            continue
        r = ln.split("\t")
        if len(r) != 4 or not r[0]:
            raise AnalysisError(f"{f}, line {k}: expected 4 tab-separated columns (word, change_year, topic_before, "
                                f"topic_after; change_year empty for a control word), got {ln[:60]!r}")
        if not r[1]:
            controls.append(r[0])
            continue
        try:
            years.append(int(r[1]))
        except ValueError:
            raise AnalysisError(f"{f}, line {k}: the change year of {r[0]!r} must be a year, got {r[1]!r}") from None
        words.append(r[0])
    if not words:
        raise AnalysisError(f"{f} names no planted word (a row with a change year); generate a corpus with "
                            "`goldstone data make-planted`")
    return PlantedTruth(words=words, change_years=years, controls=controls)


def make_semeval_corpus(out: str | Path, n_topics: int = 10, words_per_topic: int = 15, sentences: int = 3000,
                        sentence_length: int = 10, graded: Sequence[float] = (0.0, 0.0, 0.0, 0.1, 0.2, 0.5, 0.7, 0.9),
                        seed: int = 0, force: bool = False) -> Path:
    """The SemEval-2020 Task 1 layout with planted changes. Target i (``target{i}_nn``) lives in topic
    i mod n_topics in corpus 1; in corpus 2 a fraction ``graded[i]`` of its occurrences move to topic
    i+1 (a new sense). Truth: graded = that fraction; binary = 1 where the new sense takes at least
    a tenth of the uses in corpus 2 (the task's rule marks a word changed when a sense is gained or
    lost), i.e. ``graded >= 0.1``. Files are gzip, one sentence per line, lemmatized-style tokens."""
    from goldstone_cli.io import atomic_path, atomic_write_text

    out = Path(out)
    if (out / "targets.txt").exists() and not force:
        raise AnalysisError(f"{out} already holds a corpus; choose another --out or pass --force")
    rng = np.random.default_rng(seed)
    tw = _topic_words(n_topics, words_per_topic)
    targets = [f"target{i}_nn" for i in range(len(graded))]
    for c in (1, 2):
        sents = _sentences(rng, tw, sentences, sentence_length, {})
        # each target occurs in `per` sentences of its topic(s), inserted at a random position
        per = max(20, sentences // 30)
        for i, (w, g) in enumerate(zip(targets, graded)):
            home, new = i % n_topics, (i + 1) % n_topics
            n_new = int(round(per * g)) if c == 2 else 0
            for topic in [home] * (per - n_new) + [new] * n_new:
                pool = tw[topic]
                s = [pool[j] for j in rng.integers(0, len(pool), size=sentence_length).tolist()]
                s[int(rng.integers(0, sentence_length))] = w
                sents.append(s)
        order = rng.permutation(len(sents))  # sentences randomly shuffled, as in the task's corpora
        lines = [" ".join(sents[j]) for j in order.tolist()]
        path = out / f"corpus{c}" / "lemma" / f"synthetic{c}.txt.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".gz") as tmp:
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:  # same bytes
                f.write(("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_text(out / "targets.txt", "\n".join(targets) + "\n")
    atomic_write_text(out / "truth" / "graded.txt", "".join(f"{w}\t{g}\n" for w, g in zip(targets, graded)))
    atomic_write_text(out / "truth" / "binary.txt", "".join(f"{w}\t{int(g >= 0.1)}\n" for w, g in zip(targets, graded)))
    return out


# ----------------------------------------------------------------------------- evaluation
def change_point(curve: np.ndarray) -> int:
    """Index s (1 <= s < len) minimizing the squared error of fitting curve[:s] and curve[s:] by
    their means (vectorized over all splits with cumulative sums)."""
    x = np.asarray(curve, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise AnalysisError("a change point needs at least two steps")
    c1, c2 = np.cumsum(x), np.cumsum(x * x)
    s = np.arange(1, n)
    left = c2[s - 1] - c1[s - 1] ** 2 / s
    right = (c2[-1] - c2[s - 1]) - (c1[-1] - c1[s - 1]) ** 2 / (n - s)
    return int(s[np.argmin(left + right)])


@dataclass
class PlantedScore:
    k: int
    precision: float
    top: list[str]
    ranks: dict  # planted word -> rank
    years_true: dict
    years_found: dict
    year_error: float  # mean absolute error in years


def evaluate_planted(emb: Embeddings, truth: PlantedTruth, min_count: float = 1.0, seed: int = 0) -> PlantedScore:
    from goldstone_cli.analysis.changes import cosine_distance, word_changes

    trained = np.nonzero(emb.train_mask)[0]
    missing = [w for w in truth.words if w not in set(emb.vocab)]
    if missing:
        raise AnalysisError(f"planted words {missing} are not in the vocabulary of {emb.source}")
    ch = word_changes(emb, int(trained[0]), int(trained[-1]), min_count=min_count, samples=50, seed=seed)
    k = len(truth.words)
    top = [emb.vocab[i] for i in ch.ranked[:k].tolist()]
    rank = {emb.vocab[i]: r + 1 for r, i in enumerate(ch.ranked.tolist())}
    found = {}
    for w in truth.words:
        i = emb.index(w)
        curve = cosine_distance(emb.U[trained, i], emb.U[int(trained[0]), i].expand(len(trained), -1)).numpy()
        found[w] = int(emb.years[trained[change_point(curve)]])
    years_true = dict(zip(truth.words, truth.change_years))
    err = float(np.mean([abs(found[w] - years_true[w]) for w in truth.words]))
    return PlantedScore(k=k, precision=len(set(top) & set(truth.words)) / k, top=top,
                        ranks={w: rank.get(w) for w in truth.words}, years_true=years_true, years_found=found,
                        year_error=err)
