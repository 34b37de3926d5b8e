"""The on-disk co-occurrence format shared by every corpus pipeline and read by Dynamic Word Embeddings.

A prepared corpus is one folder ``DIR``::

    DIR/
      manifest.json     written last; a folder without a complete manifest is refused by the reader
      vocab.tsv         header ``index<TAB>word<TAB>count``; one row per word, index 0..V-1 in order;
                        count = the word's total count over all time steps used
      times.tsv         header ``step<TAB>label<TAB>start<TAB>end<TAB>time<TAB>weight<TAB>tokens``;
                        one row per time step t = 0..T-1, in increasing time:
                          label   a name ("1850" for a year, "1850-1859" for a bin)
                          start   first year in the step, end  last year in the step (inclusive)
                          time    the step's position in years, (start + end) / 2 (use its differences
                                  as the DWE transition gaps tau_t)
                          weight  sum of all entries of the step's matrix (= n+ total of DESIGN.md Sec. 4)
                          tokens  number of running word tokens in the step, in or out of the vocabulary
                                  (Google Books: the year's 1-gram total, see ``ngrams``)
      cooc_00000.npz    one scipy CSR matrix per time step t (``cooc_{t:05d}.npz``, ``scipy.sparse.save_npz``,
      cooc_00001.npz    uncompressed): shape (V, V), int64 counts, indices sorted, no stored zeros
      ...

Counting rule (DESIGN.md Sec. 5): within a window of 5 consecutive tokens, every pair of positions
p < q whose two tokens i, j are both in the vocabulary adds ``(5 - (q - p)) * n`` (weights 4, 3, 2, 1
for distances 1..4; n = the 5-gram's match count, or 1 for running text) to entry (i, j) *and* to
entry (j, i). So every matrix is symmetric, ``M = A + A^T`` with ``A`` the pair counts, and a pair of
equal words (i == i) adds twice its weight to the diagonal entry (i, i). ``weight`` in ``times.tsv`` is
therefore twice the sum of the pair weights. A time step without any text is kept as an all-zero
matrix (the model must interpolate it), never dropped.

``manifest.json`` holds: ``format`` ("goldstone-cooc"), ``version``, ``complete`` (true), ``kind``
("ngrams" or "corpus"), ``created_utc``, ``vocab_size``, ``n_steps``, ``bin_edges`` (T + 1 half-open
year edges: step t holds years ``bin_edges[t] <= year < bin_edges[t+1]``), ``counting`` (the rule
above), ``inputs`` (path, size, sha256, role, ...), ``settings`` (every option that changes the
result), ``malformed`` (count of malformed input lines and examples), ``stats`` and ``files`` (name ->
size and sha256 of every file above). The reader checks that every listed file exists with its
size; ``load_cooc(dir, verify=True)`` also checks the hashes.

Writing is atomic: everything goes into a temporary folder next to ``DIR`` that is renamed to ``DIR``
only after the manifest is written, so an interrupted run leaves no ``DIR`` that a reader trusts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from goldstone_cli.io import file_sha256, pid_alive, split_lines
from goldstone_cli.paths import UnsafeNameError, child

FORMAT_NAME = "goldstone-cooc"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.tsv"
TIMES_FILE = "times.tsv"
VOCAB_HEADER = ("index", "word", "count")
TIMES_HEADER = ("step", "label", "start", "end", "time", "weight", "tokens")
WINDOW_WEIGHTS = (4, 3, 2, 1)  # weight 5 - d for token distance d = 1..4
COUNTING_RULE = ("for token positions p < q with q - p <= 4 and both tokens in the vocabulary, add "
                 "(5 - (q - p)) * match_count to M[i, j] and to M[j, i] (diagonal pairs add twice)")


class CoocFormatError(ValueError):
    """A folder is not a complete, readable prepared corpus."""


def step_file(t: int) -> str:
    return f"cooc_{t:05d}.npz"


@dataclass
class CoocData:
    """A prepared corpus in memory (see the module docstring for the meaning of each field)."""

    path: Path
    vocab: list[str]                 # (V,) words, index = row/column of every matrix
    counts: np.ndarray               # (V,) int64 total count of each word
    labels: list[str]                # (T,) step names
    start: np.ndarray                # (T,) int64 first year of each step
    end: np.ndarray                  # (T,) int64 last year of each step (inclusive)
    times: np.ndarray                # (T,) float64 step position in years, (start + end) / 2
    totals: np.ndarray               # (T,) int64 sum of all entries of each matrix
    tokens: np.ndarray               # (T,) int64 running tokens per step
    matrices: list[sp.csr_matrix]    # (T,) symmetric (V, V) int64 co-occurrence counts
    manifest: dict[str, Any] = field(repr=False)

    @property
    def V(self) -> int:
        return len(self.vocab)

    @property
    def T(self) -> int:
        return len(self.matrices)

    @property
    def years(self) -> np.ndarray:
        """(T,) int64 first year of each step (= ``start``; for yearly data, the years themselves)."""
        return self.start

    @property
    def year_end(self) -> np.ndarray:
        """(T,) int64 last year of each step, inclusive (= ``end``)."""
        return self.end

    def word_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}


# ---------------------------------------------------------------------------------------------- writing

def _check_word(w: str) -> None:
    if not w or any(c in w for c in "\t\n\r"):
        raise ValueError(f"vocabulary word {w!r} is empty or contains a tab or newline; it cannot be stored "
                         f"in {VOCAB_FILE}")


def existing_output_state(out: Path) -> str:
    """'missing', 'empty' (an empty folder), 'complete' (a readable manifest) or 'other'."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        return "other"
    if not any(out.iterdir()):
        return "empty"
    try:
        read_manifest(out)
        return "complete"
    except CoocFormatError:
        return "other"


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail early (before hours of work) if ``out`` cannot be written without ``force``."""
    out = Path(out)
    state = existing_output_state(out)
    if state in ("complete", "other") and not force:
        what = "a prepared corpus" if state == "complete" else "other files"
        raise FileExistsError(f"output folder {out} already exists and holds {what}; choose another --out or "
                              f"pass --force to replace it")
    if state == "other" and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")
    return out


def remove_stale_temp_dirs(out: Path) -> None:
    """Remove temporary folders of earlier writers of ``out`` whose process no longer runs."""
    if not out.parent.is_dir():
        return
    pat = re.compile(re.escape(f".{out.name}.tmp-") + r"(\d+)(?:-\d+)?$")
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


class CoocWriter:
    """Write a prepared corpus step by step into a temporary folder; ``finish`` renames it into place.

    Use as a context manager: on an exception the temporary folder is removed and ``out`` is left as it
    was. Matrices are written as they come, so at most one is held here at a time.
    """

    _counter = 0

    def __init__(self, out: str | os.PathLike, vocab: Sequence[str], counts: Sequence[int] | np.ndarray,
                 force: bool = False):
        self.out = check_output_dir(out, force)
        self.force = force
        self.vocab = [str(w) for w in vocab]
        for w in self.vocab:
            _check_word(w)
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocabulary words must be unique")
        self.counts = np.asarray(counts, dtype=np.int64)  # (V,)
        if self.counts.shape != (len(self.vocab),):
            raise ValueError(f"counts has shape {self.counts.shape}, expected ({len(self.vocab)},)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(self.out)
        CoocWriter._counter += 1
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{CoocWriter._counter}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.rows: list[tuple] = []
        self._done = False

    def __enter__(self) -> "CoocWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def add_step(self, label: str, start: int, end: int, matrix: sp.spmatrix | sp.sparray | None,
                 tokens: int) -> None:
        """Append time step ``len(rows)``: a symmetric non-negative (V, V) matrix (None = empty step)."""
        V = len(self.vocab)
        if matrix is None:
            m = sp.csr_matrix((V, V), dtype=np.int64)
        else:
            m = sp.csr_matrix(matrix)
            if m.shape != (V, V):
                raise ValueError(f"step {label}: matrix shape {m.shape} != ({V}, {V})")
            if m.dtype.kind not in "iu":
                raise ValueError(f"step {label}: counts must be integers, got dtype {m.dtype}")
            m = m.astype(np.int64)
            m.sum_duplicates()
            m.eliminate_zeros()
            m.sort_indices()
            if m.nnz and m.data.min() < 0:
                raise ValueError(f"step {label}: negative co-occurrence count")
            if (m != m.T).nnz:
                raise ValueError(f"step {label}: co-occurrence matrix is not symmetric")
        if self.rows and int(start) <= self.rows[-1][3]:
            raise ValueError(f"step {label} starts at {start}, not after the previous step's end")
        t = len(self.rows)
        sp.save_npz(self.tmp / step_file(t), m, compressed=False)
        self.rows.append((t, str(label), int(start), int(end), (int(start) + int(end)) / 2.0,
                          int(m.sum()), int(tokens)))

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Write vocab.tsv, times.tsv and the manifest (last), then rename the folder to ``out``."""
        if not self.rows:
            raise ValueError("no time steps were written")
        with open(self.tmp / VOCAB_FILE, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(VOCAB_HEADER) + "\n")
            f.writelines(f"{i}\t{w}\t{c}\n" for i, (w, c) in enumerate(zip(self.vocab, self.counts.tolist())))
        with open(self.tmp / TIMES_FILE, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(TIMES_HEADER) + "\n")
            f.writelines("\t".join(str(x) for x in r) + "\n" for r in self.rows)
        names = [VOCAB_FILE, TIMES_FILE] + [step_file(t) for t in range(len(self.rows))]
        files = {n: {"size": (self.tmp / n).stat().st_size, "sha256": file_sha256(self.tmp / n)} for n in names}
        bin_edges = [r[2] for r in self.rows] + [self.rows[-1][3] + 1]
        full = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": True,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "vocab_size": len(self.vocab),
            "n_steps": len(self.rows),
            "bin_edges": bin_edges,
            "counting": COUNTING_RULE,
            "total_weight": int(sum(r[5] for r in self.rows)),
            **manifest,
            "files": files,
        }
        with open(self.tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(json.dumps(full, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.out.exists():
            if self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            elif self.force:
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.out, old)
            else:
                raise FileExistsError(f"output folder {self.out} appeared while writing; pass --force to replace it")
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.out


# ---------------------------------------------------------------------------------------------- reading

def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete prepared corpus; ``CoocFormatError`` if it is missing or incomplete."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CoocFormatError(f"{path} is not a prepared corpus: {MANIFEST} is missing (an interrupted run "
                              f"leaves no manifest; run `goldstone data prepare ...` again)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CoocFormatError(f"{mf} is not valid JSON ({exc}); prepare the corpus again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CoocFormatError(f"{mf} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CoocFormatError(f"{mf} has format version {manifest.get('version')}, this program reads version "
                              f"{FORMAT_VERSION}; prepare the corpus again")
    if manifest.get("complete") is not True or not isinstance(manifest.get("files"), dict):
        raise CoocFormatError(f"{mf} does not describe a complete corpus; prepare it again")
    for name, info in manifest["files"].items():
        try:  # a name read from the manifest must stay inside the folder (no '..', '/', links out)
            f = child(path, name, "file name", source=mf)
        except UnsafeNameError as exc:
            raise CoocFormatError(f"{exc}; prepare the corpus again") from None
        if not isinstance(info, dict):
            raise CoocFormatError(f"{mf}: the entry of {name} is not an object; prepare the corpus again")
        if not f.is_file():
            raise CoocFormatError(f"{path}: {name} is listed in the manifest but missing")
        if f.stat().st_size != info.get("size"):
            raise CoocFormatError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says "
                                  f"{info.get('size')}; the folder was modified, prepare the corpus again")
    expected = [VOCAB_FILE, TIMES_FILE] + ([step_file(t) for t in range(manifest["n_steps"])]
                                           if isinstance(manifest.get("n_steps"), int) else [])
    unlisted = [n for n in expected if n not in manifest["files"]]
    if unlisted:
        raise CoocFormatError(f"{mf} does not list {unlisted[0]}; the folder is incomplete, prepare the corpus again")
    for name in expected:  # the files the reader opens by their fixed names: no links out of the folder
        try:
            child(path, name, "file", source=mf)
        except UnsafeNameError as exc:
            raise CoocFormatError(f"{exc}; prepare the corpus again") from None
    return manifest


def _read_tsv(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    # Plain splitting, not pandas: words like "nan" or "null" must stay strings.
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as exc:
        raise CoocFormatError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); the file is damaged, "
                              "prepare the corpus again") from None
    if lines and lines[-1] == "":
        lines.pop()
    return _parse_tsv(path, lines, header)


def _parse_tsv(path: Path, lines: list[str], header: tuple[str, ...]) -> list[list[str]]:
    if not lines or tuple(lines[0].split("\t")) != header:
        raise CoocFormatError(f"{path}: first line must be the header {'<TAB>'.join(header)}")
    rows = [ln.split("\t") for ln in lines[1:]]
    for k, r in enumerate(rows):
        if len(r) != len(header):
            raise CoocFormatError(f"{path}, line {k + 2}: expected {len(header)} tab-separated fields, got {len(r)}")
    return rows


def load_cooc(path: str | os.PathLike, verify: bool = False) -> CoocData:
    """Read a prepared corpus folder (refused unless its manifest is complete; ``verify`` checks hashes)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        for name, info in manifest["files"].items():
            if file_sha256(path / name) != info.get("sha256"):
                raise CoocFormatError(f"{path}: {name} does not match its sha256 in the manifest")
    vrows = _read_tsv(path / VOCAB_FILE, VOCAB_HEADER)
    vocab = [r[1] for r in vrows]
    try:
        counts = np.array([int(r[2]) for r in vrows], dtype=np.int64)  # (V,)
        indices = [int(r[0]) for r in vrows]
    except (ValueError, OverflowError) as exc:
        raise CoocFormatError(f"{path / VOCAB_FILE}: {exc}; the file is damaged, prepare the corpus again") from None
    if indices != list(range(len(vrows))):
        raise CoocFormatError(f"{path / VOCAB_FILE}: indices must be 0..V-1 in order")
    trows = _read_tsv(path / TIMES_FILE, TIMES_HEADER)
    T, V = len(trows), len(vocab)
    if T != manifest.get("n_steps") or V != manifest.get("vocab_size"):
        raise CoocFormatError(f"{path}: {T} steps and {V} words on disk, the manifest says "
                              f"{manifest.get('n_steps')} and {manifest.get('vocab_size')}")
    matrices = []
    for t in range(T):
        try:  # np.load checks the zip CRC of every member it reads: flipped bytes fail here
            m = sp.load_npz(path / step_file(t)).tocsr()
        except Exception as exc:  # BadZipFile, zlib.error, ValueError, EOFError, ...
            raise CoocFormatError(f"{path / step_file(t)} cannot be read ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is damaged, "
                                  "prepare the corpus again") from None
        if m.shape != (V, V):
            raise CoocFormatError(f"{path / step_file(t)}: shape {m.shape}, expected ({V}, {V})")
        matrices.append(m)
    col = list(zip(*trows))
    try:
        numbers = dict(start=np.array(col[2], dtype=np.int64), end=np.array(col[3], dtype=np.int64),
                       times=np.array(col[4], dtype=np.float64), totals=np.array(col[5], dtype=np.int64),
                       tokens=np.array(col[6], dtype=np.int64))
    except (ValueError, OverflowError) as exc:
        raise CoocFormatError(f"{path / TIMES_FILE}: {exc}; the file is damaged, prepare the corpus again") from None
    return CoocData(
        path=path, vocab=vocab, counts=counts, labels=list(col[1]),
        **numbers, matrices=matrices, manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------- helpers

def read_word_list(path: str | os.PathLike) -> list[str]:
    """Words from a ``vocab.tsv`` of a prepared corpus, or from a text file with one word per line
    (stripped, blank lines skipped). Lines end at "\\n" only (``io.split_lines``; the bytes decoded,
    no newline translation): a word may hold U+2028, \\x85, \\x0c or a lone "\\r", which
    ``str.splitlines`` or text-mode reading turned into line ends. Windows line ends (CRLF) and a
    leading UTF-8 byte order mark are no part of a word."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    lines = split_lines(text)  # one "\r" at each line end dropped
    if lines and lines[0] == "\t".join(VOCAB_HEADER):
        return [r[1] for r in _parse_tsv(path, lines, VOCAB_HEADER)]
    words = [ln.strip() for ln in lines if ln.strip()]
    if not words:
        raise ValueError(f"vocabulary file {path} is empty")
    return words


def pair_rows_to_symmetric(pair_keys: np.ndarray, weights: np.ndarray, V: int) -> sp.csr_matrix:
    """(V, V) symmetric CSR ``A + A^T`` from pair keys ``i * V + j`` (i <= j) with weights (diagonal doubled)."""
    i = pair_keys // V
    j = pair_keys % V
    rows = np.concatenate([i, j])
    cols = np.concatenate([j, i])
    data = np.concatenate([weights, weights]).astype(np.int64)
    m = sp.csr_matrix((data, (rows, cols)), shape=(V, V))  # duplicates (the diagonal) are summed
    m.sort_indices()
    return m


def inputs_entry(path: str | os.PathLike, role: str, sha256: str | None = None, **extra) -> dict[str, Any]:
    p = Path(path)
    return {"path": str(p.resolve()), "role": role, "size": p.stat().st_size,
            "sha256": sha256 if sha256 is not None else file_sha256(p), **extra}
