"""Exporting a run's embeddings: one file per step, plus vocabulary, step labels and uncertainty.

Layout of ``--out DIR``:

- ``step_<k>_<label>.txt`` (``--format word2vec``: the word2vec text format, first line ``V d``,
  then ``word x_1 .. x_d``; gensim's ``KeyedVectors.load_word2vec_format(path)`` reads it) or
  ``step_<k>_<label>.npy`` (``--format npy``: float32 (V, d), rows in vocabulary order);
- ``vocab.txt``: one word per line, the row order of every step;
- ``steps.tsv``: ``step  label  start  end  trained  file`` (``trained`` 0 for steps held out of
  training: their embeddings are the prior's interpolation);
- ``counts.npy`` (T, V) float64: co-occurrence mass of every word in every step (0: no data), when the
  run's corpus is readable;
- variational runs: ``std_<k>_<label>.npy`` (V, d) float32, the posterior standard deviation of every
  coordinate (marginal, in the model's coordinates; the posterior is independent over words and
  dimensions, correlated along time only);
- runs aligned after training (no chain prior): ``rotations.npy`` (T, d, d), the rotation applied to
  the means (``U_t = mu_t R_t^T``); it acts on the posterior noise the same way;
- ``export.json``: what was exported from where, written last (a folder without it is incomplete).

The embeddings are the word vectors ``u`` (the context vectors ``v`` are a second, usually
ignored table, as in word2vec).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings, safe_stem
from goldstone_cli.io import read_lines

FORMATS = ("word2vec", "npy")


def step_stem(k: int, label: str) -> str:
    return f"step_{k:03d}_{safe_stem(label)}"


def export_embeddings(emb: Embeddings, out: str | Path, fmt: str = "word2vec", force: bool = False) -> Path:
    from goldstone_cli.analysis.align import write_word2vec
    from goldstone_cli.io import atomic_path, atomic_write_json, atomic_write_text

    if fmt not in FORMATS:
        raise AnalysisError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise AnalysisError(f"{out} is not empty; choose another --out or pass --force to replace its files")
    if out.resolve() == emb.source.resolve():
        raise AnalysisError("--out must not be the run folder itself")
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").unlink(missing_ok=True)  # the folder is incomplete until this is rewritten

    def save_npy(path: Path, arr: np.ndarray) -> None:
        with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)

    files = []
    U = emb.U.to(torch.float32).numpy()  # (T, V, d)
    for k, label in enumerate(emb.labels):
        stem = step_stem(k, label)
        if fmt == "word2vec":
            name = stem + ".txt"
            write_word2vec(out / name, emb.vocab, U[k])
        else:
            name = stem + ".npy"
            save_npy(out / name, U[k])
        files.append(name)
    atomic_write_text(out / "vocab.txt", "\n".join(emb.vocab) + "\n")
    lines = ["step\tlabel\tstart\tend\ttrained\tfile"] + [
        f"{k}\t{emb.labels[k]}\t{int(emb.years[k])}\t{int(emb.year_end[k])}\t{int(emb.train_mask[k])}\t{files[k]}"
        for k in range(emb.T)]
    atomic_write_text(out / "steps.tsv", "\n".join(lines) + "\n")
    extra = []
    if emb.counts is not None:
        save_npy(out / "counts.npy", emb.counts.astype(np.float64))
        extra.append("counts.npy")
    std = emb.posterior_std()
    std_files = []
    if std is not None:
        S = std.to(torch.float32).numpy()
        for k, label in enumerate(emb.labels):
            name = f"std_{k:03d}_{safe_stem(label)}.npy"
            save_npy(out / name, S[k])
            std_files.append(name)
    if emb.rotations is not None:
        save_npy(out / "rotations.npy", emb.rotations.numpy())
        extra.append("rotations.npy")
    atomic_write_json(out / "export.json", {
        "source": str(emb.source), "description": emb.description, "format": fmt, "T": emb.T, "V": emb.V,
        "d": int(emb.U.shape[-1]), "files": files, "std_files": std_files, "extra": extra,
        "counts_note": emb.counts_note, "vectors": "word embeddings u (posterior means or MAP estimates)"})
    return out


REQUIRED_KEYS = ("format", "T", "V", "d")
_REEXPORT = "export the run again with `goldstone export RUN --out DIR --force`"


def load_export(path: str | Path) -> Embeddings:
    """Read a folder written by :func:`export_embeddings` back for analysis. Every file is checked
    against export.json (shapes, one row per step, the columns of steps.tsv): a damaged or partial
    export is an AnalysisError naming the file."""
    import json

    from goldstone_cli.analysis.align import read_word2vec

    path = Path(path)

    def bad(where: str, what: str) -> AnalysisError:
        return AnalysisError(f"{where}: {what} (a damaged or partial export?); {_REEXPORT}")

    def inside(name: str) -> Path:
        p = (path / str(name)).resolve()
        if p.parent != path.resolve():
            raise AnalysisError(f"{path}/export.json names a file outside its folder: {name!r}")
        if not p.is_file():
            raise bad(str(path / str(name)), "missing")
        return path / str(name)

    def load_npy(name: str, shape: tuple[int, ...]) -> np.ndarray:
        f = inside(name)
        try:
            arr = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise bad(str(f), f"not a plain .npy array ({exc})") from None
        if arr.shape != shape:
            raise bad(str(f), f"shape {arr.shape}, expected {shape}")
        return arr

    try:
        meta = json.loads(inside("export.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise bad(str(path / "export.json"), f"not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise bad(str(path / "export.json"), f"no {', '.join(repr(k) for k in missing)}")
    T, V, d = meta["T"], meta["V"], meta["d"]
    if not all(isinstance(x, int) and x > 0 for x in (T, V, d)):
        raise bad(str(path / "export.json"), f"T, V and d must be positive integers, got {T!r}, {V!r}, {d!r}")
    if meta["format"] not in FORMATS:
        raise bad(str(path / "export.json"), f"unknown format {meta['format']!r} (expected {' or '.join(FORMATS)})")
    vocab = [ln for ln in read_lines(inside("vocab.txt")) if ln]  # "\n" only: a word may hold U+2028, "\r" ...
    steps_tsv = inside("steps.tsv")
    rows, years = [], []  # steps.tsv: step label start end trained file
    for k, ln in enumerate(read_lines(steps_tsv)[1:], start=2):
        if not ln:
            continue
        r = ln.split("\t")
        if len(r) != 6:
            raise bad(f"{steps_tsv}, line {k}", f"{len(r)} tab-separated columns, expected 6 "
                                                "(step label start end trained file)")
        try:
            years.append((int(r[2]), int(r[3])))
        except ValueError:
            raise bad(f"{steps_tsv}, line {k}", f"start and end must be years, got {r[2]!r} and {r[3]!r}") from None
        if r[4] not in ("0", "1"):
            raise bad(f"{steps_tsv}, line {k}", f"trained must be 0 or 1, got {r[4]!r}")
        rows.append(r)
    if len(rows) != T or len(vocab) != V:
        raise AnalysisError(f"{path}: steps.tsv has {len(rows)} steps and vocab.txt {len(vocab)} words, export.json "
                            f"says {T} and {V} (a partial export?); {_REEXPORT}")

    mats = []
    for r in rows:
        if meta["format"] == "npy":
            mats.append(load_npy(r[5], (V, d)))
        else:
            f = inside(r[5])
            words, vecs = read_word2vec(f)
            if words != vocab:
                raise bad(str(f), "its words differ from vocab.txt")
            if vecs.shape != (V, d):
                raise bad(str(f), f"{vecs.shape[1]}-dimensional vectors, expected {d}")
            mats.append(vecs)
    U = torch.as_tensor(np.stack(mats), dtype=torch.float64)  # (T, V, d)
    extra = meta.get("extra", [])
    counts = load_npy("counts.npy", (T, V)) if "counts.npy" in extra else None
    std = None
    std_files = meta.get("std_files") or []
    if std_files:
        if len(std_files) != T:
            raise bad(str(path / "export.json"), f"{len(std_files)} std_files for {T} steps")
        std = torch.as_tensor(np.stack([load_npy(n, (V, d)) for n in std_files]), dtype=torch.float64)  # (T, V, d)
    rot = (torch.as_tensor(load_npy("rotations.npy", (T, d, d)), dtype=torch.float64)
           if "rotations.npy" in extra else None)
    return Embeddings(source=path, vocab=vocab, labels=[r[1] for r in rows],
                      years=np.array([a for a, _ in years]), year_end=np.array([b for _, b in years]),
                      train_mask=np.array([r[4] == "1" for r in rows]), U=U, counts=counts,
                      counts_note="the export has no counts.npy" if counts is None else "", std=std, rotations=rot,
                      description=f"exported: {meta.get('description', '')}")
