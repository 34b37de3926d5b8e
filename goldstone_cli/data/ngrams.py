"""Google Books Ngram files -> yearly co-occurrence matrices (``cooc`` format), streamed and in parallel.

Layouts (detected per file from its first lines; gzip detected from the magic bytes, else plain text;
LF or CRLF line ends):
- v2 (2012): ``ngram TAB year TAB match_count TAB volume_count``, one line per ngram and year;
- v3 (2020): ``ngram TAB year,match_count,volume_count TAB year,match_count,volume_count ...``.
The published ``totalcounts`` files (one line of tab-separated ``year,match_count,page_count,volume_count``
records) are read by ``read_totalcounts``.

Tokens: Google's tokens are used as they are, lowercased by default (``lowercase``), with this rule for
part-of-speech annotations (``pos="drop"``, the default). Google publishes every text once untagged and
again with tags, so only the untagged copy is counted:
- a token ending in ``_TAG`` (``cat_NOUN``, ``._.``) or a bare tag ``_TAG_`` (``_ADJ_``), with TAG one
  of NOUN VERB ADJ ADV PRON DET ADP NUM CONJ PRT X ``.``, marks an *annotated* ngram: an annotated
  1-gram never enters the vocabulary nor the yearly totals, and an annotated 5-gram line is skipped
  (counted in the manifest as ``annotated_lines``, not as malformed);
- the sentence markers ``_START_``, ``_END_`` (and ``_ROOT_``) never enter the vocabulary; in a 5-gram
  they occupy their position like any out-of-vocabulary token.
``pos="keep"`` uses every token verbatim (for inputs that hold only tagged ngrams, say).

Vocabulary: from the 1-grams over ``years``, the ``vocab_size`` words with the highest score, ties by
total count then alphabetically:
- ``rank="relfreq"`` (default): the word's mean yearly relative frequency, mean over the years with a
  non-zero total of ``count(word, year) / total(year)``. The number of books per year grows by orders
  of magnitude from 1800 to 2008, so a total count is dominated by the last decades and would leave out
  words that were common in the 19th century, exactly the words whose change a dynamic model studies.
  The yearly totals come from ``totalcounts`` when given (one pass over the 1-grams), else from the
  1-grams themselves (then the 1-grams are read twice: totals, then scores).
- ``rank="count"``: total count over ``years``.
``vocab_words`` fixes the vocabulary instead (the 1-grams then only give the yearly totals), lowercased
as the tokens are (``lowercase``); a word given twice is an error, one that never occurs a warning.

Co-occurrences (DESIGN.md Sec. 5): for a 5-gram with match count n in year y, every pair of positions
p < q whose tokens i, j are in the vocabulary adds ``(5 - (q - p)) * n`` to ``M_y[i, j]`` and
``M_y[j, i]``. One matrix per year of ``years``; years without data are kept as empty steps. ``tokens`` in
``times.tsv`` is the year's 1-gram total (``totalcounts`` when given, else summed from the 1-grams).

Streaming and memory: every file is read in blocks (``block_mb`` of uncompressed text, cut at a line
end), parsed with pyarrow's CSV reader and dictionary-encoded (each distinct ngram is split and looked
up once per block); every ~500,000 (ngram, year) rows are reduced with one sparse product
``(years x ngrams) @ (ngrams x pairs)``.
Per file the counts live in a (years, V*V) sparse matrix of upper-triangle pair keys ``i * V + j``
(i <= j), merged block by block in a log-structured way; memory is bounded by the block, the vocabulary
and the output, never by the size of the input.

Parallelism and resume: files are processed by ``workers`` processes (one file per process at a time).
The result of each input file is saved atomically as a *part* in ``.<out>.work/`` next to the output,
named by a key of (file path, size, modification time, settings). A rerun after an interruption
trusts only complete parts with the same key whose recorded sha256 is that of the input now (each
such input is hashed once per run, in parallel; a changed file with a restored modification time, as
``cp -p``, ``rsync -a`` and ``tar`` leave it, is counted again), and processes the remaining files. A
worker process exits on its own when the main process dies (even by SIGKILL). The final output is
written atomically (see ``cooc``) and the work folder is removed after success.

Inputs given twice: before any counting, the files of each option are checked: an empty file (0 bytes,
or a gzip file without content) is an error, and so are two files that begin with the same line (a
copy under another name, the same file compressed and not, a file and itself concatenated twice),
since their rows would be counted twice. Within a file, a row equal to the row before it, or to the
file's first row (a file concatenated with itself), is an error; other repeated rows inside one file
are not detected (that needs a set of all its rows, too big for multi-GB files). A run whose 5-grams
give no co-occurrence at all fails instead of writing an empty corpus.

Malformed lines (wrong number of fields, year or counts not 1-18 decimal digits, a 5-gram without exactly 5
non-empty tokens, invalid UTF-8) are skipped, counted and reported with an example (file and line).
If more than ``max_malformed`` (default 1%) of the lines of any file, or of all files, are malformed, the
run fails: the input is probably not a Google Books Ngram file (a file that is mostly malformed after
10,000 lines fails at once, without reading the rest).

Count overflow: co-occurrence counts, word counts and yearly totals are exact 64-bit integers (not
float64: above 2^53 a float64 sum is no longer exact, and real counts are far below int64's limit).
The sum of the counted match counts is tracked per file and over all files; a file whose counts could
overflow int64 (e.g. twenty lines of count 1e18) fails with a message naming it, instead of silently
wrapping to negative totals. See ``COUNT_LIMIT``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import threading
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import scipy.sparse as sp
from tqdm.auto import tqdm

from goldstone_cli.data.cooc import CoocWriter, check_output_dir, inputs_entry, pair_rows_to_symmetric
from goldstone_cli.io import atomic_path, file_sha256, proc_kib_field, process_running, remove_abandoned_temporaries

PART_VERSION = 3  # 2: match count sums (overflow check), CRLF; 3: v2 numbers checked as digits, repeated rows
DEFAULT_YEARS = (1800, 2008)
DEFAULT_VOCAB = 10_000
RANKS = ("relfreq", "count")
POS_RULES = ("drop", "keep")
TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", "X", r"\.")
ANNOTATED_RE = r"_(?:" + "|".join(TAGS) + r")_?$"       # word_NOUN, _NOUN_, ._.
MARKER_RE = r"^_(?:START|END|ROOT)_$"
GZIP_MAGIC = b"\x1f\x8b"
RAW_CHUNK = 1 << 20          # bytes read from disk at a time
MAX_LINE = 1 << 26           # a "line" longer than this means the file is not an ngram file
HEAD_BYTES = 1 << 16         # text read from the start of every input to check it before counting
HASH_CHUNK = 8 << 20         # bytes hashed at a time when checking a saved part against its input
EXAMPLES_PER_FILE = 3
FLUSH_ENTRIES = 500_000      # 5-gram (ngram, year) rows gathered over blocks before one sparse product
N_FIVE = 5
PAIRS = [(p, q) for p in range(N_FIVE) for q in range(p + 1, N_FIVE)]
PAIR_P = np.array([p for p, _ in PAIRS])                 # (10,)
PAIR_Q = np.array([q for _, q in PAIRS])                 # (10,)
PAIR_W = (N_FIVE - (PAIR_Q - PAIR_P)).astype(np.int64)   # (10,) weights 4,3,2,1 by distance
# Counts are exact int64 sums. Every accumulated number is at most FACTOR x (the sum of the match counts
# that enter it): 1 for the 1-gram counts and yearly totals; for a 5-gram, all its pairs together carry
# at most 20 x its match count (weights 4+3+3+2+2+2+1+1+1+1) and the symmetric matrix doubles the
# diagonal and the total, so 40. The sums of match counts are tracked (float64 upper bounds) per file
# and over all files and must stay below COUNT_LIMIT / FACTOR: then no int64 sum can overflow. Real
# Google Books files are many orders of magnitude below (all English 5-grams: about 1e12).
COUNT_LIMIT = float(2**62)   # half of int64's range: margin for the float64 bound itself
FACTOR = {"onegrams": 1, "fivegrams": 40}


class MalformedInputError(ValueError):
    """Too many malformed lines, or a file that is not in a Google Books Ngram layout."""


class _Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------------- small readers

def parse_years(text: str) -> tuple[int, int]:
    """'1800-2008' -> (1800, 2008); a single year '1900' -> (1900, 1900)."""
    m = re.fullmatch(r"\s*(\d{1,4})\s*(?:[-:]\s*(\d{1,4}))?\s*", text)
    if not m:
        raise ValueError(f"years must look like 1800-2008, got {text!r}")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) else a
    if a > b:
        raise ValueError(f"year range {text!r} is empty (first year after last)")
    return a, b


def expand_inputs(patterns: Sequence[str | os.PathLike], option: str) -> list[Path]:
    """Files named by paths or (quoted) glob patterns; a missing file is an error naming ``option``."""
    files: list[Path] = []
    for pat in patterns:
        s = str(pat)
        if glob.has_magic(s):
            hits = sorted(glob.glob(s))
            if not hits:
                raise FileNotFoundError(f"{option}: no file matches the pattern {s!r}")
            files.extend(Path(h) for h in hits)
        else:
            files.append(Path(s))
    seen = set()
    out = []
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{option}: input file {f} does not exist")
        if f.is_dir():
            raise IsADirectoryError(f"{option}: {f} is a folder; give the files (a quoted glob like "
                                    f"'{f}/*.gz' works)")
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def _empty_error(path: str | os.PathLike, role: str) -> MalformedInputError:
    with open(path, "rb") as f:
        what = "a gzip file that holds no text" if f.read(2) == GZIP_MAGIC else "0 bytes"
    n = 1 if role == "onegrams" else N_FIVE
    return MalformedInputError(
        f"--{role}: {path} is empty ({what}); expected Google Books {n}-gram lines, v2 "
        f"'ngram<TAB>year<TAB>match_count<TAB>volume_count' or v3 'ngram<TAB>year,match_count,volume_count<TAB>...'. "
        f"Download the file again, or leave it out.")


def _first_line(head: bytes) -> bytes | None:
    for ln in head.split(b"\n"):
        ln = ln.rstrip(b"\r")
        if ln.strip():
            return ln
    return None


def check_inputs(files: Sequence[Path], role: str) -> None:
    """Fail before counting on an empty input, or on two inputs that begin with the same line: a copy
    under another name, the same file compressed and not, a file and itself concatenated twice. Their
    rows would be counted twice. Reads only the start of each file; pipes (read once) are skipped."""
    first: dict[bytes, Path] = {}
    for f in files:
        if not f.is_file():
            continue
        with contextlib.closing(iter_blocks(f, HEAD_BYTES, raw_chunk=HEAD_BYTES)) as blocks:
            head = next(blocks, b"")
        if not head:
            raise _empty_error(f, role)
        line = _first_line(head)
        if line is None:
            continue
        if line in first:
            raise ValueError(
                f"--{role}: {first[line]} and {f} begin with the same line {line[:120].decode('utf-8', 'replace')!r}; "
                f"their rows would be counted twice (a copy under another name, the same file compressed and not, "
                f"or a file concatenated with itself?). Give each file once.")
        first[line] = f


def _check_distinct_contents(metas: list[dict], role: str) -> None:
    """Two inputs with the same sha256 (pipes, which ``check_inputs`` cannot read ahead) count twice."""
    seen: dict[str, str] = {}
    for m in metas:
        if m["sha256"] in seen and seen[m["sha256"]] != m["path"]:
            raise ValueError(f"--{role}: {seen[m['sha256']]} and {m['path']} have the same content (sha256 "
                             f"{m['sha256'][:16]}...); it would be counted twice. Give each file once.")
        seen[m["sha256"]] = m["path"]


def _open_text(path: Path) -> bytes:
    data = path.read_bytes()
    return zlib.decompress(data, 31) if data[:2] == GZIP_MAGIC else data


def _check_count_sum(path: str, role: str, match_sum: float, where: str) -> None:
    """Fail (clear message) before an int64 count could overflow (see COUNT_LIMIT)."""
    if match_sum * FACTOR[role] >= COUNT_LIMIT:
        raise MalformedInputError(
            f"{path}: the match counts of the {role[:-1]} lines add up to {match_sum:.4g} {where}; the co-occurrence "
            f"counts are exact 64-bit integers and could overflow (the limit is {COUNT_LIMIT / FACTOR[role]:.3g} for "
            f"{role}). Real Google Books files add up to less than 1e13: check the file's match_count column.")


def _int_bincount(idx: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Exact int64 ``sum weights`` per index. A float64 ``bincount`` is exact while every partial sum
    stays below 2^53 (true for real blocks); otherwise sum in int64 with ``np.add.at``."""
    if len(weights) == 0 or float(weights.sum(dtype=np.float64)) < 2.0**52:
        return np.bincount(idx, weights=weights, minlength=n).astype(np.int64)
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, idx, weights.astype(np.int64))
    return out


