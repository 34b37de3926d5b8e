"""SemEval-2020 Task 1 (unsupervised lexical semantic change detection) corpora -> co-occurrences.

The official layout of one language (e.g. ``semeval2020_ulscd_eng/``)::

    corpus1/lemma/<name>.txt.gz     # period 1: lemmatized, one sentence per line, gzip (or plain .txt)
    corpus2/lemma/<name>.txt.gz     # period 2
    targets.txt                     # one target per line (English: with a POS tag, e.g. plane_nn)
    truth/binary.txt, truth/graded.txt   # "target<TAB>value" (post-evaluation release)

``corpus3/``, ... are read too, as further periods. Each period becomes one time step; its tokens are
the whitespace-separated lemmas as they stand (the corpora are lemmatized and tokenized already; the
targets' ``_pos`` suffix is part of the token). Every line is a sentence: windows (the window-4
weights 4, 3, 2, 1 of ``cooc``) never cross lines. Digit-only tokens take a position but never enter
the vocabulary (as in corpus.py).

Vocabulary: the ``vocab_size`` words by mean relative frequency over the periods (``rank='count'``:
total count), and every target that occurs at all, whatever its rank (lowest-ranked words make
room). Periods are dated by the language's published years when the folder name ends in
``_eng``, ``_ger``, ``_lat`` or ``_swe`` (English: CCOHA 1810-1860, 1960-2010), else as years 1, 2, ...
(then the prior's gap between the periods is one year: set ``model.D`` accordingly).
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from goldstone_cli.data.cooc import WINDOW_WEIGHTS, CoocWriter, check_output_dir, inputs_entry, pair_rows_to_symmetric
from goldstone_cli.io import read_lines

PREFIX = "semeval:"
# published periods of the four languages (task description paper, Table 1)
PERIODS = {
    "eng": [(1810, 1860), (1960, 2010)],
    "ger": [(1800, 1899), (1946, 1990)],
    "lat": [(-200, 0), (1, 2000)],
    "swe": [(1790, 1830), (1895, 1903)],
}
DIGITS = re.compile(r"^\d+$")
CHUNK_LINES = 50_000  # sentences per batch (bounds memory: a few hundred MB of Python strings at most)


def corpus_files(root: Path) -> list[list[Path]]:
    """The lemma files of corpus1, corpus2, ... (at least two periods)."""
    if not root.is_dir():
        raise FileNotFoundError(f"SemEval folder {root} does not exist; give --source semeval:DIR with DIR holding "
                                "corpus1/lemma/ and corpus2/lemma/")
    periods = []
    k = 1
    while (root / f"corpus{k}").is_dir():
        lemma = root / f"corpus{k}" / "lemma"
        files = sorted(p for p in lemma.glob("*") if p.is_file() and p.name.endswith((".txt.gz", ".txt"))) \
            if lemma.is_dir() else []
        if not files:
            raise ValueError(f"{lemma} holds no .txt.gz or .txt file (the SemEval layout is corpusK/lemma/*.txt.gz)")
        periods.append(files)
        k += 1
    if len(periods) < 2:
        raise ValueError(f"{root}: expected corpus1/lemma/*.txt.gz and corpus2/lemma/*.txt.gz (found {len(periods)} "
                         "period folders)")
    return periods


def read_targets(path: Path) -> list[str]:
    """The first tab-separated field of each non-blank line of ``targets.txt``, stripped; lines end at
    "\\n" only (``io.read_lines``: ``str.splitlines`` split a target at U+2028, \\x85, \\x0c, ...). A target
    listed twice is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"targets file {path} does not exist")
    words = [ln.split("\t")[0].strip() for ln in read_lines(path) if ln.strip()]
    if not words:
        raise ValueError(f"targets file {path} is empty")
    if twice := sorted(w for w, n in Counter(words).items() if n > 1):  # refused as eval lsc's read_targets does
        raise ValueError(f"targets file {path} lists a word twice: {', '.join(map(repr, twice[:5]))}; "
                         "remove the repeated line")
    return words


def _lines(files: list[Path]) -> Iterator[str]:
    for f in files:
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                yield from fh
        except (UnicodeDecodeError, OSError, EOFError) as exc:
            raise ValueError(f"{f}: cannot be read as UTF-8 text{' (gzip)' if f.name.endswith('.gz') else ''}: {exc}") from None


def _chunks(files: list[Path]) -> Iterator[list[list[str]]]:
    buf = []
    for ln in _lines(files):
        toks = ln.split()
        if toks:
            buf.append(toks)
        if len(buf) >= CHUNK_LINES:
            yield buf
            buf = []
    if buf:
        yield buf


def period_years(root: Path, n: int) -> list[tuple[int, int]]:
    m = re.search(r"_(eng|ger|lat|swe)$", root.resolve().name)
    if m and len(PERIODS[m.group(1)]) == n:
        return PERIODS[m.group(1)]
    return [(k + 1, k + 1) for k in range(n)]


