"""Aligning time-sliced embeddings trained elsewhere: the exact gauge step over O(d).

Each period t has its own embedding table ``Z_t`` (N_t, d), trained separately, so its axes are an
arbitrary orthogonal transform of the others'. We look for rotations or reflections ``R_t`` that make
neighbouring periods agree on the words they share:

    min_{R_t in O(d)}  1/2 sum_{edges (s, t)} w_st sum_{i shared by s and t} ||R_s z_s,i - R_t z_t,i||^2,

which is the symmetry-breaking coupling psi of the paper (Eq. 3) for this graph over periods. It is
solved by the optimizer's own exact solver (optim/gauge.py ``procrustes_solve``): on a chain (edges
t - t+1, the default) one Kabsch/Procrustes problem per edge from the pair moments
``M_st = Z_s[shared]^T Z_t[shared]`` (Eq. 15), composed along the chain; with ``skip`` > 1 the graph
also links t to t+2 .. t+skip (cycles), and the solver finishes with block-coordinate sweeps, so a
period's rotation is pinned by several neighbours instead of only the previous one.

HistWords' method is *sequential pairwise* Procrustes: rotate period t onto the already rotated
period t-1, one after the other (:func:`sequential_procrustes`). On a chain over O(d) it gives the
same relative rotations as the chain solver (it is the same set of per-edge problems). They differ
when (i) the pairwise step is restricted to rotations (SO(d)): a period that is a mirror image of its
neighbour then stays mirrored (a "reflection domain wall"), and (ii) when noise in each pairwise fit
accumulates along the chain (a random walk of rotation errors): the joint solver with ``skip`` > 1
spreads that error over several overlaps. tests/test_analysis_align.py shows both.

File formats (``read_period`` / ``write_period``):
- word2vec text (``.txt``/``.vec``/``.w2v``): first line ``N d``, then ``word x_1 ... x_d`` per line;
- word2vec binary (``.bin``): the same header line, then per word its UTF-8 bytes, a space and d
  little-endian float32 values (an optional newline after each vector is accepted and written);
- HistWords layout: ``NAME.npy`` (N, d) with a plain-text vocabulary, one word per line, in
  ``NAME.vocab.txt``, ``NAME-vocab.txt`` or, for ``PREFIX-w.npy``, ``PREFIX-vocab.txt``. HistWords
  itself ships the vocabulary as a pickle (``PREFIX-vocab.pkl``): pickles are never read here
  (loading one can run arbitrary code); convert it to text once in an environment you trust.
  Rows that are all zero (HistWords' way of marking a word absent from a period) count as absent:
  they take no part in the alignment and stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from goldstone_cli.analysis.embeddings import AnalysisError
from goldstone_cli.io import read_lines, split_lines

F64 = torch.float64
TEXT_SUFFIXES = (".txt", ".vec", ".w2v")
BIN_SUFFIXES = (".bin",)


# ============================================================================ the solver
def _pairs(vocabs: Sequence[Sequence[str]], present: Sequence[np.ndarray], src: np.ndarray,
           dst: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row indices of the words shared by the two periods of every edge (present in both)."""
    out = []
    arrays = [np.asarray(list(v), dtype=object).astype(str) for v in vocabs]
    for s, t in zip(src.tolist(), dst.tolist()):
        _, a, b = np.intersect1d(arrays[s], arrays[t], assume_unique=True, return_indices=True)
        keep = present[s][a] & present[t][b]
        order = np.argsort(a[keep], kind="stable")  # in the order of the earlier period
        out.append((a[keep][order].astype(np.int64), b[keep][order].astype(np.int64)))
    return out