def read_totalcounts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A Google Books ``totalcounts`` file -> arrays ``year``, ``match_count``, ``page_count``,
    ``volume_count`` (int64, sorted by year). Records are ``year,match,pages,volumes`` separated by any
    whitespace (the published file is one tab-separated line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--totalcounts: {path} does not exist")
    try:
        text = _open_text(path).decode("ascii")
    except (UnicodeDecodeError, zlib.error) as exc:
        raise MalformedInputError(f"{path}: not a totalcounts file ({exc})") from exc
    recs = text.split()
    if not recs:
        raise MalformedInputError(f"{path}: empty totalcounts file")
    rows = []
    for k, r in enumerate(recs):
        f = r.split(",")
        if len(f) != 4 or not all(x.isdigit() for x in f):
            raise MalformedInputError(f"{path}: record {k + 1} is {r[:80]!r}, expected year,match_count,page_count,"
                                      f"volume_count")
        if any(len(x) > 18 for x in f):
            raise MalformedInputError(f"{path}: record {k + 1} is {r[:80]!r}: a count with more than 18 digits "
                                      f"does not fit the 64-bit totals")
        rows.append([int(x) for x in f])
    a = np.array(rows, dtype=np.int64)  # (Y, 4)
    a = a[np.argsort(a[:, 0], kind="stable")]
    if len(np.unique(a[:, 0])) != len(a):
        raise MalformedInputError(f"{path}: a year appears twice")
    return {"year": a[:, 0], "match_count": a[:, 1], "page_count": a[:, 2], "volume_count": a[:, 3]}


# ---------------------------------------------------------------------------------------------- block streaming

def iter_blocks(path: str | os.PathLike, block_bytes: int, on_raw: Callable[[bytes], None] | None = None,
                raw_chunk: int = RAW_CHUNK) -> Iterator[bytes]:
    """Uncompressed blocks of about ``block_bytes``, each ending at a line end (the last one maybe not).

    ``on_raw`` sees every chunk of the file as read from disk (``raw_chunk`` bytes; for hashing and
    progress in bytes).
    """
    path = Path(path)
    buf = bytearray()

    def cut() -> Iterator[bytes]:
        while len(buf) >= block_bytes:
            k = buf.rfind(b"\n")
            if k < 0:
                if len(buf) > MAX_LINE:
                    raise MalformedInputError(f"{path}: a line longer than {MAX_LINE >> 20} MiB; this is not a "
                                              f"Google Books Ngram text file")
                return
            with memoryview(buf) as mv:
                block = bytes(mv[:k + 1])  # one copy
            del buf[:k + 1]
            yield block

    with open(path, "rb") as f:
        chunk = f.read(raw_chunk)
        if chunk[:2] != GZIP_MAGIC:
            while chunk:
                if on_raw:
                    on_raw(chunk)
                buf += chunk
                yield from cut()
                chunk = f.read(raw_chunk)
        else:
            d = zlib.decompressobj(31)
            while chunk:
                if on_raw:
                    on_raw(chunk)
                data = chunk
                while data:
                    if d.eof:  # a new gzip member follows (multi-member files)
                        d = zlib.decompressobj(31)
                    try:
                        out = d.decompress(data, block_bytes)
                    except zlib.error as exc:
                        raise MalformedInputError(f"{path}: corrupt gzip data ({exc}); download the file again") from exc
                    buf += out
                    yield from cut()
                    data = d.unused_data if d.eof else d.unconsumed_tail
                chunk = f.read(raw_chunk)
            if not d.eof:
                raise MalformedInputError(f"{path}: the gzip stream ends early (truncated file); download it again")
    if buf:
        yield bytes(buf)


# ---------------------------------------------------------------------------------------------- block parsing

@dataclass
class _Issues:
    """Malformed-line bookkeeping of one file."""

    path: str
    lines: int = 0
    malformed: int = 0
    examples: list[dict] = field(default_factory=list)
    annotated: int = 0          # lines skipped by the part-of-speech rule
    layout: str | None = None

    def add(self, n: int, examples: list[tuple[int, str, str]]) -> None:
        self.malformed += n
        for line, text, why in examples:
            if len(self.examples) < EXAMPLES_PER_FILE:
                self.examples.append({"file": self.path, "line": int(line), "text": text[:200], "why": why})


def _line_text(block: bytes, k: int) -> str:
    """Line k (0-based) of a block, as text."""
    parts = block.split(b"\n", k + 1)
    return parts[k].decode("utf-8", "replace") if k < len(parts) else ""


def _n_lines(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


@dataclass
class _Rows:
    """Parsed entries of one block: entry e is (ngram uniq[ngram[e]], year[e], match[e]) from line line[e]."""

    uniq: pa.Array        # (U,) distinct ngram strings
    ngram: np.ndarray     # (E,) index into uniq
    year: np.ndarray      # (E,) int64
    match: np.ndarray     # (E,) int64
    line: np.ndarray      # (E,) 0-based line within the block


_V2_COLS = ["ngram", "year", "match", "volumes"]
# numbers are read as text and checked as digits: pyarrow's int64 parser also takes " 5", "0x5" and "-0"
_V2_TYPES = {c: pa.string() for c in _V2_COLS}


def _utf8_text(body: bytes) -> pa.LargeStringArray:
    """``body`` as one string (no copy); raises ``pa.ArrowInvalid`` if it is not valid UTF-8."""
    arr = pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(body)], dtype=np.int64)),
                                           pa.py_buffer(body))
    arr.validate(full=True)
    return arr


