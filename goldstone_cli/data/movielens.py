"""MovieLens ratings: one loader for every published layout, the paper's preprocessing, a cache.

Layouts (detected from the file's first line, or from the file name inside a folder):

- ``ratings.csv``, header ``userId,movieId,rating,timestamp`` (ml-20m, ml-25m, ml-latest, ml-latest-small);
  the four columns are found by name (any order and capitalization), other columns are ignored
- ``ratings.dat``, ``UserID::MovieID::Rating::Timestamp`` (ml-1m, ml-10m)
- ``u.data``, ``user<TAB>item<TAB>rating<TAB>timestamp`` without header (ml-100k)

Lines may end in ``\n``, ``\r\n`` or a bare ``\r`` (Excel's "CSV (Macintosh)"); a UTF-8 BOM is skipped.
Rejected with the file and line: malformed rows, compressed files (also in a folder that holds only
``ratings.csv.gz`` etc.: the message says how to decompress), negative timestamps, rows that
repeat an earlier row exactly, and rows that give an earlier row's user, item and timestamp another
rating (the same user rating the same movie at another time is fine).

Preprocessing (Bamler & Mandt 2018, Sec. 5.2; model Eqs. 6-9):

1. Binarize at the median of *all* ratings: above -> x=+1, below -> x=-1, equal -> dropped. (With an
   even count and two different middle values the median lies between them and nothing is dropped.)
   Ratings outside 0.5-5 stars give a warning and are binarized as they are.
2. ``T`` time bins of equal duration over ``[min, max]`` of the kept ratings' timestamps: bin ``t``
   holds ``bin_edges[t] <= ts < bin_edges[t+1]`` (the last bin also holds ``ts == max``). Computed in
   exact integer arithmetic, ``t = (ts - min) * T // (max - min)``. With ``time_range=[start, end]``
   (unix seconds or ISO dates, UTC) only the ratings with ``start <= ts <= end`` are used (before
   step 1; the dropped count is reported in a warning) and the bins span ``[start, end]``. One
   timestamp far outside the rest (we met one at 2.9e11 years) would otherwise squeeze every
   rating into one bin: when 99% of the ratings fall into at most a tenth of the bins, a warning
   gives the per-bin counts and a ``time_range`` that covers the bulk of the ratings.
3. User and item ids are remapped to ``0..n-1`` in increasing order of the original id, over all
   kept (binarized) ratings of all splits. So every user and movie that appears in validation or test
   also has a row in the ``(T, N, d)`` embeddings (trained there only through the prior / regularizer
   when it has no training ratings).
4. A seeded random split across all bins into train/validation/test (0/1/2) with exactly
   ``round(f_train n)`` and ``round(f_val n)`` ratings in the first two (paper: 50/20/30).

Rows keep the order of the file. The processed arrays are cached as ``.npz`` (see ``load_movielens``).
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
import math
import os
import re
import shlex
import time
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from tqdm.auto import tqdm

from goldstone_cli.io import atomic_path, remove_abandoned_temporaries

PREPROCESS_VERSION = 3  # 2: caches made before the repeat, timestamp and scale checks are rebuilt; 3: before
# the check for two ratings of one user, item and timestamp (such a file must not load from an old cache)
CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
# Layout name -> file name looked for inside a folder (in this order of preference).
LAYOUT_FILES = {"csv": "ratings.csv", "dat": "ratings.dat", "udata": "u.data"}
LAYOUT_VARIANTS = {"csv": "ml-20m, ml-25m, ml-latest, ml-latest-small", "dat": "ml-1m, ml-10m", "udata": "ml-100k"}
SPLITS = {"train": 0, "val": 1, "validation": 1, "test": 2}

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
BASE_URL_ENV = "GOLDSTONE_MOVIELENS_URL"
CACHE_DIR_ENV = "GOLDSTONE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("data") / "cache" / "movielens"


class MovieLensVariant(str, enum.Enum):
    """Data sets that ``goldstone data download movielens`` can fetch."""

    ml_20m = "ml-20m"
    ml_25m = "ml-25m"
    ml_1m = "ml-1m"
    ml_100k = "ml-100k"
    ml_latest_small = "ml-latest-small"


# MD5 of the publisher's zips, as published in <variant>.zip.md5 and pinned by several independent
# public projects. The "latest" sets are re-released from time to time, so they are not pinned.
PINNED_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}


class MalformedRatingsError(ValueError):
    """A ratings file has a row that cannot be parsed; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path: Path, line: int | None, message: str):
        self.path, self.line = path, line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------------------------------------
# Finding and parsing the raw file


def _download_hint(variant: str | None, data_dir: Path) -> str:
    """How to get the data: a path named like a variant (…/ml-20m) is downloaded to exactly that folder;
    any other path cannot be, so the download goes to data/<variant> and data.path is to name it."""
    known = variant in {m.value for m in MovieLensVariant}
    v = variant if known else "ml-20m"
    dest, then = (data_dir, "") if known else (Path("data"), f", then train with data.path=data/{v}")
    return (f"Download it with\n    goldstone data download movielens --variant {v} --dest {dest}\n"
            f"(variants: {', '.join(m.value for m in MovieLensVariant)}){then}, or point data.path= at the folder "
            "or ratings file of a MovieLens copy you already have (goldstone train model=movielens data.path=DIR).")


def find_ratings_file(path: str | os.PathLike, data_dir: str | os.PathLike = "data") -> Path:
    """Resolve ``path`` (a ratings file, a folder, or a variant name like ``ml-20m``) to a ratings file.

    A variant name that is not an existing path is looked up as ``data_dir/<variant>``. In a folder,
    ``ratings.csv``, ``ratings.dat`` and ``u.data`` are tried in that order.
    """
    p = Path(path)
    data_dir = Path(data_dir)
    if not p.exists() and len(p.parts) == 1 and p.name.startswith("ml-"):
        p = data_dir / p
    if p.is_file():
        return p
    # For the hint: the data set folder (p, or p's parent when p names a ratings file) and its parent.
    folder = p.parent if p.name in LAYOUT_FILES.values() else p
    variant = folder.name if folder.name.startswith("ml-") else None
    wanted = ", ".join(f"{f} ({LAYOUT_VARIANTS[k]})" for k, f in LAYOUT_FILES.items())
    if p.is_dir():
        for name in LAYOUT_FILES.values():
            if (p / name).is_file():
                return p / name
        for name in LAYOUT_FILES.values():  # ratings.csv.gz ...: read_ratings says how to decompress it
            for suffix in _COMPRESSED_SUFFIXES:
                if (p / (name + suffix)).is_file():
                    return p / (name + suffix)
        found = ", ".join(sorted(q.name for q in p.iterdir())[:10]) or "nothing"
        subs = sorted(q / name for q in p.iterdir() if q.is_dir() for name in LAYOUT_FILES.values()
                      if (q / name).is_file())
        if subs:  # the folder above the data set (data/ instead of data/ml-20m)
            raise FileNotFoundError(
                f"No MovieLens ratings file in {p.resolve()} itself (it holds {found}), but {subs[0].parent.name}/ "
                f"holds {subs[0].name}: use data.path={subs[0].parent.resolve()}"
                + (f" (or one of {', '.join(q.parent.name for q in subs[1:4])})" if len(subs) > 1 else "") + ".")
        zips = sorted(q for q in p.glob("ml-*.zip") if q.is_file())
        if zips:  # the downloaded archive: read_ratings says how to unpack it
            return zips[0]
        raise FileNotFoundError(
            f"No MovieLens ratings file in {p.resolve()}: looked for {wanted}; the folder holds {found}.\n"
            + _download_hint(variant, folder.resolve().parent))
    raise FileNotFoundError(
        f"No MovieLens data at {p.resolve()}: the path does not exist (looked for a ratings file or a "
        f"folder holding {wanted}).\n" + _download_hint(variant, folder.resolve().parent))