def prepare_semeval(root: str | Path, out: str | Path, vocab_size: int = 10_000, rank: str = "relfreq",
                    force: bool = False, progress: bool = True):
    from goldstone_cli.data.corpus import CorpusResult

    root = Path(root)
    out = check_output_dir(out, force)
    periods = corpus_files(root)
    targets = read_targets(root / "targets.txt") if (root / "targets.txt").is_file() else []
    n = len(periods)
    # pass 1: counts per period
    counts: list[Counter] = []
    tokens = np.zeros(n, dtype=np.int64)
    sentences = 0
    for k, files in enumerate(periods):
        c: Counter = Counter()
        for chunk in tqdm(_chunks(files), desc=f"vocabulary corpus{k + 1}", disable=not progress, unit="chunk"):
            for toks in chunk:  # Counter.update is the C-level counting loop
                c.update(toks)
            sentences += len(chunk)
        tokens[k] = sum(c.values())
        if not tokens[k]:  # an all-zero step would train as if the period had no text at all
            raise ValueError(f"{root}: corpus{k + 1} holds no tokens ({', '.join(f.name for f in files)} "
                             "empty); every period needs its text")
        counts.append(c)
    types = sorted(set().union(*counts) - {w for c in counts for w in c if DIGITS.match(w)})
    if not types:
        raise ValueError(f"{root}: the corpora hold no word tokens")
    C = np.array([[c.get(w, 0) for w in types] for c in counts], dtype=np.float64)  # (n, U)
    total = C.sum(0)
    score = (C / np.maximum(tokens[:, None], 1)).mean(0) if rank == "relfreq" else total
    order = np.lexsort((np.array(types), -total, -score))
    chosen = [types[i] for i in order[:vocab_size]]
    index_all = {w: i for i, w in enumerate(types)}
    forced = [t for t in targets if t in index_all and t not in set(chosen)]
    if forced:  # targets always in the vocabulary: drop the lowest-ranked non-targets for them
        tset = set(targets)
        keep = [w for w in chosen if w in tset]
        rest = [w for w in chosen if w not in tset]
        chosen = keep + rest[:max(0, vocab_size - len(keep) - len(forced))] + forced
        chosen.sort(key=lambda w: (-score[index_all[w]], -total[index_all[w]], w))
    vocab = chosen
    V = len(vocab)
    vid = {w: i for i, w in enumerate(vocab)}
    missing = [t for t in targets if t not in vid]
    # pass 2: window-4 co-occurrences inside each sentence
    years = period_years(root, n)
    with CoocWriter(out, vocab, np.array([int(total[index_all[w]]) for w in vocab], dtype=np.int64), force=force) as w:
        tot_weight = 0
        for k, files in enumerate(periods):
            acc = sp.csr_matrix((V, V), dtype=np.int64)
            for chunk in tqdm(_chunks(files), desc=f"co-occurrences corpus{k + 1}", disable=not progress, unit="chunk"):
                lens = np.fromiter((len(s) for s in chunk), dtype=np.int64, count=len(chunk))
                ids = np.fromiter((vid.get(t, -1) for s in chunk for t in s), dtype=np.int64, count=int(lens.sum()))
                sent = np.repeat(np.arange(len(chunk)), lens)  # (n_tok,) sentence of every token
                rows, cols, ws = [], [], []
                for dist, wt in enumerate(WINDOW_WEIGHTS, start=1):  # distance d, weight 5 - d
                    a, b = ids[:-dist], ids[dist:]
                    ok = (a >= 0) & (b >= 0) & (sent[:-dist] == sent[dist:])
                    rows.append(np.minimum(a[ok], b[ok]))
                    cols.append(np.maximum(a[ok], b[ok]))
                    ws.append(np.full(int(ok.sum()), wt, dtype=np.int64))
                acc = acc + sp.csr_matrix((np.concatenate(ws), (np.concatenate(rows), np.concatenate(cols))), shape=(V, V))
            upper = acc.tocoo()
            m = pair_rows_to_symmetric(upper.row.astype(np.int64) * V + upper.col.astype(np.int64), upper.data, V)
            tot_weight += int(m.sum())
            s, e = years[k]
            w.add_step(f"corpus{k + 1}" if (s, e) == (k + 1, k + 1) else f"{s}-{e}", s, e, m, int(tokens[k]))
        manifest = {
            "kind": "corpus",
            "inputs": [inputs_entry(f, "document", period=k + 1) for k, files in enumerate(periods) for f in files],
            "settings": {"source": PREFIX + str(root.resolve()), "vocab_size": vocab_size, "rank": rank,
                         "tokenizer": "whitespace (lemmatized input)", "lowercase": False,
                         "window_crosses_lines": False, "targets_forced": len(forced), "targets_missing": missing,
                         "digit_tokens_in_vocab": False},
            "malformed": {"lines": 0, "examples": []},
            "stats": {"documents": sentences, "tokens": int(tokens.sum()), "types": len(types), "empty_steps": []},
        }
        path = w.finish(manifest)
    return CorpusResult(out=path, n_steps=n, vocab_size=V, n_documents=sentences, n_tokens=int(tokens.sum()),
                        empty_steps=[], total_weight=tot_weight)