def _v2_numbers(tab: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """(year, match) as int64, or None if a year or count is not 1-18 ASCII digits (as ``_strict_filter``)."""
    for c in _V2_COLS[1:]:
        if tab.num_rows and not (pc.all(pc.ascii_is_decimal(tab[c])).as_py()
                                 and pc.max(pc.binary_length(tab[c])).as_py() < 19):
            return None
    return (pc.cast(tab["year"], pa.int64()).to_numpy(), pc.cast(tab["match"], pa.int64()).to_numpy())


def _strict_filter(block: bytes, layout: str, issues: _Issues, first_line: int) -> tuple[bytes, np.ndarray]:
    """Slow path for a block the fast parser rejects: check each line in Python, keep the good ones.

    Returns the block of good lines and their 0-based line numbers in the original block.
    """
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    good, keep, bad = [], [], []
    for k, ln in enumerate(lines):
        why = None
        f = ln.split(b"\t")
        try:
            ln.decode("utf-8")
        except UnicodeDecodeError:
            why = "invalid UTF-8"
        if why is None and b"\r" in ln:
            why = "carriage return inside the line"
        if why is None:
            if layout == "v2":
                if len(f) != 4:
                    why = f"{len(f)} tab-separated fields, expected 4"
                elif not all(x.isdigit() and len(x) < 19 for x in f[1:]):
                    why = "year, match_count and volume_count must be non-negative integers of at most 18 digits"
            else:
                if len(f) < 2:
                    why = "no year,match_count,volume_count field"
                else:
                    for e in f[1:]:
                        g = e.split(b",")
                        if len(g) != 3 or not all(x.isdigit() and len(x) < 19 for x in g):
                            why = f"field {e[:40]!r} is not year,match_count,volume_count"
                            break
        if why is None:
            good.append(ln)
            keep.append(k)
        else:
            bad.append((first_line + k + 1, ln.decode("utf-8", "replace"), why))
    issues.add(len(bad), bad)
    return (b"\n".join(good) + b"\n") if good else b"", np.array(keep, dtype=np.int64)


def _parse_v2(block: bytes, issues: _Issues, first_line: int, n: int) -> _Rows:
    skipped: list[int] = []

    def on_invalid(row) -> str:
        skipped.append(row.number - 1 if row.number is not None else -1)
        return "skip"

    ro = pcsv.ReadOptions(column_names=_V2_COLS, use_threads=False, block_size=max(len(block) + 1, 1 << 20))
    po = pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False,
                           newlines_in_values=False, ignore_empty_lines=False, invalid_row_handler=on_invalid)
    # check_utf8 off: the fast path reads a block checked below, the slow path lines that decoded
    co = pcsv.ConvertOptions(column_types=_V2_TYPES, null_values=[], strings_can_be_null=False,
                             quoted_strings_can_be_null=False, check_utf8=False)
    kept = None
    tab = nums = None
    fast = b"\r" not in block
    try:  # invalid UTF-8: slow path (pyarrow decodes a bad row's text for on_invalid, a traceback if it fails)
        _utf8_text(block)
    except pa.ArrowInvalid:
        fast = False
    if fast:
        try:
            tab = pcsv.read_csv(pa.py_buffer(block), read_options=ro, parse_options=po, convert_options=co)
        except pa.ArrowInvalid:
            tab = None
        if tab is not None and (tab.num_rows + len(skipped) != n or -1 in skipped):
            tab = None
        if tab is not None:
            nums = _v2_numbers(tab)
            if nums is None:
                tab = None
        if tab is not None and skipped:
            sk = np.array(sorted(skipped), dtype=np.int64)
            issues.add(len(sk), [(first_line + k + 1, _line_text(block, int(k)), "wrong number of tab-separated fields")
                                 for k in sk[:EXAMPLES_PER_FILE]])
            kept = np.delete(np.arange(n, dtype=np.int64), sk)
    if tab is None:  # slow path: find the bad lines one by one, parse the rest fast
        skipped.clear()
        clean, kept = _strict_filter(block, "v2", issues, first_line)
        tab = pcsv.read_csv(pa.py_buffer(clean), read_options=ro, parse_options=po, convert_options=co) if clean \
            else pa.table({c: pa.array([], type=t) for c, t in _V2_TYPES.items()})
        nums = _v2_numbers(tab)
        if nums is None or tab.num_rows != len(kept):
            raise RuntimeError("internal error: a line accepted by the strict v2 check failed to parse")
    if kept is None:
        kept = np.arange(n, dtype=np.int64)
    enc = pc.dictionary_encode(tab["ngram"].combine_chunks())
    return _Rows(uniq=enc.dictionary, ngram=enc.indices.to_numpy().astype(np.int64),
                 year=nums[0], match=nums[1], line=kept)