def chain_rotations(Zs: Sequence[Tensor], vocabs: Optional[Sequence[Sequence[str]]] = None, skip: int = 1,
                    allow_reflections: bool = True, anchor: str = "least",
                    present: Optional[Sequence[np.ndarray]] = None) -> Tensor:
    """Rotations R (T, d, d), applied as ``Z_t <- Z_t @ R_t^T``, minimizing psi over the graph that
    links every period to the next ``skip`` periods (weight 1). ``vocabs``: the words of each table
    (None: every table has the same rows in the same order). ``anchor``: 'least' (the global rotation
    that moves the tables least, as the optimizer does) or 'first' (the first period keeps its axes)."""
    from goldstone_cli.optim.coupling import Coupling
    from goldstone_cli.optim.gauge import procrustes_plan, procrustes_solve

    T = len(Zs)
    if T == 0:
        raise AnalysisError("nothing to align: no periods given")
    d = Zs[0].shape[-1]
    if any(z.shape[-1] != d for z in Zs):
        raise AnalysisError(f"all periods need the same dimension; got {sorted({int(z.shape[-1]) for z in Zs})}")
    if skip < 1:
        raise AnalysisError(f"--skip must be at least 1, got {skip}")
    src = np.array([t for t in range(T) for k in range(1, skip + 1) if t + k < T], dtype=np.int64)
    dst = np.array([t + k for t in range(T) for k in range(1, skip + 1) if t + k < T], dtype=np.int64)
    if present is None:
        present = [np.ones(z.shape[0], dtype=bool) for z in Zs]
    if vocabs is None:
        if len({z.shape[0] for z in Zs}) != 1:
            raise AnalysisError("tables with different numbers of rows need their vocabularies")
        pairs = [(np.nonzero(present[s] & present[t])[0],) * 2 for s, t in zip(src.tolist(), dst.tolist())]
    else:
        pairs = _pairs(vocabs, present, src, dst)
    for (a, _), s, t in zip(pairs, src.tolist(), dst.tolist()):
        if t == s + 1 and len(a) < d:
            raise AnalysisError(f"periods {s} and {t} share only {len(a)} words (< d = {d}): the rotation between "
                                "them is not determined")
    # tables stay in their dtype (float32 files); each product is formed in float64 (sums over many words)
    rows = lambda z, idx: z[torch.as_tensor(idx)].to(F64)  # noqa: E731
    M = torch.stack([rows(Zs[s], a).T @ rows(Zs[t], b)
                     for (a, b), s, t in zip(pairs, src.tolist(), dst.tolist())]) if len(src) \
        else torch.zeros(0, d, d, dtype=F64)  # (E, d, d) = Z_s^T Z_t over shared words (Eq. 15)
    M_self = torch.stack([rows(z, p).T @ rows(z, p) for z, p in zip(Zs, present)])  # (T, d, d)
    plan = procrustes_plan(Coupling(T, src, dst, np.ones(len(src))))
    R, _ = procrustes_solve(M, M_self, plan, allow_reflections=allow_reflections)
    if anchor == "first":
        R = R[0].T @ R  # R_0 = I; relative rotations unchanged
    elif anchor != "least":
        raise AnalysisError(f"--anchor must be 'first' or 'least', got {anchor!r}")
    return R


def sequential_procrustes(Zs: Sequence[Tensor], vocabs: Optional[Sequence[Sequence[str]]] = None,
                          allow_reflections: bool = True, present: Optional[Sequence[np.ndarray]] = None) -> Tensor:
    """HistWords' alignment (the reference): period t is rotated onto the already rotated period
    t-1 over their shared words, one after the other. Returns R (T, d, d) with R_0 = I."""
    from goldstone_cli.optim.gauge import polar_factor

    T, d = len(Zs), Zs[0].shape[-1]
    Zs = [z.to(F64) for z in Zs]
    if present is None:
        present = [np.ones(z.shape[0], dtype=bool) for z in Zs]
    src, dst = np.arange(T - 1), np.arange(1, T)
    pairs = (_pairs(vocabs, present, src, dst) if vocabs is not None
             else [(np.nonzero(present[s] & present[s + 1])[0],) * 2 for s in range(T - 1)])
    R = [torch.eye(d, dtype=F64)]
    for t in range(1, T):  # sequential by definition: each step needs the previous result
        a, b = (torch.as_tensor(x) for x in pairs[t - 1])
        prev = Zs[t - 1][a] @ R[-1].T  # aligned period t-1 on the shared words
        # argmax_R Tr(R Z_t^T prev) = polar(prev^T Z_t): Z_t R^T ~ prev
        R.append(polar_factor((prev.T @ Zs[t][b])[None], allow_reflections)[0])
    return torch.stack(R)


def misalignment(Zs: Sequence[Tensor], R: Tensor, pairs: Sequence[tuple[int, int]]) -> float:
    """sum over the given period pairs of ||Z_s R_s^T - Z_t R_t^T||_F^2 (tables with the same rows)."""
    return float(sum(((Zs[s].to(F64) @ R[s].T - Zs[t].to(F64) @ R[t].T) ** 2).sum() for s, t in pairs))


# ============================================================================ files
@dataclass
class Period:
    path: Path
    fmt: str  # 'text' | 'binary' | 'npy'
    vocab: list[str]
    vectors: np.ndarray  # (N, d) float32
    vocab_path: Optional[Path] = None

    @property
    def present(self) -> np.ndarray:
        """(N,) bool: rows that are not all zero."""
        return np.any(self.vectors != 0, axis=1)