# Magic bytes of compressed files: (kind, usual suffix, command that decompresses next to the file).
_MAGIC = ((b"\x1f\x8b", "gzip", ".gz", "gunzip -k"), (b"BZh", "bzip2", ".bz2", "bunzip2 -k"),
          (b"\xfd7zXZ\x00", "xz", ".xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", ".zst", "unzstd"),
          (b"PK\x03\x04", "zip", ".zip", "unzip"))
_COMPRESSED_SUFFIXES = tuple(m[2] for m in _MAGIC)


def _first_line(path: Path) -> tuple[int, bytes]:
    """``(line number, stripped text)`` of the first non-blank line (``b""`` if none in the first 1000).
    Raises ``MalformedRatingsError`` for a compressed file."""
    with open(path, "rb") as f:
        head = f.read(8)
        for magic, kind, suffix, cmd in _MAGIC:
            if head.startswith(magic) and (kind != "bzip2" or head[3:4].isdigit()):
                q = shlex.quote(str(path))
                how = f"`{cmd} {q}`" if path.suffix == suffix or kind == "zip" else \
                    f"`mv {q} {q}{suffix} && {cmd} {q}{suffix}`"  # the tools want the suffix
                what = "unpack it" if kind == "zip" else "decompress it first"
                raise MalformedRatingsError(path, None, f"the file is {kind}-compressed, not a text ratings file; "
                                            f"{what} (e.g. {how}) and pass the ratings file it gives.")
    first, lineno = b"", 0
    # Universal newlines (\n, \r\n, a bare \r), as the parser splits lines; latin-1 keeps every byte.
    with open(path, "r", encoding="latin-1", newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            first = line.encode("latin-1").lstrip(b"\xef\xbb\xbf").strip()
            if first or lineno > 1000:
                break
    return lineno, first


def detect_layout(path: Path) -> str:
    """Return ``"csv"``, ``"dat"`` or ``"udata"`` from the first non-empty line of ``path``."""
    lineno, first = _first_line(path)
    if not first:
        raise MalformedRatingsError(path, None, "the file is empty; expected MovieLens ratings.")
    text = first.decode("utf-8", errors="replace")
    names = _header_names(text)
    if path.suffix == ".csv" or any(n.lower() in ("userid", "movieid") for n in names):
        _csv_columns(path, lineno, text)  # raises for a header without the four columns
        return "csv"
    if "::" in text:
        return "dat"
    if "\t" in text:
        return "udata"
    raise MalformedRatingsError(
        path, lineno, f"unrecognized layout {text[:80]!r}: expected a ratings.csv header "
        f"({','.join(CSV_HEADER)}), 'user::item::rating::timestamp' (ratings.dat) or "
        "'user<TAB>item<TAB>rating<TAB>timestamp' (u.data).")


def _header_names(text: str) -> list[str]:
    """The comma-separated (possibly quoted) names of a csv header line."""
    return [c.strip().strip('"').strip() for c in next(csv.reader([text]), [])]


def _csv_columns(path: Path, lineno: int | None = None, text: str | None = None) -> tuple[int, list[str], list[int]]:
    """``(header line, header names, positions of userId, movieId, rating, timestamp)`` of a csv ratings
    file: the four columns are found by name (case-insensitive); other columns are allowed."""
    if text is None:
        lineno, first = _first_line(path)
        text = first.decode("utf-8", errors="replace")
    names = _header_names(text)
    lower = [n.lower() for n in names]
    missing = [c for c in CSV_HEADER if c.lower() not in lower]
    twice = [c for c in CSV_HEADER if lower.count(c.lower()) > 1]
    if missing or twice:
        why = (f"it has no column {', '.join(missing)}" if missing else
               f"column {twice[0]} appears {lower.count(twice[0].lower())} times")
        sep = next((c for c in (";", "\t", "|") if len(names) == 1 and c in text), None)
        if sep is not None:
            why += f" (its fields are separated by {sep!r}: a ratings.csv separates them by commas)"
        raise MalformedRatingsError(
            path, lineno, f"unexpected header {text[:200]!r}: {why}; a MovieLens ratings.csv starts with a header "
            "line that names the columns userId, movieId, rating and timestamp (in any order; other columns are "
            "ignored), e.g. 'userId,movieId,rating,timestamp'.")
    return int(lineno or 1), names, [lower.index(c.lower()) for c in CSV_HEADER]


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_fields(fields: list[str]) -> str | None:
    """Why a split row is not ``user, item, rating, timestamp`` (None when it is fine)."""
    if len(fields) != 4:
        return f"expected 4 fields (user, item, rating, timestamp), got {len(fields)}"
    names = ("user id", "item id", "rating", "timestamp")
    for name, value in zip(names, fields):
        v = value.strip(" ")
        if name == "rating":
            if _FLOAT.fullmatch(v) is None or not math.isfinite(float(v)):
                return f"{name} {value!r} is not a finite number"
        elif _INT.fullmatch(v) is None:
            return f"{name} {value!r} is not an integer"
        elif v.startswith("+"):
            return f"{name} {value!r} has a leading '+', which the parser does not read; remove it"
        elif not -2**63 <= int(v) < 2**63:
            return f"{name} {value!r} does not fit in a 64-bit integer (|value| < 9.2e18)"
    return None


def _locate_bad_line(path: Path, layout: str, skip: int = 0,
                     columns: tuple[list[str], list[int]] | None = None) -> tuple[int, str, str] | None:
    """Scan ``path`` line by line for the first malformed row after line ``skip`` (the csv header)
    (only run after the fast parser failed). ``columns``: a csv file's header names and the positions
    of its user, item, rating and timestamp columns (default: exactly those four)."""
    first_row = True
    with open(path, "r", encoding="utf-8-sig", errors="replace", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if lineno <= skip or not line:
                continue  # empty lines are skipped by the fast parser too
            if not line.strip():
                return lineno, line, "a line of only spaces (or tabs); delete it"
            if layout == "dat":
                fields = line.split("::")
                if any(":" in x for x in fields):
                    return lineno, line, "stray ':' (fields are separated by '::')"
            elif layout == "csv":
                fields = next(csv.reader([line]), [])
                if columns is not None and (len(columns[0]) != 4 or columns[1] != [0, 1, 2, 3]):
                    names, pos = columns
                    if len(fields) != len(names):
                        return lineno, line, f"expected {len(names)} fields ({','.join(names)}), got {len(fields)}"
                    fields = [fields[k] for k in pos]
            else:
                fields = line.split("\t")
            if (why := _check_fields(fields)) is not None:
                if first_row and layout != "csv" and len(fields) == 4 and not any(c.isdigit() for c in fields[0]):
                    why = (f"{why} (a header line? {LAYOUT_FILES[layout]} has none; delete line {lineno}, e.g. "
                           f"`sed -i {lineno}d {shlex.quote(str(path))}`)")
                return lineno, line, why
            first_row = False
    return None


def _malformed(path: Path, layout: str, detail: str, skip: int = 0,
               columns: tuple[list[str], list[int]] | None = None) -> MalformedRatingsError:
    hit = _locate_bad_line(path, layout, skip, columns)
    if hit is None:
        return MalformedRatingsError(path, None, f"could not be parsed as MovieLens {LAYOUT_FILES[layout]}: {detail}")
    lineno, line, why = hit
    return MalformedRatingsError(path, lineno, f"{why}: {line[:200]!r}")


def _lines_of_rows(path: Path, skip: int, n_rows: int, rows: Sequence[int]) -> list[int | None]:
    """File lines (1-based) of parsed rows ``rows`` (0-based, after ``skip`` lines); error paths only."""
    with open(path, "rb") as f:
        n_lines, last = 0, b"\n"
        while chunk := f.read(1 << 24):
            n_lines, last = n_lines + chunk.count(b"\n"), chunk[-1:]
    if n_lines + (last != b"\n") == skip + n_rows:  # no empty lines: plain arithmetic
        return [skip + 1 + r for r in rows]
    found: dict[int, int] = {}
    with open(path, "r", encoding="latin-1", newline=None) as f:  # empty lines: count the others
        k = -1
        for lineno, line in enumerate(f, start=1):
            if lineno > skip and line != "\n":
                k += 1
                if k in rows:
                    found[k] = lineno
                    if len(found) == len(set(rows)):
                        break
    return [found.get(r) for r in rows]


@dataclass(frozen=True)
class RawRatings:
    """The four columns of a ratings file, in file order."""

    user: np.ndarray  # (n,) int64, original user ids
    item: np.ndarray  # (n,) int64, original movie ids
    rating: np.ndarray  # (n,) float64
    timestamp: np.ndarray  # (n,) int64, unix seconds

    def __len__(self) -> int:
        return int(self.rating.size)


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _later_members(rows: np.ndarray, same: np.ndarray) -> tuple[int, int, int] | None:
    """``(count, row, earlier)`` for groups of consecutive entries of ``rows`` (file rows, in any order within a
    group; ``same[j]``: entry j+1 is in entry j's group): count of rows that are not their group's first in file
    order, the first such row in file order, and the first row of its group. None when every group has one row."""
    if not same.any():
        return None
    starts = np.flatnonzero(np.r_[True, ~same])
    first = np.repeat(np.minimum.reduceat(rows, starts), np.diff(np.r_[starts, rows.size]))
    later = np.flatnonzero(rows != first)
    j = later[np.argmin(rows[later])]
    return int(later.size), int(rows[j]), int(first[j])


def _repeats(user: np.ndarray, item: np.ndarray, rating: np.ndarray, ts: np.ndarray
             ) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
    """The rows that repeat an earlier row exactly, and the rows that give an earlier row's (user, item,
    timestamp) another rating: each ``(count, row, earlier row)`` as ``_later_members`` says, or None; the
    second is looked for only where there are no exact repeats (None beside an exact repeat).

    One sort by (user, item) finds the rows of pairs rated more than once (none in most files: done); only
    those rows are sorted by (pair, timestamp), and only rows that share a pair and a timestamp by rating.
    """
    if user.size < 2:
        return None, None
    same_u = user[1:] == user[:-1]
    if not (user[1:] < user[:-1]).any() and not (same_u & (item[1:] < item[:-1])).any():
        same = same_u & (item[1:] == item[:-1])  # sorted by (user, item), as ml-20m: O(n)
        rows = None
    else:  # unsorted: sort by (user, item)
        du, di = int(user.max()) - int(user.min()) + 1, int(item.max()) - int(item.min()) + 1
        if du * di < 2**63:
            key = user - user.min()  # in place from here: 20M rows are 160 MB an array
            key *= di
            key += item - item.min()
            bits = (user.size - 1).bit_length()
            if du * di <= 2 ** (63 - bits):  # key and row in one int64: a plain sort does the argsort's work
                key <<= bits
                key |= np.arange(user.size)
                key.sort()
                rows = key & ((1 << bits) - 1)
                key >>= bits
            else:
                rows = np.argsort(key)
                key = key[rows]
            same = key[1:] == key[:-1]
            del key
        else:
            rows = np.lexsort((item, user))
            same = (user[rows[1:]] == user[rows[:-1]]) & (item[rows[1:]] == item[rows[:-1]])
    del same_u
    if not same.any():
        return None, None
    in_run = np.r_[same, False] | np.r_[False, same]  # entries of pairs rated more than once
    pair = np.cumsum(np.r_[True, ~same])[in_run]  # a number per pair, increasing in sorted order
    rows = np.flatnonzero(in_run) if rows is None else rows[in_run]
    del same, in_run
    t = ts[rows]
    lo, span = int(t.min()), int(t.max()) - int(t.min()) + 1
    if (int(pair[-1]) + 1) * span < 2**63:  # (pair, timestamp) as one int64
        key = pair
        key *= span
        key += t - lo
        del pair, t
        sk = np.sort(key)
        if not (sk[1:] == sk[:-1]).any():  # every pair's ratings at distinct times (a sort is faster than argsort)
            return None, None
        del sk
        o = np.argsort(key)
        key = key[o]
        same = key[1:] == key[:-1]
    else:
        o = np.lexsort((t, pair))
        same = (pair[o[1:]] == pair[o[:-1]]) & (t[o[1:]] == t[o[:-1]])
        del pair, t
    rows = rows[o]
    del o
    if not same.any():  # every pair's ratings at distinct times
        return None, None
    in_run = np.r_[same, False] | np.r_[False, same]  # rows sharing a pair and a timestamp with another row
    group = np.cumsum(np.r_[True, ~same])[in_run]
    sub = rows[in_run]
    r = rating[sub]
    o = np.lexsort((r, group))
    sub, group, r = sub[o], group[o], r[o]
    exact = _later_members(sub, (group[1:] == group[:-1]) & (r[1:] == r[:-1]))
    return exact, None if exact else _later_members(rows, same)


def read_ratings(path: str | os.PathLike, layout: str | None = None) -> RawRatings:
    """Parse a MovieLens ratings file with pyarrow's multi-threaded CSV reader.

    Raises ``MalformedRatingsError`` naming the file and line of the first bad row, also for negative
    timestamps and for rows that repeat an earlier row exactly (a user may rate a movie again later).
    """
    path = Path(path)
    _first_line(path)  # rejects a compressed file
    layout = layout or detect_layout(path)
    i64, f64 = pa.int64(), pa.float64()
    columns = None  # csv: header names and the positions of the four columns
    if layout == "csv":
        skip, header, pos = _csv_columns(path)  # skip: the header's line (after any blank lines)
        columns = (header, pos)
        names = [f"_{k}" for k in range(len(header))]  # other columns: parsed, not converted
        for c, k in zip(CSV_HEADER, pos):
            names[k] = c
        cols, delim = list(CSV_HEADER), ","
        types = dict(zip(cols, [i64, i64, f64, i64]))
    elif layout == "dat":
        # '::' is read as ':' with an empty (null-typed) field between the values; anything in
        # those fields is a parse error.
        names = ["user", "_a", "item", "_b", "rating", "_c", "timestamp"]
        types = dict(zip(names, [i64, pa.null(), i64, pa.null(), f64, pa.null(), i64]))
        cols, delim, skip = ["user", "item", "rating", "timestamp"], ":", 0
    elif layout == "udata":
        names = cols = ["user", "item", "rating", "timestamp"]
        types, delim, skip = dict(zip(names, [i64, i64, f64, i64])), "\t", 0
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUT_FILES)}")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter=delim, quote_char=False if layout != "csv" else '"'),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)),
        )
    except pa.ArrowInvalid as e:
        raise _malformed(path, layout, str(e), skip, columns) from None
    if table.num_rows == 0:
        raise MalformedRatingsError(path, None, "holds no ratings.")
    if any(table[c].null_count for c in cols):
        raise _malformed(path, layout, "empty or null field", skip, columns)
    out = [table[c].to_numpy() for c in cols]
    del table
    user, item, rating, ts = out
    if not np.isfinite(rating).all():
        raise _malformed(path, layout, "non-finite rating", skip, columns)

    def at(*rows: int) -> tuple[list[int | None], list[str]]:  # lines (None: unknown) and "line N" texts
        lines = _lines_of_rows(path, skip, rating.size, rows)
        return lines, [f"line {ln}" if ln else f"data row {r + 1}" for ln, r in zip(lines, rows)]

    def values(row: int) -> str:
        return f"user {user[row]}, item {item[row]}, rating {rating[row]:g}, timestamp {ts[row]}"

    if ts.min() < 0:
        neg = ts < 0
        row = int(np.argmax(neg))
        (line,), (text,) = at(row)
        raise MalformedRatingsError(
            path, line, f"{_count(int(neg.sum()), 'rating has', 'ratings have')} a negative timestamp (before 1970), "
            f"the first is {text} ({values(row)}); MovieLens timestamps are unix seconds since 1970-01-01 UTC. "
            "Fix or remove those lines.")
    exact, same_time = _repeats(user, item, rating, ts)
    if (hit := exact) is not None:
        count, row, earlier = hit
        (line, _), (text, text0) = at(row, earlier)
        raise MalformedRatingsError(
            path, line, f"{_count(count, 'row repeats', 'rows repeat')} an earlier row exactly (same user, item, "
            f"rating and timestamp), the first is {text} ({values(row)}), a repeat of {text0}. Remove the repeated "
            "lines (was part of the file appended to it?); the same user rating a movie again at another time is fine.")
    if (hit := same_time) is not None:  # no exact repeats: the ratings differ
        count, row, earlier = hit
        (line, _), (text, text0) = at(row, earlier)
        raise MalformedRatingsError(
            path, line, f"{_count(count, 'row gives', 'rows give')} an earlier row's user, item and timestamp another "
            f"rating, the first is {text} ({values(row)}), against {text0} ({values(earlier)}). Keep one rating "
            "per user, item and timestamp (a user rating a movie again at another time is fine).")
    return RawRatings(*out)