def _parse_v3(block: bytes, issues: _Issues, first_line: int, n: int = 0, filtered: bool = False) -> _Rows:
    body = block[:-1] if block.endswith(b"\n") else block
    kept = None
    try:
        if b"\r" in body:
            raise ValueError("carriage return")
        arr = _utf8_text(body)
        lines = pc.split_pattern(arr, "\n").values  # (L,)
        fields = pc.split_pattern(lines, "\t")
        nf = pc.list_value_length(fields).to_numpy()
        starts = fields.offsets.to_numpy()[:-1]
        flat = fields.values
        rest_mask = np.ones(len(flat), dtype=bool)
        rest_mask[starts] = False
        parent = pc.list_parent_indices(fields).to_numpy()[rest_mask]  # (E,) line of each entry
        ent = pc.split_pattern(pc.filter(flat, pa.array(rest_mask)), ",")
        ok_ent = (pc.list_value_length(ent).to_numpy() == 3)
        digits = pc.match_substring_regex(ent.values, r"^[0-9]{1,18}$").to_numpy(zero_copy_only=False)
        ent_starts = ent.offsets.to_numpy()[:-1]
        ok_ent &= np.add.reduceat(digits.astype(np.int64), ent_starts) == 3 if len(ent_starts) else ok_ent
        bad_line = (nf < 2) | (np.bincount(parent[~ok_ent], minlength=len(nf)) > 0)
        if bad_line.any():
            raise ValueError("malformed")
        vals = pc.cast(ent.values, pa.int64()).to_numpy().reshape(-1, 3)  # (E, 3)
        ng = pc.take(flat, pa.array(starts))
        kept = np.arange(len(nf), dtype=np.int64)
    except (ValueError, pa.ArrowInvalid):
        if filtered:
            raise RuntimeError("internal error: a line accepted by the strict v3 check failed to parse")
        clean, kept = _strict_filter(block, "v3", issues, first_line)
        if not clean:
            return _Rows(uniq=pa.array([], pa.string()), ngram=np.zeros(0, np.int64), year=np.zeros(0, np.int64),
                         match=np.zeros(0, np.int64), line=np.zeros(0, np.int64))
        sub = _parse_v3(clean, _Issues(issues.path), 0, filtered=True)
        sub.line = kept[sub.line]
        return sub
    enc = pc.dictionary_encode(ng)
    return _Rows(uniq=enc.dictionary.cast(pa.string()), ngram=enc.indices.to_numpy().astype(np.int64)[parent],
                 year=vals[:, 0], match=vals[:, 1], line=parent.astype(np.int64))


def detect_layout(block: bytes, path: str) -> str:
    """'v2' or 'v3' from the first lines of a file."""
    votes = {"v2": 0, "v3": 0}
    for ln in block.split(b"\n", 100)[:100]:
        f = ln.rstrip(b"\r").split(b"\t")
        if len(f) == 4 and all(x.isdigit() for x in f[1:]):
            votes["v2"] += 1
        elif len(f) >= 2 and all(re.fullmatch(rb"\d+,\d+,\d+", x) for x in f[1:]):
            votes["v3"] += 1
    if votes["v2"] == votes["v3"] == 0:
        first = block.split(b"\n", 1)[0][:120].decode("utf-8", "replace")
        raise MalformedInputError(f"{path}: not a Google Books Ngram file; its first line {first!r} is neither "
                                  f"v2 'ngram<TAB>year<TAB>match_count<TAB>volume_count' nor v3 "
                                  f"'ngram<TAB>year,match_count,volume_count<TAB>...'")
    return max(votes, key=votes.get)


# ---------------------------------------------------------------------------------------------- per-file workers

@dataclass(frozen=True)
class _Job:
    role: str                              # "onegrams" | "fivegrams"
    path: str
    part: str                              # where the part is saved
    key: str
    years: tuple[int, int]
    lowercase: bool
    pos: str
    block_bytes: int
    max_malformed: float
    vocab: tuple[str, ...] | None = None   # fivegrams
    denominators: tuple[int, ...] | None = None  # onegrams with relfreq scores: yearly totals over `years`
    size: int = 0


_PROGRESS_Q = None
_STOP = None


def _init_worker(q, stop, alive, main_pid: int) -> None:
    global _PROGRESS_Q, _STOP
    _PROGRESS_Q, _STOP = q, stop
    threading.Thread(target=_exit_with_main, args=(alive, main_pid), name="watch-main", daemon=True).start()


def _exit_with_main(alive, main_pid: int) -> None:
    """Exit this worker once the main process is gone (even by SIGKILL): the main process holds the only
    write end of ``alive``, which the kernel closes when it dies (poll sees EOF); its pid is checked
    too. A worker would otherwise wait for jobs forever, keeping the forkserver alive."""
    while not alive.poll(1.0) and process_running(main_pid):
        pass
    os._exit(1)  # a part being written is a temporary file, never trusted