def _npy_vocab(path: Path) -> Path:
    stem = path.name[:-len(".npy")]
    cands = [path.with_name(stem + ".vocab.txt"), path.with_name(stem + "-vocab.txt")]
    if stem.endswith("-w"):
        cands.append(path.with_name(stem[:-2] + "-vocab.txt"))
    for c in cands:
        if c.is_file():
            return c
    pkl = [c.with_suffix(".pkl") for c in cands if c.with_suffix(".pkl").is_file()]
    if pkl:
        raise AnalysisError(f"{path}: its vocabulary is the pickle {pkl[0].name}, which is never read (unpickling "
                            f"can run code); write it as text, one word per line, to {cands[-1].name}")
    raise AnalysisError(f"{path}: no vocabulary file next to it; expected one word per line in "
                        f"{' or '.join(c.name for c in cands)}")


def read_word2vec(path: Path, binary: Optional[bool] = None) -> tuple[list[str], np.ndarray]:
    """(words, vectors (N, d) float32) from a word2vec text or binary file."""
    path = Path(path)
    if binary is None:
        binary = path.suffix in BIN_SUFFIXES
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", "strict").split()
        if len(header) != 2 or not all(h.isdigit() for h in header):
            raise AnalysisError(f"{path}, line 1: expected the word2vec header 'N d', got {' '.join(header)[:60]!r}")
        n, d = int(header[0]), int(header[1])
        words: list[str] = []
        if binary:
            vecs = np.empty((n, d), dtype=np.float32)
            for i in range(n):  # word by word: a word is bytes up to a space
                buf = bytearray()
                while True:
                    c = f.read(1)
                    if not c:
                        raise AnalysisError(f"{path}: ends after {i} of {n} words (truncated file?)")
                    if c == b" ":
                        break
                    if c != b"\n" or buf:
                        buf += c
                raw = f.read(4 * d)
                if len(raw) != 4 * d:
                    raise AnalysisError(f"{path}: ends inside the vector of word {i + 1} (truncated file?)")
                vecs[i] = np.frombuffer(raw, dtype="<f4")
                words.append(buf.decode("utf-8"))
        else:
            # lines end at "\n" only (a word may hold U+2028, \x85, \x0c ...); Windows line ends accepted
            rows = [ln for ln in split_lines(f.read().decode("utf-8")) if ln.strip()]
            if len(rows) != n:
                raise AnalysisError(f"{path}: the header says {n} words, the file has {len(rows)} lines after it")
            vecs = np.empty((n, d), dtype=np.float32)
            for i, ln in enumerate(rows):
                parts = ln.rstrip().split(" ")
                if len(parts) != d + 1:
                    raise AnalysisError(f"{path}, line {i + 2}: expected a word and {d} numbers, got {len(parts) - 1} "
                                        "numbers")
                words.append(parts[0])
                try:
                    vecs[i] = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    raise AnalysisError(f"{path}, line {i + 2}: not a number in the vector of {parts[0]!r}") from None
    _check_unique(words, path)
    return words, vecs


def _check_unique(words: Sequence[str], path: Path) -> None:
    """AnalysisError naming the first word that ``path`` lists twice (a table needs one row per word)."""
    seen: set[str] = set()
    for w in words:
        if w in seen:
            raise AnalysisError(f"{path}: the word {w!r} appears twice; each word needs exactly one row (remove the "
                                "duplicate)")
        seen.add(w)


def write_word2vec(path: Path, words: Sequence[str], vectors: np.ndarray, binary: bool = False) -> None:
    """word2vec text or binary (gensim ``KeyedVectors.load_word2vec_format`` reads both), atomically."""
    from goldstone_cli.io import atomic_path

    vectors = np.asarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise AnalysisError(f"word {w!r} is empty or contains white space: word2vec files cannot hold it")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(f"{n} {d}\n".encode())
        if binary:
            for w, v in zip(words, vectors.astype("<f4")):
                f.write(w.encode("utf-8") + b" " + v.tobytes() + b"\n")
        else:
            import io

            body = io.StringIO()
            np.savetxt(body, vectors, fmt="%.9g", delimiter=" ")  # 9 significant digits: float32 round-trips exactly
            rows = body.getvalue().splitlines()
            f.write("".join(w + " " + r + "\n" for w, r in zip(words, rows)).encode("utf-8"))


