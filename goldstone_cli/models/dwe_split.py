"""The DWE data split, one time step at a time and by word rows (issue 17).

``dwe.split_counts`` holds out whole time steps and thins the other steps' counts into held-out
and validation mass, drawing over the upper triangle of each whole symmetric (V, V) matrix. A rank
of a sharded run needs only its words' rows of the result, which it cannot draw alone. So:

- :func:`iter_split` runs ``split_counts``'s draws step by step (the same generators consumed in the
  same order: the same split), one full step in memory at a time;
- :func:`split_rows` keeps rows [start, stop) of it (every rank reads every step in full: the
  fallback);
- the **by-word folder** ``<prepared corpus>/by_word-<key>/``: rank 0 runs :func:`iter_split` once
  and stores every split matrix as uncompressed CSR arrays (``.npy``: indptr, indices, data), with
  the row sums, a header with every file's size and SHA-256, and a key over the corpus's manifest
  and the split settings. Every rank then memory-maps the files and copies only its rows
  (:func:`read_word_rows`): each reads about 1/world of the counts. The folder is written to a
  temporary name and renamed into place, so an interrupted write leaves nothing a later run trusts;
  a damaged or stale folder is rebuilt (rank 0 checks every SHA-256 before the others map it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp

from goldstone_cli.io import pid_alive
from goldstone_cli.models.dwe import WordCounts, _thin, choose_test_steps

BY_WORD_VERSION = 1
_KINDS = ("steps", "mass", "val")  # held-out whole steps, held-out mass, validation mass
_MSG_BYTES = 8192


# ============================================================================ sources
@dataclass
class StepSource:
    """A corpus as metadata plus a loader of one step's (V, V) count matrix at a time, so that a
    rank never holds more than one full step (it keeps its rows of each)."""

    vocab: list[str]
    years: np.ndarray  # (T,)
    year_end: np.ndarray  # (T,)
    times: np.ndarray  # (T,)
    labels: list[str]  # (T,)
    load: Callable[[int], sp.csr_matrix]
    #: the prepared folder it reads (None: counts in memory) and the SHA-256 of its manifest.json
    path: Optional[Path] = None
    manifest_sha256: Optional[str] = None

    @property
    def T(self) -> int:
        return len(self.years)

    @property
    def V(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_word_counts(cls, wc: WordCounts) -> "StepSource":
        return cls(list(wc.vocab), wc.years.copy(), wc.year_end.copy(), wc.times.copy(),
                   [wc.step_label(t) for t in range(wc.T)], lambda t: wc.counts[t])

    @classmethod
    def from_prepared(cls, path: str | Path, verify: bool = False) -> "StepSource":
        """A prepared corpus folder (``goldstone data prepare ...``): vocabulary and time steps now,
        the count matrices when :meth:`load` asks for them (the files are checked like ``load_cooc``)."""
        from goldstone_cli.data import cooc as C

        path = Path(path)
        manifest = C.read_manifest(path)
        if verify:
            for name, info in manifest["files"].items():
                if C.file_sha256(path / name) != info.get("sha256"):
                    raise C.CoocFormatError(f"{path}: {name} does not match its sha256 in the manifest")
        vocab = [r[1] for r in C._read_tsv(path / C.VOCAB_FILE, C.VOCAB_HEADER)]
        trows = C._read_tsv(path / C.TIMES_FILE, C.TIMES_HEADER)
        if len(trows) != manifest.get("n_steps") or len(vocab) != manifest.get("vocab_size"):
            raise C.CoocFormatError(f"{path}: {len(trows)} steps and {len(vocab)} words on disk, the manifest says "
                                    f"{manifest.get('n_steps')} and {manifest.get('vocab_size')}")
        col = list(zip(*trows))
        V = len(vocab)

        def load(t: int) -> sp.csr_matrix:
            f = path / C.step_file(t)
            try:
                m = sp.load_npz(f).tocsr()
            except Exception as exc:
                raise C.CoocFormatError(f"{f} cannot be read ({type(exc).__name__}); the file is damaged, "
                                        "prepare the corpus again") from None
            if m.shape != (V, V):
                raise C.CoocFormatError(f"{f}: shape {m.shape}, expected ({V}, {V})")
            return m

        start = np.array(col[2], dtype=np.int64)
        digest = hashlib.sha256((path / C.MANIFEST).read_bytes()).hexdigest()
        return cls(vocab, start, np.array(col[3], dtype=np.int64), np.array(col[4], dtype=np.float64),
                   list(col[1]), load, path=path, manifest_sha256=digest)


@dataclass
class HeldOut:
    """One held-out matrix of step t, as this rank sees it: its rows, and the row sums of all words."""

    t: int
    rows: sp.csr_matrix  # (V_local, V)
    c: np.ndarray  # (V,) row sums of the whole matrix


@dataclass
class RowSplit:
    """A rank's part of the split: its rows of every training matrix, the training row sums of all
    words, the held-out step indices and its rows of the held-out sets (only matrices with entries)."""

    train: list[sp.csr_matrix]  # T x (V_local, V); empty on held-out steps
    c: np.ndarray  # (T, V) float64
    test_steps: list[int]
    held: list[HeldOut]
    mass: list[HeldOut]
    val: list[HeldOut]
    bytes_read: int = 0  # bytes copied out of a by-word folder (0: split from the count files)


# ============================================================================ the split, step by step
def iter_split(src: StepSource, test_steps: float, test_mass: float, seed: int,
               val_mass: float = 0.0) -> Iterator[tuple[int, str, sp.csr_matrix]]:
    """``dwe.split_counts``'s split as ``(t, kind, matrix)`` in step order, kind ``"train"`` (every
    step; empty on held-out steps) or one of ``"steps"``, ``"mass"``, ``"val"`` (held-out sets, only
    those with entries): the same random thinning (same generators, same order), one full step in
    memory at a time."""
    T, V = src.T, src.V
    steps = set(choose_test_steps(T, test_steps))
    rng, rng_val = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    for t in range(T):
        m = sp.csr_matrix(src.load(t), dtype=np.float64)
        if m.shape != (V, V):
            raise ValueError(f"count matrix {t} ({src.labels[t]}) has shape {m.shape}, expected ({V}, {V})")
        if m.nnz and (m.data.min() < 0 or not np.all(np.isfinite(m.data))):
            raise ValueError(f"count matrix {t} ({src.labels[t]}) has negative or non-finite counts")
        if t in steps:
            yield t, "train", sp.csr_matrix((V, V))
            if m.nnz:
                yield t, "steps", m
            continue
        held = []
        if test_mass > 0:
            m, test = _thin(m, test_mass, rng, src.labels[t], "test_mass")
            if test.nnz:
                held.append(("mass", test))
        if val_mass > 0:
            m, v = _thin(m, val_mass, rng_val, src.labels[t], "val_mass")
            if v.nnz:
                held.append(("val", v))
        yield t, "train", m
        for kind, h in held:
            yield t, kind, h


def _row_sums(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.sum(axis=1), dtype=np.float64).reshape(-1)


def split_rows(src: StepSource, start: int, stop: int, test_steps: float, test_mass: float, seed: int,
               val_mass: float = 0.0) -> RowSplit:
    """Rows [start, stop) of ``dwe.split_counts``'s split, from the count files (one full step in
    memory at a time)."""
    out = RowSplit([], np.zeros((src.T, src.V)), choose_test_steps(src.T, test_steps), [], [], [])
    for t, kind, m in iter_split(src, test_steps, test_mass, seed, val_mass):
        rows = m[start:stop].tocsr()
        rows.sort_indices()
        if kind == "train":
            out.train.append(rows)
            out.c[t] = _row_sums(m)
        else:
            getattr(out, "held" if kind == "steps" else kind).append(HeldOut(t, rows, _row_sums(m)))
    return out


# ============================================================================ the by-word folder
def by_word_key(src: StepSource, test_steps: float, test_mass: float, seed: int, val_mass: float) -> str:
    """Key of the by-word split of ``src``: the corpus's manifest (which holds every file's SHA-256)
    and the split settings."""
    if src.manifest_sha256 is None:
        raise ValueError("the counts were not read from a prepared corpus folder; the by-word split lives in one")
    settings = {"version": BY_WORD_VERSION, "manifest_sha256": src.manifest_sha256, "T": src.T, "V": src.V,
                "test_steps": float(test_steps), "test_mass": float(test_mass), "seed": int(seed),
                "val_mass": float(val_mass)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def by_word_folder(src: StepSource, key: str) -> Path:
    """``<prepared corpus>/by_word-<first 16 hex digits of key>``."""
    if src.path is None:
        raise ValueError("the counts were not read from a prepared corpus folder")
    return src.path / f"by_word-{key[:16]}"


def _csr_names(kind: str, t: int) -> tuple[str, str, str]:
    stem = f"{kind}-{t:05d}"
    return f"{stem}.indptr.npy", f"{stem}.indices.npy", f"{stem}.data.npy"


def _save(folder: Path, name: str, a: np.ndarray, files: dict[str, Any]) -> None:
    from goldstone_cli.io import file_sha256

    p = folder / name
    with open(p, "wb") as f:
        np.save(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    files[name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}


def _writer_id() -> str:
    """Host and pid of this writer: temporary names on a file system shared by several nodes."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale(final: Path) -> None:
    """Remove the temporary (``.tmp-``) and replaced (``.old-``) folders that writers on this host
    which no longer run left next to ``final`` (a writer killed mid-way)."""
    host = socket.gethostname()
    pat = re.compile(re.escape(f".{final.name}.") + r"(?:tmp|old)-(.+)-(\d+)$")
    if not final.parent.is_dir():
        return
    for p in final.parent.iterdir():
        m = pat.match(p.name)
        if m and m.group(1) == host and p.is_dir() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def write_by_word(src: StepSource, key: str, test_steps: float, test_mass: float, seed: int,
                  val_mass: float = 0.0, progress: bool = False) -> Path:
    """Run the split once and store it in :func:`by_word_folder` (a temporary folder renamed into
    place; the header last). If another writer finished the same folder first, its folder is kept."""
    from tqdm.auto import tqdm

    final = by_word_folder(src, key)
    _remove_stale(final)
    tmp = final.parent / f".{final.name}.tmp-{_writer_id()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files: dict[str, Any] = {}
        c = np.zeros((src.T, src.V))
        held: dict[str, list[int]] = {k: [] for k in _KINDS}
        held_c: dict[str, list[np.ndarray]] = {k: [] for k in _KINDS}
        nnz = 0
        it = iter_split(src, test_steps, test_mass, seed, val_mass)
        for t, kind, m in tqdm(it, desc="DWE split by word", disable=not progress, unit="matrix"):
            sums = _row_sums(m)  # before sorting: the same float sums as split_rows
            m.sort_indices()
            index_dtype = np.int32 if src.V < 2**31 else np.int64
            for name, a in zip(_csr_names(kind, t), (m.indptr.astype(np.int64), m.indices.astype(index_dtype),
                                                      m.data.astype(np.float64))):
                _save(tmp, name, a, files)
            nnz += m.nnz
            if kind == "train":
                c[t] = sums
            else:
                held[kind].append(t)
                held_c[kind].append(sums)
        _save(tmp, "c.npy", c, files)
        for kind in _KINDS:
            _save(tmp, f"{kind}.c.npy", np.stack(held_c[kind]) if held_c[kind] else np.zeros((0, src.V)), files)
        header = {"key": key, "version": BY_WORD_VERSION, "T": src.T, "V": src.V, "nnz": int(nnz),
                  "test_steps": choose_test_steps(src.T, test_steps), "held": held, "files": files}
        from goldstone_cli.io import atomic_write_json

        atomic_write_json(tmp / "header.json", header)
        try:
            os.replace(tmp, final)
        except OSError:  # ``final`` exists: another writer finished first, or a damaged folder
            try:
                _check_complete(final, key, src)
            except ValueError:
                old = final.parent / f".{final.name}.old-{_writer_id()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_by_word_header(folder: Path, key: str, verify: bool) -> dict[str, Any]:
    """The header of a by-word folder for ``key``; ``ValueError`` saying why it is unusable.
    ``verify``: also recompute every file's SHA-256."""
    from goldstone_cli.io import file_sha256

    try:
        header = json.loads((folder / "header.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable header.json ({e})") from None
    if not isinstance(header, dict) or header.get("key") != key or header.get("version") != BY_WORD_VERSION:
        raise ValueError("its key does not match the corpus and split settings (stale)")
    _check_header_fields(header)
    for name, want in header["files"].items():
        p = folder / name
        if Path(name).name != name or not name.endswith(".npy"):
            raise ValueError(f"the header names a file {name!r} outside the folder")
        size = p.stat().st_size if p.is_file() else None
        if size != want.get("bytes"):
            raise ValueError(f"{name} has {size} bytes, the header says {want.get('bytes')}")
        if verify and file_sha256(p) != want.get("sha256"):
            raise ValueError(f"{name} does not match its checksum (damaged)")
    return header


def _check_header_fields(header: dict[str, Any]) -> None:
    """``ValueError`` unless the header has the fields :func:`read_word_rows` reads, of the right types
    (the key matching does not prove that a hand-edited or damaged header is complete)."""
    def ints(x) -> bool:
        return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    files, held = header.get("files"), header.get("held")
    ok = (isinstance(header.get("T"), int) and isinstance(header.get("V"), int) and ints(header.get("test_steps"))
          and isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
          and isinstance(held, dict) and set(held) == set(_KINDS) and all(ints(v) for v in held.values()))
    if not ok:
        raise ValueError("header.json lacks fields or has fields of the wrong type (damaged)")


def _check_complete(folder: Path, key: str, src: StepSource) -> None:
    """Rank 0's full check of a by-word folder for ``src``: header, sizes, every SHA-256, T and V."""
    header = read_by_word_header(folder, key, verify=True)
    if (header["T"], header["V"]) != (src.T, src.V):
        raise ValueError(f"its header says T={header['T']}, V={header['V']}, the corpus has T={src.T}, "
                         f"V={src.V} (damaged)")


def prepare_by_word(src: StepSource, test_steps: float, test_mass: float, seed: int, val_mass: float = 0.0,
                    progress: bool = False) -> tuple[Path, str]:
    """Rank 0: the by-word folder of this split and its key, checked in full (sizes, SHA-256) and
    rebuilt (with a warning) when missing, stale or damaged."""
    key = by_word_key(src, test_steps, test_mass, seed, val_mass)
    folder = by_word_folder(src, key)
    if folder.exists():
        try:
            _check_complete(folder, key, src)
            return folder, key
        except ValueError as e:
            warnings.warn(f"Ignoring the by-word split {folder} ({e}); rebuilding it.", stacklevel=2)
    return write_by_word(src, key, test_steps, test_mass, seed, val_mass, progress=progress), key


class _Reader:
    """Copies rows [start, stop) of the CSR matrices of a by-word folder out of memory-mapped files."""

    def __init__(self, folder: Path, header: dict[str, Any], start: int, stop: int):
        self.folder, self.header, self.start, self.stop = folder, header, start, stop
        self.V = int(header["V"])
        self.nbytes = 0

    def _map(self, name: str) -> np.ndarray:
        if name not in self.header["files"]:
            raise ValueError(f"{name} is missing from the header")
        return np.load(self.folder / name, mmap_mode="r", allow_pickle=False)

    def rows(self, kind: str, t: int) -> sp.csr_matrix:
        n_ptr, n_idx, n_dat = _csr_names(kind, t)
        V, a, b = self.V, self.start, self.stop
        indptr = self._map(n_ptr)
        if indptr.shape != (V + 1,):
            raise ValueError(f"{n_ptr} has shape {indptr.shape}, expected ({V + 1},)")
        ptr = np.array(indptr[a:b + 1], dtype=np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        indices, data = self._map(n_idx), self._map(n_dat)
        if indices.shape != data.shape or indices.shape[0] < hi or np.any(np.diff(ptr) < 0):
            raise ValueError(f"{kind}-{t:05d}: inconsistent CSR arrays")
        idx = np.array(indices[lo:hi], dtype=np.int32 if V < 2**31 else np.int64)
        dat = np.array(data[lo:hi], dtype=np.float64)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ValueError(f"{n_idx}: column index outside [0, {V})")
        self.nbytes += ptr.nbytes + idx.nbytes + dat.nbytes
        return sp.csr_matrix((dat, idx, ptr - lo), shape=(b - a, V))

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = self._map(name)
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
        out = np.array(a, dtype=np.float64)
        self.nbytes += out.nbytes
        return out


def read_word_rows(folder: str | os.PathLike, key: str, start: int, stop: int) -> RowSplit:
    """Rows [start, stop) of the split stored in a by-word folder: exactly what
    :func:`split_rows` returns from the count files, reading only these rows' bytes (plus the
    (T, V) row sums and each matrix's row offsets of the block)."""
    folder = Path(folder)
    header = read_by_word_header(folder, key, verify=False)
    T, V = int(header["T"]), int(header["V"])
    if not 0 <= start <= stop <= V:
        raise ValueError(f"word rows [{start}, {stop}) outside [0, {V})")
    r = _Reader(folder, header, start, stop)
    out = RowSplit([r.rows("train", t) for t in range(T)], r.array("c.npy", (T, V)),
                   [int(t) for t in header["test_steps"]], [], [], [])
    for kind in _KINDS:
        ts = [int(t) for t in header["held"][kind]]
        cs = r.array(f"{kind}.c.npy", (len(ts), V))
        getattr(out, "held" if kind == "steps" else kind).extend(
            HeldOut(t, r.rows(kind, t), cs[i]) for i, t in enumerate(ts))
    out.bytes_read = r.nbytes
    return out


def load_rows_distributed(src: StepSource, shard: Any, start: int, stop: int, test_steps: float,
                          test_mass: float, seed: int, val_mass: float = 0.0, progress: bool = False) -> RowSplit:
    """This rank's rows of the split in a sharded run: rank 0 prepares the by-word folder
    (:func:`prepare_by_word`) and broadcasts where it is; every rank copies its rows from it. Where
    the counts are not a prepared folder, rank 0 cannot write next to them (e.g. a read-only shared
    corpus) or a rank cannot read the folder, that rank splits from the count files itself (each
    reads every step in full), with a warning. An error on rank 0 is re-raised there and reported
    on the others."""
    args = (test_steps, test_mass, seed, val_mass)

    def on_rank0() -> dict[str, Any]:
        if src.path is None:
            return {"ok": False, "quiet": True}
        try:
            folder, key = prepare_by_word(src, *args, progress=progress)
            return {"ok": True, "folder": str(folder.resolve()), "key": key}
        except OSError as e:
            return {"ok": False, "why": f"rank 0 could not write the by-word split ({e})"}

    msg = shard.from_main(on_rank0, "split the corpus by word", _MSG_BYTES)
    if msg["ok"]:
        try:
            return read_word_rows(msg["folder"], msg["key"], start, stop)
        except (OSError, ValueError) as e:
            msg = {"ok": False, "why": f"rank {shard.rank} cannot read {msg['folder']} ({e})"}
    if not msg.get("quiet"):
        warnings.warn(f"{msg['why']}: this rank reads every step's counts in full and keeps its rows.", stacklevel=2)
    return split_rows(src, start, stop, *args)