class _Feed:
    """Hashes the raw bytes of a file and reports progress in bytes (to a queue or a callback)."""

    def __init__(self, report: Callable[[int], None] | None):
        self.sha = hashlib.sha256()
        self.report = report
        self.pending = 0
        self.size = 0

    def __call__(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.size += len(chunk)
        self.pending += len(chunk)
        if self.pending >= (4 << 20):
            self.flush()
        if _STOP is not None and _STOP.is_set():
            raise _Cancelled()

    def flush(self) -> None:
        if self.pending and self.report:
            self.report(self.pending)
        self.pending = 0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (VmHWM on Linux, which a fresh exec resets)."""
    hwm = proc_kib_field("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _token_flags(tokens: pa.Array, pos: str) -> tuple[np.ndarray, np.ndarray]:
    """(annotated, marker) boolean arrays for the given tokens."""
    if pos == "keep" or len(tokens) == 0:
        z = np.zeros(len(tokens), dtype=bool)
        return z, z
    ann = pc.match_substring_regex(tokens, ANNOTATED_RE).to_numpy(zero_copy_only=False)
    mark = pc.match_substring_regex(tokens, MARKER_RE).to_numpy(zero_copy_only=False)
    return ann & ~mark, mark


def _check_malformed(issues: _Issues, max_malformed: float, final: bool) -> None:
    if issues.lines == 0:
        return
    frac = issues.malformed / issues.lines
    if (final and frac > max_malformed) or (not final and issues.lines >= 10_000 and frac > 0.5):
        ex = issues.examples[0] if issues.examples else {}
        raise MalformedInputError(
            f"{issues.path}: {issues.malformed:,} of {issues.lines:,} lines ({100 * frac:.2f}%) are malformed, more "
            f"than the allowed {100 * max_malformed:g}%; first at line {ex.get('line')}: {ex.get('text')!r} "
            f"({ex.get('why')}). Is this a Google Books Ngram v2/v3 file of the right kind (1-grams vs 5-grams)?")


class _Repeats:
    """Rows given twice in one file, found by two cheap exact checks: a row equal to the row before it
    (a line repeated in place) or to the file's first row (a file concatenated with itself). Any other
    repeat would need the set of all (ngram, year) rows of the file: too big for multi-GB files."""

    def __init__(self, path: str):
        self.path = path
        self.first: tuple[str, int, int] | None = None   # (ngram, year, line number)
        self.last: tuple[str, int, int] | None = None

    def check(self, rows: _Rows, good: np.ndarray, first_line: int) -> None:
        """``good`` (U,): the well-formed distinct ngrams of the block (only their rows are checked)."""
        if good.all():
            ng, yr, ln = rows.ngram, rows.year, rows.line  # (E,) in file order
        else:
            e = np.flatnonzero(good[rows.ngram])
            ng, yr, ln = rows.ngram[e], rows.year[e], rows.line[e]
        if len(ng) == 0:
            return

        def row(i: int) -> tuple[str, int, int]:
            return rows.uniq[int(ng[i])].as_py(), int(yr[i]), first_line + int(ln[i]) + 1

        start = 0
        if self.first is None:
            self.first, start = row(0), 1
        k = pc.index(rows.uniq, self.first[0]).as_py()
        if k >= 0:
            hit = np.flatnonzero((ng[start:] == k) & (yr[start:] == self.first[1]))
            if len(hit):
                self._fail(self.first, row(start + int(hit[0]))[2], " (was the file concatenated with itself?)")
        if self.last is not None and self.last[:2] == row(0)[:2]:
            self._fail(self.last, row(0)[2], "")
        same = np.flatnonzero((ng[1:] == ng[:-1]) & (yr[1:] == yr[:-1]))
        if len(same):
            self._fail(row(int(same[0])), row(int(same[0]) + 1)[2], "")
        self.last = row(len(ng) - 1)

    def _fail(self, row: tuple[str, int, int], line: int, hint: str) -> None:
        raise MalformedInputError(
            f"{self.path}: line {line} repeats line {row[2]} (ngram {row[0][:120]!r}, year {row[1]}){hint}; a row "
            f"given twice would be counted twice. Use the original file, in which each (ngram, year) appears once.")


def _stream_rows(job: _Job, feed: _Feed, issues: _Issues, n_expected: int
                 ) -> Iterator[tuple[_Rows, pa.ListArray, np.ndarray, np.ndarray]]:
    """Parsed blocks of a file with checks per distinct ngram.

    Yields (rows, toks, ok, marker): ``toks`` the distinct ngrams split into tokens (arrow list array,
    U lists), ``ok`` (U,) the well-formed, not annotated ones, ``marker`` (U,) those with a sentence
    marker token (always False for ``pos="keep"``).
    """
    layout = None
    first_line = 0
    repeats = _Repeats(job.path)
    for block in iter_blocks(job.path, job.block_bytes, feed):
        if b"\r" in block:  # CRLF line ends (Windows copies): blocks end at "\n", so no "\r\n" is split
            block = block.replace(b"\r\n", b"\n")
            if block.endswith(b"\r"):  # a last line ended by a lone "\r"
                block = block[:-1] + b"\n"
        if layout is None:
            layout = detect_layout(block, job.path)
            issues.layout = layout
        nl = _n_lines(block)
        issues.lines += nl
        rows = (_parse_v2 if layout == "v2" else _parse_v3)(block, issues, first_line, nl)
        toks = pc.split_pattern(rows.uniq, " ")
        ntok = pc.list_value_length(toks).to_numpy()
        flat = toks.values
        parent = pc.list_parent_indices(toks).to_numpy()
        empty = pc.equal(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
        bad = (ntok != n_expected) | (np.bincount(parent[empty], minlength=len(ntok)) > 0)
        ann, mark = _token_flags(flat, job.pos)
        annotated = np.bincount(parent[ann], minlength=len(ntok)) > 0
        marker = np.bincount(parent[mark], minlength=len(ntok)) > 0
        if bad.any():
            ent = np.flatnonzero(bad[rows.ngram])
            bad_lines = np.unique(rows.line[ent])
            issues.add(len(bad_lines), [(first_line + int(k) + 1, _line_text(block, int(k)),
                                         f"not {n_expected} space-separated non-empty tokens")
                                        for k in bad_lines[:EXAMPLES_PER_FILE]])
        ok = ~bad & ~annotated
        if annotated.any():
            issues.annotated += len(np.unique(rows.line[annotated[rows.ngram]]))
        repeats.check(rows, ~bad, first_line)
        first_line += nl
        _check_malformed(issues, job.max_malformed, final=False)
        yield rows, toks, ok, marker
    feed.flush()
    if issues.lines == 0:
        raise _empty_error(job.path, job.role)


def _count_onegrams(job: _Job, report: Callable[[int], None] | None) -> tuple[pa.Table, dict]:
    """Per-word totals (and relfreq score sums) and yearly totals of one 1-gram file."""
    y0, y1 = job.years
    T = y1 - y0 + 1
    feed = _Feed(report)
    issues = _Issues(job.path)
    year_tot = np.zeros(T, dtype=np.int64)  # (T,)
    inv_den = None
    if job.denominators is not None:
        den = np.asarray(job.denominators, dtype=np.float64)
        inv_den = np.where(den > 0, 1.0 / np.maximum(den, 1), 0.0)  # (T,) years without total are skipped
    acc: list[pa.Table] = []
    acc_rows = 0
    state: pa.Table | None = None
    out_of_range = 0
    match_sum = 0.0  # float64 bound of the counted match counts (overflow check)
    for rows, toks, ok, marker in _stream_rows(job, feed, issues, 1):
        ok = ok & ~marker  # sentence markers are not words
        inr = (rows.year >= y0) & (rows.year <= y1)
        out_of_range += int((~inr).sum())
        e = np.flatnonzero(inr & ok[rows.ngram])
        if len(e) == 0:
            continue
        yi = rows.year[e] - y0
        m = rows.match[e]
        match_sum += float(m.sum(dtype=np.float64))
        _check_count_sum(job.path, job.role, match_sum, f"by line {issues.lines}")
        year_tot += _int_bincount(yi, m, T)
        norm = pc.utf8_lower(rows.uniq) if job.lowercase else rows.uniq
        enc = pc.dictionary_encode(norm)
        widx = enc.indices.to_numpy()[rows.ngram[e]]
        nw = len(enc.dictionary)
        cols = {"word": enc.dictionary, "count": _int_bincount(widx, m, nw)}
        if inv_den is not None:
            cols["score"] = np.bincount(widx, weights=m * inv_den[yi], minlength=nw)
        t = pa.table(cols)
        acc.append(t)
        acc_rows += len(t)
        if acc_rows > max(2_000_000, 2 * (len(state) if state is not None else 0)):
            state = _reduce_words(([state] if state is not None else []) + acc)
            acc, acc_rows = [], 0
    _check_malformed(issues, job.max_malformed, final=True)
    tables = ([state] if state is not None else []) + acc
    if tables:
        state = _reduce_words(tables)
    else:
        state = pa.table({"word": pa.array([], pa.string()), "count": pa.array([], pa.int64()),
                          **({"score": pa.array([], pa.float64())} if inv_den is not None else {})})
    meta = {"key": job.key, "version": PART_VERSION, "path": job.path, "size": feed.size,
            "sha256": feed.sha.hexdigest(), "layout": issues.layout, "lines": issues.lines,
            "malformed": issues.malformed, "examples": issues.examples,
            "annotated_lines": issues.annotated, "out_of_range_lines": out_of_range,
            "year_totals": year_tot.tolist(), "match_sum": match_sum, "peak_rss_mb": peak_rss_mb()}
    return state, meta


def _onegram_file(job: _Job, report: Callable[[int], None] | None) -> dict:
    """``_count_onegrams`` saved atomically as the file's part (Arrow IPC, meta in the schema metadata)."""
    state, meta = _count_onegrams(job, report)
    state = state.replace_schema_metadata({"goldstone": json.dumps(meta)})
    with atomic_path(job.part) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, state.schema) as w:
            w.write_table(state)
    return meta