def read_period(path: str | Path) -> Period:
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist (or is not a file)")
    if path.suffix == ".npy":
        vp = _npy_vocab(path)
        try:
            vecs = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise AnalysisError(f"{path}: not a plain numeric .npy array ({exc})") from None
        if vecs.ndim != 2:
            raise AnalysisError(f"{path}: expected a 2-D array (words x dimensions), got shape {vecs.shape}")
        words = [w for w in (ln.strip(" \t\r") for ln in read_lines(vp)) if w]  # "\n" only, as in read_word2vec
        if len(words) != vecs.shape[0]:
            raise AnalysisError(f"{vp}: {len(words)} words for {vecs.shape[0]} rows of {path.name}")
        _check_unique(words, vp)
        return Period(path, "npy", words, vecs.astype(np.float32), vp)
    if path.suffix in TEXT_SUFFIXES + BIN_SUFFIXES:
        words, vecs = read_word2vec(path)
        return Period(path, "binary" if path.suffix in BIN_SUFFIXES else "text", words, vecs)
    raise AnalysisError(f"{path}: unknown format {path.suffix!r}; give word2vec files (.txt, .vec, .w2v, .bin) or "
                        "HistWords-style .npy with a text vocabulary")


def write_period(p: Period, out_dir: Path, vectors: np.ndarray) -> list[Path]:
    from goldstone_cli.io import atomic_path, atomic_write_text

    target = out_dir / p.path.name
    if p.fmt == "npy":
        with atomic_path(target, suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vectors.astype(p.vectors.dtype))
        vtarget = out_dir / p.vocab_path.name
        atomic_write_text(vtarget, "\n".join(p.vocab) + "\n")
        return [target, vtarget]
    write_word2vec(target, p.vocab, vectors, binary=p.fmt == "binary")
    return [target]


@dataclass
class AlignResult:
    files: list[Path]
    rotations: np.ndarray  # (T, d, d)
    shared: list[int]  # words shared by each neighbouring pair
    psi_before: float
    psi_after: float
    reflections: list[int]  # periods whose R_t has det -1


def align_files(paths: Sequence[str | Path], out_dir: str | Path, skip: int = 1, anchor: str = "first",
                allow_reflections: bool = True, force: bool = False) -> AlignResult:
    """Read one embedding file per period (in time order), align them, write them to ``out_dir``
    under the same names and formats, plus ``alignment.json`` (rotations, shared words, psi)."""
    from goldstone_cli.io import atomic_write_json

    if len(paths) < 2:
        raise AnalysisError("give at least two periods (one file each, in time order)")
    out_dir = Path(out_dir)
    periods = [read_period(p) for p in paths]
    names = [p.path.name for p in periods]
    if len(set(names)) != len(names):
        raise AnalysisError("two input files have the same name; the aligned copies would overwrite each other")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AnalysisError(f"{out_dir} is not empty; choose another --out or pass --force")
    for p in periods:
        if (out_dir / p.path.name).resolve() == p.path.resolve():
            raise AnalysisError(f"--out {out_dir} would overwrite the input {p.path}; choose another folder")
    Zs = [torch.as_tensor(p.vectors) for p in periods]  # float32 as read; products in float64
    present = [p.present for p in periods]
    vocabs = [p.vocab for p in periods]
    R = chain_rotations(Zs, vocabs, skip=skip, allow_reflections=allow_reflections, anchor=anchor, present=present)
    T = len(periods)
    src, dst = np.arange(T - 1), np.arange(1, T)
    pairs = _pairs(vocabs, present, src, dst)

    def psi(Rs: Tensor) -> float:
        return float(sum(0.5 * ((Zs[s][torch.as_tensor(a)].to(F64) @ Rs[s].T
                                 - Zs[s + 1][torch.as_tensor(b)].to(F64) @ Rs[s + 1].T) ** 2).sum()
                         for s, (a, b) in enumerate(pairs)))

    eye = torch.eye(R.shape[-1], dtype=F64).expand_as(R)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for p, z, r in zip(periods, Zs, R):
        files += write_period(p, out_dir, (z.to(F64) @ r.T).numpy())
    dets = torch.linalg.det(R)
    res = AlignResult(files=files, rotations=R.numpy(), shared=[len(a) for a, _ in pairs], psi_before=psi(eye),
                      psi_after=psi(R), reflections=[t for t in range(T) if float(dets[t]) < 0])
    atomic_write_json(out_dir / "alignment.json", {
        "inputs": [str(p.path) for p in periods], "files": [str(f.name) for f in files], "skip": skip,
        "anchor": anchor, "allow_reflections": allow_reflections, "shared_words": res.shared,
        "psi_before": res.psi_before, "psi_after": res.psi_after, "reflections": res.reflections,
        "rotations": res.rotations.tolist(),
        "method": "exact chain Procrustes over O(d) (goldstone_cli.optim.gauge.procrustes_solve)"})
    return res