# ----------------------------------------------------------------------------------------------
# Preprocessing (paper Sec. 5.2)


def _remap(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous codes in increasing order of the original id: ``(codes (n,), originals (k,))``."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < 4 * ids.size + (1 << 22):  # O(n) lookup table, no sort
        present = np.zeros(hi + 1, dtype=bool)
        present[ids] = True
        originals = np.flatnonzero(present).astype(np.int64)
        lut = np.cumsum(present, dtype=np.int64) - 1  # (hi+1,)
        return lut[ids], originals
    originals, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), originals.astype(np.int64)


def _check_settings(T: int, split_fractions: Sequence[float]) -> tuple[int, tuple[float, float, float]]:
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise ValueError(f"T (number of time bins) must be a positive integer, got {T!r}.")
    fr = tuple(float(f) for f in split_fractions)
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-9:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {split_fractions!r}.")
    return int(T), fr  # type: ignore[return-value]


def parse_time(value: Any) -> int:
    """Unix seconds from an int / float / digit string (seconds) or an ISO date or date-time (UTC),
    e.g. ``1995-01-01`` or ``2015-03-31T23:59:59``."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"not a finite time: {value!r}")
        return int(math.floor(value))
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        dt = np.datetime64(text.rstrip("Zz"), "s")
    except ValueError:
        dt = np.datetime64("NaT")
    if np.isnat(dt):
        raise ValueError(f"not a time: {value!r}; give unix seconds or an ISO date like 1995-01-01")
    return int(dt.astype(np.int64))


def check_time_range(time_range: Sequence[Any] | None) -> tuple[int, int] | None:
    """``[start, end]`` -> ``(start, end)`` unix seconds with start < end, or None."""
    if time_range is None:
        return None
    tr = list(time_range)
    if len(tr) != 2:
        raise ValueError(f"time_range must be [start, end], got {tr!r}")
    try:
        start, end = parse_time(tr[0]), parse_time(tr[1])
    except ValueError as exc:
        raise ValueError(f"time_range={tr!r}: {exc}") from None
    if not start < end:
        raise ValueError(f"time_range must have start < end, got {tr!r} ({start} >= {end} unix seconds)")
    return start, end


def _fmt_time(ts: float) -> str:
    try:
        return str(np.datetime64(int(round(ts)), "s")).replace("T00:00:00", "")
    except (OverflowError, ValueError):
        return f"{ts:.4g} s"


def _rle(counts: np.ndarray) -> str:
    """'87,699, 0 (x98), 1': bin counts with runs of equal values shortened."""
    out, k = [], 0
    while k < len(counts):
        j = k
        while j + 1 < len(counts) and counts[j + 1] == counts[k]:
            j += 1
        out.append(f"{int(counts[k]):,}" + (f" (x{j - k + 1})" if j > k else ""))
        k = j + 1
    return ", ".join(out)


def binning_warning(t: np.ndarray, T: int, quantiles: Sequence[float] | None = None) -> str | None:
    """A warning text when 99% of the ratings fall into at most max(1, T // 10) of the T bins (a
    timestamp far outside the rest squeezes the others together); else None. ``quantiles``: the
    0.1% and 99.9% timestamp quantiles, for a suggested ``time_range``."""
    if T < 2 or t.size == 0:
        return None
    counts = np.bincount(t, minlength=T)
    top = np.cumsum(np.sort(counts)[::-1])
    needed = int(np.searchsorted(top, 0.99 * t.size) + 1)  # bins holding 99% of the ratings
    if needed > max(1, T // 10):
        return None
    hint = "data.time_range=[start,end]"
    if quantiles is not None:
        try:  # whole days around the 0.1% and 99.9% quantiles
            lo = np.datetime64(int(quantiles[0]), "s").astype("datetime64[D]")
            hi = np.datetime64(int(quantiles[1]), "s").astype("datetime64[D]") + np.timedelta64(1, "D")
            hint = f"data.time_range=[{lo},{hi}] (0.1% to 99.9% of the ratings)"
        except (OverflowError, ValueError):
            pass
    return (f"99% of the {t.size:,} ratings fall into {needed} of the {T} equal-duration time bins (per-bin counts: "
            f"{_rle(counts)}): a few timestamps far outside the rest stretch the bins. Set {hint} to bin only that "
            f"range (ratings outside it are dropped).")


def preprocess(raw: RawRatings, T: int = 100, seed: int = 0,
               split_fractions: Sequence[float] = (0.5, 0.2, 0.3),
               time_range: Sequence[Any] | None = None) -> dict[str, Any]:
    """Binarize, bin, remap and split ``raw`` (paper Sec. 5.2); return the arrays of ``MovieLensData``
    plus ``n_outside_time_range``, ``ts_quantiles`` (0.1% and 99.9%, for the binning warning) and
    ``scale_warning`` (a text when ratings lie outside 0.5-5 stars, else None)."""
    T, fr = _check_settings(T, split_fractions)
    tr = check_time_range(time_range)
    n_outside = 0
    if tr is not None:
        inside = (raw.timestamp >= tr[0]) & (raw.timestamp <= tr[1])
        n_outside = int(raw.timestamp.size - inside.sum())
        if n_outside == raw.timestamp.size:
            raise ValueError(f"no rating lies in time_range [{_fmt_time(tr[0])}, {_fmt_time(tr[1])}]; the file's "
                             f"ratings span {_fmt_time(raw.timestamp.min())} to {_fmt_time(raw.timestamp.max())}")
        if n_outside:
            raw = RawRatings(raw.user[inside], raw.item[inside], raw.rating[inside], raw.timestamp[inside])
    median = float(np.median(raw.rating))
    off = (raw.rating < 0.5) | (raw.rating > 5.0)  # outside MovieLens's star scales
    scale_warning = None
    if off.any():
        r = raw.rating[off]
        scale_warning = (f"{r.size:,} of the {off.size:,} ratings lie outside MovieLens's 0.5-5 star scale (min "
                         f"{r.min():g}, max {r.max():g}); the ratings are binarized at their median ({median:g}) "
                         "as they are.")
    del off
    keep = raw.rating != median  # ratings equal to the median are dropped
    n = int(keep.sum())
    if n == 0:
        raise ValueError("all ratings equal their median; nothing is left after binarization.")
    x = np.where(raw.rating[keep] > median, 1, -1).astype(np.int8)  # (n,) +-1
    ts = raw.timestamp[keep]  # (n,)

    t_min, t_max = (int(ts.min()), int(ts.max())) if tr is None else tr  # the bins span the data or time_range
    span = t_max - t_min
    ts_quantiles = [float(q) for q in np.quantile(ts, [0.001, 0.999])]
    if span == 0:
        if T > 1:
            raise ValueError(f"all kept ratings have the same timestamp {t_min}; cannot make T={T} time bins.")
        t = np.zeros(n, dtype=np.int64)
    elif span <= (2**63 - 1) // T:
        t = (ts - t_min) * T // span  # (n,) exact: bin_edges[t] <= ts < bin_edges[t+1]
        np.minimum(t, T - 1, out=t)  # ts == t_max belongs to the last bin
    else:  # astronomically large span: floating point (overflow guard)
        t = np.minimum(np.floor((ts - t_min) / span * T).astype(np.int64), T - 1)
    del ts
    bin_edges = t_min + span * (np.arange(T + 1, dtype=np.float64) / T)  # (T+1,) unix seconds

    user, user_ids = _remap(raw.user[keep])
    item, item_ids = _remap(raw.item[keep])

    n_train, n_val = int(round(fr[0] * n)), int(round(fr[1] * n))
    n_val = min(n_val, n - n_train)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [n_train, n_val, n - n_train - n_val])  # (n,)
    np.random.default_rng(seed).shuffle(split)  # random across all bins

    return dict(user=user, item=item, t=t, x=x, split=split, bin_edges=bin_edges, median=median,
                user_ids=user_ids, item_ids=item_ids, T=T, n_dropped_at_median=int(raw.rating.size - n),
                n_outside_time_range=n_outside, ts_quantiles=ts_quantiles, scale_warning=scale_warning)


# ----------------------------------------------------------------------------------------------
# The data set object


class MovieLensSplit(NamedTuple):
    """One split as torch tensors, all of shape ``(n_split,)``."""

    user: torch.Tensor  # int64 in [0, n_users)
    item: torch.Tensor  # int64 in [0, n_items)
    t: torch.Tensor  # int64 in [0, T)
    x: torch.Tensor  # +-1 (float32 by default)


@dataclass(frozen=True)
class MovieLensSource:
    """Where the arrays came from."""

    path: str  # the raw ratings file
    layout: str  # "csv", "dat" or "udata"
    content_sha256: str  # SHA-256 of the raw file's bytes
    n_raw: int  # ratings in the file
    n_dropped_at_median: int
    cache_path: str | None  # the cache file read or written (None: caching off or not writable)
    from_cache: bool
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # seconds per stage


@dataclass(frozen=True, eq=False)
class MovieLensData:
    """Binarized, time-binned, split MovieLens ratings (one entry per kept rating, file order)."""

    user: np.ndarray  # (n,) int64 in [0, n_users)
    item: np.ndarray  # (n,) int64 in [0, n_items)
    t: np.ndarray  # (n,) int64 time bin in [0, T)
    x: np.ndarray  # (n,) int8, +1 above the median, -1 below
    split: np.ndarray  # (n,) int8: 0 train, 1 validation, 2 test
    n_users: int
    n_items: int
    T: int
    bin_edges: np.ndarray  # (T+1,) float64 unix seconds
    median: float
    user_ids: np.ndarray  # (n_users,) int64 original user id of each row
    item_ids: np.ndarray  # (n_items,) int64 original movie id of each row
    seed: int
    split_fractions: tuple[float, float, float]
    source: MovieLensSource

    def __len__(self) -> int:
        return int(self.x.size)

    def split_mask(self, which: str | int) -> np.ndarray:
        """Boolean mask ``(n,)`` of ``which`` in {"train", "val", "test"} (or 0, 1, 2)."""
        code = SPLITS.get(which) if isinstance(which, str) else which
        if code not in (0, 1, 2):
            raise ValueError(f"unknown split {which!r}; use 'train', 'val' or 'test'.")
        return self.split == code

    def split_tensors(self, which: str | int, device: str | torch.device | None = None,
                      x_dtype: torch.dtype = torch.float32) -> MovieLensSplit:
        """The ratings of one split as torch tensors ``(user, item, t, x)``, each ``(n_split,)``."""
        m = self.split_mask(which)
        return MovieLensSplit(
            user=torch.from_numpy(self.user[m]).to(device),
            item=torch.from_numpy(self.item[m]).to(device),
            t=torch.from_numpy(self.t[m]).to(device),
            x=torch.from_numpy(self.x[m]).to(device=device, dtype=x_dtype),
        )

    def bin_dates(self) -> np.ndarray:
        """Bin edges ``(T+1,)`` as ``datetime64[s]`` (UTC), for axis labels."""
        return np.round(self.bin_edges).astype("datetime64[s]")

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.split, minlength=3)
        return {
            "path": self.source.path, "layout": self.source.layout, "ratings_in_file": self.source.n_raw,
            "median": self.median, "dropped_at_median": self.source.n_dropped_at_median,
            "ratings": len(self), "positive_fraction": float((self.x > 0).mean()),
            "n_users": self.n_users, "n_items": self.n_items, "T": self.T,
            "first": str(self.bin_dates()[0]), "last": str(self.bin_dates()[-1]),
            "train": int(counts[0]), "val": int(counts[1]), "test": int(counts[2]), "seed": self.seed,
            "from_cache": self.source.from_cache,
        }


# ----------------------------------------------------------------------------------------------
# Cache

_ARRAYS = ("user", "item", "t", "x", "split", "bin_edges", "user_ids", "item_ids")


def _file_sha256(path: Path, progress: bool) -> str:
    """Full SHA-256 of the file (hardware SHA extensions: ~0.65 s for ml-20m's 533 MB here)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"hash {path.name}", disable=not progress or size < (64 << 20),
                                     leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def cache_key(content_sha256: str, layout: str, T: int, seed: int, split_fractions: Sequence[float],
              time_range: tuple[int, int] | None = None) -> str:
    """Hex key of one preprocessing result: raw content, layout and every setting that changes it."""
    settings = {"version": PREPROCESS_VERSION, "content_sha256": content_sha256, "layout": layout,
                "T": int(T), "seed": int(seed), "split_fractions": [float(f) for f in split_fractions]}
    if time_range is not None:  # absent without one: the keys of existing caches stay valid
        settings["time_range"] = [int(time_range[0]), int(time_range[1])]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _compact(a: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype for a non-negative index array (cache files stay small)."""
    return a.astype(np.min_scalar_type(int(a.max()) if a.size else 0), copy=False)


def _write_cache(path: Path, key: str, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    meta = dict(meta, key=key, version=PREPROCESS_VERSION, n=int(arrays["x"].size))
    payload = {k: arrays[k] for k in _ARRAYS}
    for k in ("user", "item", "t"):
        payload[k] = _compact(payload[k])
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:  # temp file + fsync + rename: never half-written
        with open(tmp, "wb") as f:
            np.savez(f, **payload)


def _read_cache(path: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Arrays and meta of a complete cache file for ``key``; None (with a warning) if unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("key") != key or meta.get("version") != PREPROCESS_VERSION:
                raise ValueError("its key does not match the raw file and settings")
            arrays = {k: z[k] for k in _ARRAYS}  # reading checks each member's CRC-32
        n, T = meta["n"], meta["T"]
        if any(arrays[k].shape != (n,) for k in ("user", "item", "t", "x", "split")) or \
                arrays["bin_edges"].shape != (T + 1,) or arrays["user_ids"].shape != (meta["n_users"],) or \
                arrays["item_ids"].shape != (meta["n_items"],):
            raise ValueError("array shapes do not match its metadata")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"Ignoring incomplete or damaged cache file {path} ({e}); rebuilding it.", stacklevel=3)
        return None
    for k in ("user", "item", "t"):
        arrays[k] = arrays[k].astype(np.int64)
    return arrays, meta


# ----------------------------------------------------------------------------------------------
# Loading


def load_movielens(
    path: str | os.PathLike = "ml-20m",
    *,
    T: int = 100,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.5, 0.2, 0.3),
    data_dir: str | os.PathLike = "data",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    time_range: Sequence[Any] | None = None,
) -> MovieLensData:
    """Load MovieLens ratings and preprocess them as in the paper (Sec. 5.2; see the module docstring).

    ``path`` is a ratings file, a folder holding one, or a variant name (``ml-20m`` ->
    ``data_dir/ml-20m``). Results are cached in ``cache_dir`` (default ``$GOLDSTONE_CACHE_DIR`` or
    ``data/cache/movielens``) under a key made of the raw file's SHA-256 (hashed in full on every
    load) and the settings (``T``, ``seed``, ``split_fractions``, ``time_range``, layout, preprocessing
    version). Cache files are written atomically and checked (key, shapes, CRC) before use; a damaged
    one is rebuilt. ``time_range=[start, end]`` (unix seconds or ISO dates): see the module docstring.
    """
    T, fr = _check_settings(T, split_fractions)
    tr = check_time_range(time_range)
    seed = int(seed)
    file = find_ratings_file(path, data_dir)
    timings: dict[str, float] = {}
    bar = tqdm(total=4, desc=f"MovieLens {file.parent.name}/{file.name}", unit="stage",
               disable=not progress, leave=False)

    def stage(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 3)
        bar.update(1)
        return time.perf_counter()

    try:
        t0 = time.perf_counter()
        bar.set_postfix_str("detect layout, hash")
        layout = detect_layout(file)
        digest = _file_sha256(file, progress)
        key = cache_key(digest, layout, T, seed, fr, tr)
        cache_path = None
        if use_cache:
            root = Path(cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)
            cache_path = root / f"{file.parent.name}-{file.stem}-{key[:20]}.npz"
            remove_abandoned_temporaries(root)  # cache files of runs killed while writing them
        t0 = stage("hash", t0)

        cached = _read_cache(cache_path, key) if cache_path is not None else None
        if cached is not None:
            arrays, meta = cached
            t0 = stage("read_cache", t0)
            bar.update(2)
            from_cache, n_raw, n_dropped = True, meta["n_raw"], meta["n_dropped_at_median"]
        else:
            bar.set_postfix_str("parse")
            raw = read_ratings(file, layout)
            t0 = stage("parse", t0)
            bar.set_postfix_str("preprocess")
            arrays = preprocess(raw, T, seed, fr, tr)
            n_raw, n_dropped = len(raw), arrays["n_dropped_at_median"]
            del raw
            t0 = stage("preprocess", t0)
            from_cache = False
            if cache_path is not None:
                bar.set_postfix_str("write cache")
                meta = {"n_raw": n_raw, "n_dropped_at_median": n_dropped, "median": arrays["median"], "T": T,
                        "n_users": int(arrays["user_ids"].size), "n_items": int(arrays["item_ids"].size),
                        "seed": seed, "split_fractions": list(fr), "layout": layout, "content_sha256": digest,
                        "raw_path": str(file.resolve()), "time_range": None if tr is None else list(tr),
                        "n_outside_time_range": arrays["n_outside_time_range"],
                        "ts_quantiles": arrays["ts_quantiles"], "scale_warning": arrays["scale_warning"]}
                try:
                    _write_cache(cache_path, key, arrays, meta)
                except OSError as e:
                    warnings.warn(f"Could not write the MovieLens cache {cache_path} ({e}); continuing without "
                                  f"it. Set cache_dir or ${CACHE_DIR_ENV} to a writable folder.", stacklevel=2)
                    cache_path = None
                t0 = stage("write_cache", t0)
            else:
                bar.update(1)
    finally:
        bar.close()

    median = arrays["median"] if not from_cache else float(meta["median"])
    info = arrays if not from_cache else meta
    if info.get("n_outside_time_range"):
        warnings.warn(f"time_range [{_fmt_time(tr[0])}, {_fmt_time(tr[1])}] dropped {info['n_outside_time_range']:,} "
                      f"of the {n_raw:,} ratings of {file} (outside the range).", stacklevel=2)
    if info.get("scale_warning"):
        warnings.warn(f"{file}: {info['scale_warning']}", stacklevel=2)
    squeeze = binning_warning(arrays["t"], T, info.get("ts_quantiles"))
    if squeeze:
        warnings.warn(f"{file}: {squeeze}", stacklevel=2)
    return MovieLensData(
        user=arrays["user"], item=arrays["item"], t=arrays["t"], x=arrays["x"], split=arrays["split"],
        n_users=int(arrays["user_ids"].size), n_items=int(arrays["item_ids"].size), T=T,
        bin_edges=arrays["bin_edges"], median=float(median), user_ids=arrays["user_ids"],
        item_ids=arrays["item_ids"], seed=seed, split_fractions=fr,
        source=MovieLensSource(path=str(file), layout=layout, content_sha256=digest, n_raw=int(n_raw),
                               n_dropped_at_median=int(n_dropped),
                               cache_path=str(cache_path) if cache_path is not None else None,
                               from_cache=from_cache, timings=timings),
    )


# ----------------------------------------------------------------------------------------------
# By-user layout: each rank of a distributed run reads only the ratings of its users (issue 17)
#
# Next to the ``.npz`` cache, ``<cache stem>.byuser/`` holds the ratings sorted by user (stable, so
# within a user in file order) as uncompressed ``.npy`` files that ``np.load(mmap_mode="r")`` maps,
# ``pos`` (each row's index in file order), ``offsets`` ((n_users + 1,): user u's rows are
# ``[offsets[u], offsets[u + 1])``) and ``header.json``, written last, with the key of the cache it
# was made from and the size and SHA-256 of every array file. Without a header whose key matches,
# the folder is never read (a rebuild deletes the header first, so a crash mid-write leaves none).

BY_USER_VERSION = 1
_BY_USER_ROWS = ("user", "item", "t", "x", "split", "pos")  # (n,) each, sorted by user
_BY_USER_FILES = _BY_USER_ROWS + ("offsets",)
_MSG_BYTES = 8192  # the rank-0 -> all broadcast of the folder and key (JSON, zero padded)


@dataclass(frozen=True, eq=False)
class UserRatings:
    """The ratings of users ``start <= user < stop`` (file order, global ids) and the data's shape:
    what a rank of a distributed MovieLens run holds (a ``RatingsLike``)."""

    user: np.ndarray  # (n_local,) int64 in [start, stop)
    item: np.ndarray  # (n_local,) int64 in [0, n_items)
    t: np.ndarray  # (n_local,) int64 in [0, T)
    x: np.ndarray  # (n_local,) int8 +1 / -1
    split: np.ndarray  # (n_local,) int8 0 / 1 / 2
    n_users: int
    n_items: int
    T: int
    user_rows: tuple[int, int]  # (start, stop)
    bytes_read: int  # bytes copied out of the mapped files (offsets included)

    def __len__(self) -> int:
        return int(self.x.size)


def by_user_folder(cache_path: str | os.PathLike) -> Path:
    """The by-user folder that belongs to the ``.npz`` cache file ``cache_path``."""
    p = Path(cache_path)
    return p.with_name(p.stem + ".byuser")


def by_user_key(data: MovieLensData) -> str:
    """Key of the by-user layout of ``data``: its cache file (whose name carries the preprocessing
    key), the raw file's SHA-256 and the array sizes."""
    if data.source.cache_path is None:
        raise ValueError("the data were loaded without a cache file (use_cache=False or not writable); "
                         "the by-user layout lives next to it")
    settings = {"by_user_version": BY_USER_VERSION, "preprocess_version": PREPROCESS_VERSION,
                "cache": Path(data.source.cache_path).name, "content_sha256": data.source.content_sha256,
                "n": len(data), "n_users": data.n_users, "n_items": data.n_items, "T": data.T}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def write_by_user(data: MovieLensData, folder: str | os.PathLike, key: str) -> Path:
    """Write the by-user layout of ``data`` to ``folder`` (each file atomically, the header last)."""
    from goldstone_cli.io import atomic_write_json, file_sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "header.json").unlink(missing_ok=True)  # from here on the folder is untrusted
    remove_abandoned_temporaries(folder)
    user = np.asarray(data.user)
    order = np.argsort(user, kind="stable")  # by user, file order within a user
    n = order.size
    rows = {"user": _compact(user[order]), "item": _compact(np.asarray(data.item)[order]),
            "t": _compact(np.asarray(data.t)[order]), "x": np.asarray(data.x, dtype=np.int8)[order],
            "split": np.asarray(data.split, dtype=np.int8)[order],
            "pos": order.astype(np.int32 if n < 2**31 else np.int64)}
    offsets = np.zeros(data.n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=data.n_users), out=offsets[1:])
    files = {}
    for name, a in dict(rows, offsets=offsets).items():
        with atomic_path(folder / f"{name}.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, a, allow_pickle=False)
        files[name] = {"bytes": (folder / f"{name}.npy").stat().st_size,
                       "sha256": file_sha256(folder / f"{name}.npy")}
        del a
    header = {"key": key, "version": BY_USER_VERSION, "n": int(n), "n_users": int(data.n_users),
              "n_items": int(data.n_items), "T": int(data.T), "files": files}
    atomic_write_json(folder / "header.json", header)
    return folder


def _read_by_user_header(folder: Path, key: str, verify: bool) -> dict[str, Any]:
    """The header of a by-user folder for ``key``; raises ``ValueError`` saying why it is unusable.
    ``verify``: also recompute every file's SHA-256 (rank 0 does, once, before the others map it)."""
    try:
        header = json.loads((folder / "header.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable header.json ({e})") from None
    if header.get("key") != key or header.get("version") != BY_USER_VERSION:
        raise ValueError("its key does not match the cache it should come from (stale)")
    for name in _BY_USER_FILES:
        p, want = folder / f"{name}.npy", header["files"].get(name, {})
        size = p.stat().st_size if p.is_file() else None
        if size != want.get("bytes"):
            raise ValueError(f"{name}.npy has {size} bytes, the header says {want.get('bytes')}")
        if verify and _file_sha256(p, progress=False) != want.get("sha256"):
            raise ValueError(f"{name}.npy does not match its checksum (damaged)")
    return header


def prepare_by_user(data: MovieLensData) -> tuple[Path, str]:
    """Rank 0: the by-user folder of ``data`` and its key, checked in full (sizes, SHA-256) and
    rebuilt (with a warning) when missing, stale or damaged."""
    key = by_user_key(data)
    folder = by_user_folder(data.source.cache_path)
    if folder.exists():
        try:
            _read_by_user_header(folder, key, verify=True)
            return folder, key
        except ValueError as e:
            warnings.warn(f"Ignoring the by-user ratings {folder} ({e}); rebuilding it.", stacklevel=2)
    write_by_user(data, folder, key)
    return folder, key


def read_user_rows(folder: str | os.PathLike, key: str, start: int | None = None,
                   stop: int | None = None, world: int = 1, rank: int = 0) -> UserRatings:
    """The ratings of users ``[start, stop)`` from a by-user folder, in file order: exactly
    ``data.<field>[ratings_of_users(data, start, stop)]`` of the full data, as int64 / int8.

    The files are memory-mapped and only rows ``[offsets[start], offsets[stop])`` are copied. Without
    ``start``/``stop``, the block of ``rank`` of ``world`` (``RowShard`` blocks of ``n_users``).
    Raises ``ValueError`` when the header does not match ``key`` or a file's size is off.
    """
    folder = Path(folder)
    header = _read_by_user_header(folder, key, verify=False)
    n_users = int(header["n_users"])
    if start is None or stop is None:
        b = -(-n_users // world)
        start = min(rank * b, n_users)
        stop = min(start + b, n_users)
    if not 0 <= start <= stop <= n_users:
        raise ValueError(f"user rows [{start}, {stop}) outside [0, {n_users})")
    offsets = np.load(folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
    if offsets.shape != (n_users + 1,):
        raise ValueError(f"{folder / 'offsets.npy'} has shape {offsets.shape}, expected ({n_users + 1},)")
    a0, a1 = int(offsets[start]), int(offsets[stop])
    got: dict[str, np.ndarray] = {}
    nbytes = 2 * offsets.itemsize
    for name in _BY_USER_ROWS:
        mm = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if mm.shape != (header["n"],):
            raise ValueError(f"{folder / (name + '.npy')} has shape {mm.shape}, expected ({header['n']},)")
        got[name] = np.array(mm[a0:a1])  # copies only this block's pages
        nbytes += got[name].nbytes
        del mm
    back = np.argsort(got.pop("pos"), kind="stable")  # back to file order
    out = {k: (v[back].astype(np.int64) if k in ("user", "item", "t") else v[back].astype(np.int8))
           for k, v in got.items()}
    return UserRatings(**out, n_users=n_users, n_items=int(header["n_items"]), T=int(header["T"]),
                       user_rows=(int(start), int(stop)), bytes_read=int(nbytes))


def load_user_rows_distributed(shard: Any, load: Any) -> UserRatings | MovieLensData:
    """This rank's ratings in a distributed run: rank 0 runs ``load()`` (``load_movielens``: hash,
    cache) and :func:`prepare_by_user`, then broadcasts the folder and key; every rank maps the
    folder and copies its users' rows (``shard``: a ``RowShard``). Where rank 0 has no cache file or
    a rank cannot read the folder (e.g. a node-local cache), that rank falls back to ``load()`` and
    keeps all ratings (the model keeps its users'), with a warning. An error on rank 0 is re-raised
    there and reported on the others."""
    data = None

    def on_rank0() -> dict[str, Any]:
        nonlocal data
        data = load()
        if data.source.cache_path is None:
            return {"ok": False, "why": "rank 0 has no cache file (data.use_cache=false or not writable)"}
        try:
            folder, key = prepare_by_user(data)
            return {"ok": True, "folder": str(folder.resolve()), "key": key}
        except OSError as e:
            return {"ok": False, "why": f"rank 0 could not write the by-user ratings ({e})"}

    msg = shard.from_main(on_rank0, "load the MovieLens data", _MSG_BYTES)
    if msg["ok"]:
        try:
            return read_user_rows(msg["folder"], msg["key"], world=shard.world, rank=shard.rank)
        except (OSError, ValueError) as e:
            msg = {"ok": False, "why": f"rank {shard.rank} cannot read {msg['folder']} ({e})"}
    warnings.warn(f"{msg['why']}: this rank reads all MovieLens ratings and keeps its users'.", stacklevel=2)
    return data if data is not None else load()


# ----------------------------------------------------------------------------------------------
# Download


def download_movielens(
    variant: str | MovieLensVariant = "ml-20m",
    dest: str | os.PathLike = "data",
    *,
    base_url: str | None = None,
    md5: str | None = None,
    force: bool = False,
    keep_zip: bool = False,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Fetch ``<base_url>/<variant>.zip``, verify its MD5, unpack it to ``dest/<variant>``.

    The expected MD5 is ``md5`` if given, else the publisher's ``<variant>.zip.md5`` (which must
    agree with the pinned value for the fixed releases ml-100k, ml-1m, ml-20m and ml-25m; if the
    ``.md5`` cannot be fetched the pinned value is used). ``base_url`` defaults to
    ``$GOLDSTONE_MOVIELENS_URL`` or GroupLens. Returns ``(folder, downloaded)``; ``downloaded`` is
    False when the folder was already there (use ``force`` to replace it).
    """
    from goldstone_cli.data.download import DownloadError, download_and_unpack, fetch_text, parse_checksum_file

    variant = MovieLensVariant(variant).value
    dest = Path(dest)
    target = dest / variant
    if target.is_dir() and any((target / f).is_file() for f in LAYOUT_FILES.values()) and not force:
        return target, False
    base = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    url = f"{base}/{variant}.zip"
    if urllib.parse.urlparse(base).scheme.lower() not in ("https", "file"):  # file: no network involved
        warnings.warn(
            f"the MovieLens base URL {base} is not https: the zip "
            + ("travels" if md5 is not None else "and its .md5 travel")
            + " unencrypted and unauthenticated, so anyone on the network path can "
            + ("read or replace it (your --md5 still detects a replaced file)." if md5 is not None else
               "replace both and the checksum check cannot notice; use an https mirror or pass --md5 "
               "with a checksum from a trusted source."), stacklevel=2)
    pinned = PINNED_MD5.get(variant)
    if md5 is not None:
        expected = md5.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{32}", expected):
            raise ValueError(f"--md5 must be 32 hex digits, got {md5!r}.")
    else:
        try:
            expected = parse_checksum_file(fetch_text(url + ".md5"), filename=f"{variant}.zip")
        except DownloadError as e:
            if pinned is None:
                raise DownloadError(f"{e}\nThe published checksum {url}.md5 is needed to verify the download; "
                                    "pass --md5 HEX if you know it.") from e
            warnings.warn(f"{e}; verifying against the pinned MD5 {pinned} instead.", stacklevel=2)
            expected = pinned
        if pinned is not None and expected != pinned:
            raise DownloadError(
                f"The published checksum of {variant}.zip ({expected}, from {url}.md5) differs from the MD5 "
                f"pinned in goldstone ({pinned}) for this fixed release. Not downloading; if the publisher "
                "really re-released the file, pass --md5 with the checksum you trust.")
    download_and_unpack(url, dest, md5=expected, keep_archive=keep_zip, overwrite=force, progress=progress,
                        require_any=[f"{variant}/{f}" for f in LAYOUT_FILES.values()])
    find_ratings_file(target)  # the archive must have produced dest/<variant>/<ratings file>
    return target, True