def _reduce_words(tables: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(tables)
    aggs = [("count", "sum")] + ([("score", "sum")] if "score" in t.column_names else [])
    g = t.group_by("word").aggregate(aggs)
    return g.rename_columns([c.replace("_sum", "") for c in g.column_names])


def _load_onegram_part(path: str, key: str) -> tuple[pa.Table, dict] | None:
    try:
        with pa.memory_map(path) as src:
            t = pa.ipc.open_file(src).read_all()
        meta = json.loads(t.schema.metadata[b"goldstone"])
    except Exception:  # noqa: BLE001 - an unreadable part is recomputed
        return None
    if meta.get("key") != key or meta.get("version") != PART_VERSION:
        return None
    return t.replace_schema_metadata(None), meta


class _LSM:
    """Sum of canonical CSR matrices, merged log-structured: O(n log n) total, memory <= ~2x the result."""

    def __init__(self) -> None:
        self.levels: list[sp.csr_matrix] = []

    def push(self, m: sp.csr_matrix) -> None:
        if m.nnz == 0:
            return
        self.levels.append(m)
        while len(self.levels) > 1 and self.levels[-1].nnz * 2 >= self.levels[-2].nnz:
            b = self.levels.pop()
            a = self.levels.pop()
            self.levels.append(_canonical(a + b))

    def result(self, shape: tuple[int, int], idx_dtype) -> sp.csr_matrix:
        while len(self.levels) > 1:
            b = self.levels.pop()
            a = self.levels.pop()
            self.levels.append(_canonical(a + b))
        if not self.levels:
            return sp.csr_matrix((np.zeros(0, np.int64), np.zeros(0, idx_dtype), np.zeros(shape[0] + 1, idx_dtype)),
                                 shape=shape)
        return self.levels[0]


def _canonical(m) -> sp.csr_matrix:
    m = sp.csr_matrix(m)
    m.sum_duplicates()  # no-op (a linear check) when already canonical
    return m


def _count_fivegrams(job: _Job, report: Callable[[int], None] | None) -> tuple[sp.csr_matrix, dict]:
    """Yearly pair counts of one 5-gram file: CSR (years, V*V) over upper-triangle pair keys i * V + j."""
    y0, y1 = job.years
    T = y1 - y0 + 1
    vocab = pa.array(list(job.vocab), pa.string())
    V = len(vocab)
    VV = V * V
    idx_dtype = np.int32 if VV < 2**31 else np.int64
    feed = _Feed(report)
    issues = _Issues(job.path)
    lsm = _LSM()
    out_of_range = 0
    entries = 0
    match_sum = 0.0  # float64 bound of the counted match counts (overflow check)
    pending: dict[str, list[np.ndarray]] = {"pk": [], "w": [], "pu": [], "m": [], "yu": [], "y": []}
    n_pending = 0
    n_ngrams = 0  # distinct ngrams of the pending blocks (their row numbers are offset block by block)

    def flush() -> None:
        nonlocal n_pending, n_ngrams
        if n_pending == 0:
            return
        c = {k: np.concatenate(v) for k, v in pending.items()}
        for v in pending.values():
            v.clear()
        G, loc = np.unique(c["pk"], return_inverse=True)  # distinct pairs (sorted)
        # R = Y @ P: (T, npairs) summed pair weights, with Y (T, U) the match counts per year and distinct
        # ngram and P (U, npairs) the window weights of the pairs in each ngram. Computed as (P^T @ Y^T)^T:
        # the product has only T columns (a small accumulator), and CSR -> CSC yields R with sorted indices.
        PT = sp.csr_matrix((c["w"], (loc, c["pu"])), shape=(len(G), n_ngrams))
        YT = sp.csr_matrix((c["m"], (c["yu"], c["y"])), shape=(n_ngrams, T))
        R = (PT @ YT).tocsc()  # (npairs, T) in CSC = (T, npairs) in CSR, sorted
        R.eliminate_zeros()
        Rg = sp.csr_matrix((R.data.astype(np.int64), G[R.indices].astype(idx_dtype), R.indptr.astype(idx_dtype)),
                           shape=(T, VV))  # G is sorted, so the indices stay sorted
        Rg.has_canonical_format = True
        lsm.push(Rg)
        n_pending = n_ngrams = 0

    for rows, toks, ok, _ in _stream_rows(job, feed, issues, N_FIVE):  # markers: out-of-vocabulary positions
        U = len(ok)
        inr = (rows.year >= y0) & (rows.year <= y1)
        out_of_range += int((~inr).sum())
        e = np.flatnonzero(inr & ok[rows.ngram])
        if len(e) == 0:
            continue
        # Distinct ngrams -> (U, 5) vocabulary ids (-1: out of vocabulary or malformed).
        words = pc.utf8_lower(toks.values) if job.lowercase else toks.values
        tid = pc.index_in(words, value_set=vocab).fill_null(-1).to_numpy().astype(np.int64)
        ids = np.full((U, N_FIVE), -1, dtype=np.int64)  # (U, 5)
        good = np.flatnonzero(ok)
        starts = toks.offsets.to_numpy()[:-1]
        ids[good] = tid[starts[good, None] + np.arange(N_FIVE)]
        a, b = ids[:, PAIR_P], ids[:, PAIR_Q]  # (U, 10) tokens at positions p < q
        ur, uc = np.nonzero((a >= 0) & (b >= 0))
        if len(ur) == 0:
            continue
        match_sum += float(rows.match[e].sum(dtype=np.float64))
        _check_count_sum(job.path, job.role, match_sum, f"by line {issues.lines}")
        lo, hi = a[ur, uc], b[ur, uc]
        pending["pk"].append(np.minimum(lo, hi) * V + np.maximum(lo, hi))  # pair keys i * V + j, i <= j
        pending["w"].append(PAIR_W[uc])
        pending["pu"].append(ur + n_ngrams)
        pending["m"].append(rows.match[e])
        pending["yu"].append(rows.ngram[e] + n_ngrams)
        pending["y"].append(rows.year[e] - y0)
        n_ngrams += U
        n_pending += len(e)
        entries += len(e)
        if n_pending >= FLUSH_ENTRIES:
            flush()
    flush()
    _check_malformed(issues, job.max_malformed, final=True)
    S = lsm.result((T, VV), idx_dtype)
    meta = {"key": job.key, "version": PART_VERSION, "path": job.path, "size": feed.size,
            "sha256": feed.sha.hexdigest(), "layout": issues.layout, "lines": issues.lines,
            "malformed": issues.malformed, "examples": issues.examples,
            "annotated_lines": issues.annotated, "out_of_range_lines": out_of_range,
            "entries": entries, "nnz": int(S.nnz), "match_sum": match_sum, "peak_rss_mb": peak_rss_mb()}
    return S, meta


def _fivegram_file(job: _Job, report: Callable[[int], None] | None) -> dict:
    """``_count_fivegrams`` saved atomically as the file's part (npz)."""
    S, meta = _count_fivegrams(job, report)
    with atomic_path(job.part) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, data=S.data, indices=S.indices, indptr=S.indptr, shape=np.array(S.shape, dtype=np.int64),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return meta


def _load_fivegram_meta(path: str, key: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
    except Exception:  # noqa: BLE001 - an unreadable part is recomputed
        return None
    return meta if meta.get("key") == key and meta.get("version") == PART_VERSION else None


def _load_fivegram_part(path: str) -> sp.csr_matrix:
    with np.load(path, allow_pickle=False) as z:
        m = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(int(x) for x in z["shape"]))
    m.has_canonical_format = True
    return m


def onegram_counts(path: str | os.PathLike, years: tuple[int, int] = DEFAULT_YEARS, *,
                   denominators: Sequence[int] | None = None, lowercase: bool = True, pos: str = "drop",
                   block_mb: float = 8.0, max_malformed: float = 0.01) -> tuple[pa.Table, dict]:
    """One 1-gram file in memory: (table word/count[/score], meta with ``year_totals`` over ``years``).

    ``score`` (only with ``denominators``, the yearly totals over ``years``) is the sum over years of
    count / total; divide by the number of years with a non-zero total for the mean relative frequency.
    """
    job = _Job("onegrams", str(path), "", "", (int(years[0]), int(years[1])), lowercase, pos,
               max(1 << 12, int(block_mb * (1 << 20))), max_malformed,
               denominators=None if denominators is None else tuple(int(x) for x in denominators))
    return _count_onegrams(job, None)


def fivegram_counts(path: str | os.PathLike, vocab: Sequence[str], years: tuple[int, int] = DEFAULT_YEARS, *,
                    lowercase: bool = True, pos: str = "drop", block_mb: float = 8.0,
                    max_malformed: float = 0.01) -> tuple[sp.csr_matrix, dict]:
    """One 5-gram file in memory: (CSR (years, V*V) of pair counts over keys i * V + j with i <= j, meta)."""
    job = _Job("fivegrams", str(path), "", "", (int(years[0]), int(years[1])), lowercase, pos,
               max(1 << 12, int(block_mb * (1 << 20))), max_malformed, vocab=tuple(vocab))
    return _count_fivegrams(job, None)


def _run_job(job: _Job) -> dict:
    report = (lambda n: _PROGRESS_Q.put(n)) if _PROGRESS_Q is not None else None
    return (_onegram_file if job.role == "onegrams" else _fivegram_file)(job, report)


# ---------------------------------------------------------------------------------------------- orchestration

def _part_key(role: str, path: Path, settings: dict) -> str:
    st = os.stat(path)
    ident = {"v": PART_VERSION, "role": role, "path": str(path.resolve()), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, **settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _digest(values) -> str | None:
    if values is None:
        return None
    return hashlib.sha256(json.dumps([v if isinstance(v, str) else int(v) for v in values]).encode()).hexdigest()


def _hash_inputs(paths: list[str], shas: dict[str, str], workers: int, desc: str, progress: bool) -> None:
    """sha256 of the raw bytes of each file into ``shas`` (as ``_Feed`` hashes a file it counts)."""
    if not paths:
        return
    cancel = threading.Event()
    with tqdm(total=sum(os.stat(p).st_size for p in paths), desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as ex:
        futs = {ex.submit(file_sha256, p, HASH_CHUNK, cancel): p for p in paths}
        try:
            for f in as_completed(futs):
                shas[futs[f]] = f.result()
                bar.update(os.stat(futs[f]).st_size)
        except BaseException:
            cancel.set()
            raise


def _run_phase(jobs: list[_Job], workers: int, desc: str, progress: bool,
               load_meta: Callable[[_Job], dict | None], shas: dict[str, str]) -> tuple[list[dict], int]:
    """Run the jobs whose part is missing or stale; return (metas in job order, number of reused parts).

    ``shas``: the sha256 of the inputs hashed so far in this run (read and extended).
    """
    metas: dict[int, dict] = {}
    for k, j in enumerate(jobs):
        # a cached part is a candidate only when it is a real file of the work folder, describes this input,
        # and the input is a regular file (a pipe cannot be read again to check it)
        m = load_meta(j) if os.path.isfile(j.part) and not os.path.islink(j.part) else None
        if m is not None and m.get("path") == j.path and os.path.isfile(j.path):
            metas[k] = m
    # reused only for the same content (size and mtime can be restored: cp -p, rsync -a, tar)
    _hash_inputs(sorted({jobs[k].path for k in metas} - set(shas)), shas, workers, f"{desc} (checking parts)",
                 progress)
    metas = {k: m for k, m in metas.items() if m.get("sha256") == shas[jobs[k].path]}
    pending = [k for k in range(len(jobs)) if k not in metas]
    reused = len(jobs) - len(pending)
    total = sum(jobs[k].size for k in pending)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
        if workers <= 1 or len(pending) <= 1:
            for k in pending:
                metas[k] = (_onegram_file if jobs[k].role == "onegrams" else _fivegram_file)(jobs[k], bar.update)
        elif pending:
            ctx = mp.get_context("forkserver")
            q = ctx.Queue()
            stop = ctx.Event()
            alive_r, alive_w = ctx.Pipe(duplex=False)  # workers exit when alive_w closes (this process died)
            ex = ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(q, stop, alive_r, os.getpid()))
            try:
                futs = {ex.submit(_run_job, jobs[k]): k for k in pending}
                left = set(futs)
                while left:
                    done, left = wait(left, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(q, bar)
                    for f in done:
                        metas[futs[f]] = f.result()  # re-raises a worker's error
                _drain(q, bar)
            except BaseException:
                stop.set()
                ex.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                ex.shutdown(wait=True)
                alive_r.close()
                alive_w.close()
    for k in pending:
        shas[jobs[k].path] = metas[k]["sha256"]
    return [metas[k] for k in range(len(jobs))], reused


def _drain(q, bar) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue.Empty:
            return


@dataclass
class NgramResult:
    out: Path
    n_steps: int
    vocab_size: int
    reused_parts: int
    processed_parts: int
    malformed_lines: int
    total_lines: int
    malformed_examples: list[dict]
    total_weight: int
    peak_rss_mb: float          # the largest peak memory of a process that counted a file


def given_vocab(vocab_words: Sequence[str], lowercase: bool) -> list[str]:
    """``vocab_words`` as the tokens are matched against them: lowercased (as the tokens, ``pc.utf8_lower``)
    with ``lowercase``; ``ValueError`` naming the words given twice (or twice after lowercasing)."""
    given = [str(w) for w in vocab_words]
    vocab = pc.utf8_lower(pa.array(given, pa.string())).to_pylist() if lowercase else given
    spelled: dict[str, list[str]] = {}
    for g, w in zip(given, vocab):
        spelled.setdefault(w, []).append(g)
    if twice := {w: g for w, g in spelled.items() if len(g) > 1}:
        shown = ", ".join(f"{w!r} (as {', '.join(map(repr, g))})" for w, g in list(twice.items())[:5])
        case = lowercase and any(len(set(g)) > 1 for g in twice.values())
        raise ValueError(f"the given vocabulary lists {len(twice)} word(s) twice{' after lowercasing' if case else ''}: "
                         f"{shown}; remove the repeats{' (or pass --keep-case)' if case else ''}")
    return vocab


def prepare_ngrams(onegrams: Sequence[str | os.PathLike], fivegrams: Sequence[str | os.PathLike],
                   out: str | os.PathLike, *, years: tuple[int, int] = DEFAULT_YEARS, vocab_size: int = DEFAULT_VOCAB,
                   rank: str = "relfreq", totalcounts: str | os.PathLike | None = None,
                   vocab_words: Sequence[str] | None = None, lowercase: bool = True, pos: str = "drop",
                   workers: int | None = None, block_mb: float = 8.0, max_malformed: float = 0.01,
                   force: bool = False, progress: bool = True) -> NgramResult:
    """1-grams -> vocabulary, 5-grams -> one co-occurrence matrix per year, written to ``out`` (``cooc``)."""
    y0, y1 = int(years[0]), int(years[1])
    if y0 > y1:
        raise ValueError(f"year range {y0}-{y1} is empty")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    if pos not in POS_RULES:
        raise ValueError(f"pos must be one of {POS_RULES}, got {pos!r}")
    if vocab_words is None and vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    if not 0 <= max_malformed <= 1:
        raise ValueError(f"max_malformed is a fraction in [0, 1], got {max_malformed}")
    if block_mb <= 0:
        raise ValueError(f"block size must be positive, got {block_mb} MB")
    one = expand_inputs(onegrams, "--onegrams")
    five = expand_inputs(fivegrams, "--fivegrams")
    if not one:
        raise ValueError("no 1-gram files given (--onegrams); they give the vocabulary and the yearly totals")
    if not five:
        raise ValueError("no 5-gram files given (--fivegrams)")
    check_inputs(one, "onegrams")
    check_inputs(five, "fivegrams")
    given = given_vocab(vocab_words, lowercase) if vocab_words is not None else None  # before any counting
    out = check_output_dir(out, force)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    T = y1 - y0 + 1
    work = out.parent / f".{out.name}.work"
    if work.is_symlink():  # the cache of per-file parts must be a real folder next to OUT
        raise FileExistsError(f"{work} is a symbolic link (to {work.resolve()}); remove it, it holds only a cache")
    work.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(work)  # parts of a build that was killed mid-write
    block_bytes = max(1 << 12, int(block_mb * (1 << 20)))
    common = {"years": [y0, y1], "lowercase": lowercase, "pos": pos}

    tc = read_totalcounts(totalcounts) if totalcounts is not None else None
    tc_tot = None
    if tc is not None:
        tc_tot = np.zeros(T, dtype=np.int64)  # (T,)
        sel = (tc["year"] >= y0) & (tc["year"] <= y1)
        tc_tot[tc["year"][sel] - y0] = tc["match_count"][sel]

    def onegram_jobs(den):
        dd = _digest(den)
        jobs = []
        for p in one:
            key = _part_key("onegrams", p, {**common, "denominators": dd})
            jobs.append(_Job("onegrams", str(p), str(work / f"onegrams-{key[:32]}.arrow"), key, (y0, y1), lowercase,
                             pos, block_bytes, max_malformed, denominators=None if den is None else tuple(int(x) for x in den),
                             size=os.stat(p).st_size))
        return jobs

    def load1(j):
        r = _load_onegram_part(j.part, j.key)
        return None if r is None else r[1]

    reused = processed = 0
    shas: dict[str, str] = {}  # sha256 of the inputs hashed in this run
    need_scores = vocab_words is None and rank == "relfreq"
    den = tc_tot if (need_scores and tc_tot is not None) else None
    jobs1 = onegram_jobs(den)
    metas1, r = _run_phase(jobs1, workers, "1-grams", progress, load1, shas)
    reused, processed = reused + r, processed + len(jobs1) - r
    _check_distinct_contents(metas1, "onegrams")
    _check_count_sum(f"{len(one)} 1-gram files", "onegrams", sum(m["match_sum"] for m in metas1), "over all files")
    year_tot = np.sum([m["year_totals"] for m in metas1], axis=0).astype(np.int64)  # (T,)
    if need_scores and den is None:  # yearly totals from the 1-grams themselves: second pass for the scores
        den = year_tot
        jobs1 = onegram_jobs(den)
        metas1, r = _run_phase(jobs1, workers, "1-grams (scores)", progress, load1, shas)
        reused, processed = reused + r, processed + len(jobs1) - r
    tokens = tc_tot if tc_tot is not None else year_tot

    words = _reduce_words([_load_onegram_part(j.part, j.key)[0] for j in jobs1])
    if vocab_words is not None:
        vocab = given
        cnt = pc.index_in(pa.array(vocab, pa.string()), value_set=words["word"]).fill_null(-1).to_numpy()
        wc = words["count"].to_numpy()
        counts = np.where(cnt >= 0, wc[np.maximum(cnt, 0)] if len(wc) else 0, 0).astype(np.int64)
        if zero := [w for w, c in zip(vocab, counts.tolist()) if c == 0]:
            warnings.warn(f"{len(zero)} of the {len(vocab)} given vocabulary words never occur in the 1-grams in "
                          f"{y0}-{y1} (count 0), e.g. {zero[:5]}; check their spelling"
                          f"{'' if lowercase else ' and case (--keep-case keeps the tokens as written)'}", stacklevel=2)
    else:
        keys = [("score", "descending")] if rank == "relfreq" else []
        order = pc.sort_indices(words, sort_keys=keys + [("count", "descending"), ("word", "ascending")])
        top = pc.take(words, order).slice(0, vocab_size)
        top = top.filter(pc.greater(top["count"], 0))
        vocab = top["word"].to_pylist()
        counts = top["count"].to_numpy().astype(np.int64)
    if not vocab:
        raise ValueError(f"no vocabulary: the 1-gram files hold no usable word in the years {y0}-{y1}")
    V = len(vocab)

    vd = _digest(vocab)
    jobs5 = []
    for p in five:
        key = _part_key("fivegrams", p, {**common, "vocab": vd})
        jobs5.append(_Job("fivegrams", str(p), str(work / f"fivegrams-{key[:32]}.npz"), key, (y0, y1), lowercase, pos,
                          block_bytes, max_malformed, vocab=tuple(vocab), size=os.stat(p).st_size))
    metas5, r = _run_phase(jobs5, workers, "5-grams", progress, lambda j: _load_fivegram_meta(j.part, j.key), shas)
    reused, processed = reused + r, processed + len(jobs5) - r
    _check_distinct_contents(metas5, "fivegrams")
    _check_count_sum(f"{len(five)} 5-gram files", "fivegrams", sum(m["match_sum"] for m in metas5), "over all files")

    all_metas = metas1 + metas5
    for m in all_metas:  # a reused part may have been made with a looser threshold
        iss = _Issues(m["path"], m["lines"], m["malformed"], m["examples"])
        _check_malformed(iss, max_malformed, final=True)
    n_lines = sum(m["lines"] for m in all_metas)
    n_bad = sum(m["malformed"] for m in all_metas)
    examples = [e for m in all_metas for e in m["examples"]][:10]
    if n_lines and n_bad / n_lines > max_malformed:
        raise MalformedInputError(f"{n_bad:,} of {n_lines:,} input lines are malformed, more than "
                                  f"{100 * max_malformed:g}%; e.g. {examples[:1]}")

    VV = V * V
    idx_dtype = np.int32 if VV < 2**31 else np.int64
    lsm = _LSM()
    for j in tqdm(jobs5, desc="merging", unit="file", disable=not progress):
        lsm.push(_load_fivegram_part(j.part))
    S = lsm.result((T, VV), idx_dtype)  # (T, V*V) pair counts of all files
    if S.nnz == 0:  # an all-zero corpus is never written as complete
        st = {k: sum(m[k] for m in metas5) for k in ("lines", "malformed", "annotated_lines", "out_of_range_lines")}
        raise MalformedInputError(
            f"the {len(five)} 5-gram file(s) give no co-occurrence of two of the {V} vocabulary words in {y0}-{y1} "
            f"({st['lines']:,} lines: {st['malformed']:,} malformed, {st['annotated_lines']:,} POS-annotated, "
            f"{st['out_of_range_lines']:,} rows outside the years); nothing to write. Check --years, and that the "
            f"5-gram files are of the language and case of the 1-gram files (or --vocab-file).")

    inputs = [inputs_entry(m["path"], "onegrams", m["sha256"], layout=m["layout"], lines=m["lines"],
                           malformed=m["malformed"]) for m in metas1]
    inputs += [inputs_entry(m["path"], "fivegrams", m["sha256"], layout=m["layout"], lines=m["lines"],
                            malformed=m["malformed"]) for m in metas5]
    if totalcounts is not None:
        inputs.append(inputs_entry(totalcounts, "totalcounts"))
    manifest = {
        "kind": "ngrams",
        "inputs": inputs,
        "settings": {"years": [y0, y1], "vocab_size": vocab_size, "rank": rank if vocab_words is None else "given",
                     "lowercase": lowercase, "pos": pos, "max_malformed": max_malformed,
                     "tokens_source": "totalcounts" if tc_tot is not None else "onegrams"},
        "malformed": {"lines": n_bad, "total_lines": n_lines, "examples": examples},
        "stats": {"annotated_lines": sum(m["annotated_lines"] for m in all_metas),
                  "out_of_range_lines": sum(m["out_of_range_lines"] for m in all_metas),
                  "fivegram_entries": sum(m.get("entries", 0) for m in metas5),
                  "vocab_tokens": int(counts.sum())},
    }
    with CoocWriter(out, vocab, counts, force=force) as w:
        for t in tqdm(range(T), desc="writing", unit="year", disable=not progress):
            lo, hi = S.indptr[t], S.indptr[t + 1]
            m = pair_rows_to_symmetric(S.indices[lo:hi].astype(np.int64), S.data[lo:hi], V)
            w.add_step(str(y0 + t), y0 + t, y0 + t, m, int(tokens[t]))
        path = w.finish(manifest)
    shutil.rmtree(work, ignore_errors=True)
    return NgramResult(out=path, n_steps=T, vocab_size=V, reused_parts=reused, processed_parts=processed,
                       malformed_lines=n_bad, total_lines=n_lines, malformed_examples=examples,
                       total_weight=int(S.data.sum()) * 2,
                       peak_rss_mb=max([m.get("peak_rss_mb", 0.0) for m in all_metas] + [peak_rss_mb()]))
