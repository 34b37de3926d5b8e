"""The analysis commands behind cli.py: each loads, computes, writes its CSV/JSON (or files) and
returns the text to print. Errors are :class:`AnalysisError` (one line, shown by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from goldstone_cli.analysis.embeddings import (AnalysisError, Embeddings, default_out, format_table, load_embeddings,
                                               safe_stem, write_csv_json)

Echo = Callable[[str], None]


def _steps(emb: Embeddings, spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise AnalysisError("--steps is empty; give comma-separated years, step labels or #INDEX")
    return [emb.step(p) for p in parts]


def _note_held_out(emb: Embeddings, steps: Sequence[int], echo: Echo) -> None:
    for t in sorted(set(steps)):
        if not emb.train_mask[t]:
            echo(f"note: step {emb.labels[t]} was held out of training; its embeddings are the prior's interpolation "
                 "and every word counts as without data there")


def _fmt_written(paths: Sequence[Path]) -> str:
    return "wrote " + ", ".join(str(p) for p in paths)


def changes(run: Path, echo: Echo, t_from: Optional[str] = None, t_to: Optional[str] = None, top: int = 20,
            min_count: float = 1.0, by: str = "mean", samples: int = 200, level: float = 0.9, seed: int = 0,
            align: Optional[bool] = None, out: Optional[Path] = None) -> None:
    from goldstone_cli.analysis.changes import change_records, changes_table, word_changes

    if top < 1:
        raise AnalysisError(f"--top must be at least 1, got {top}")
    emb = load_embeddings(run, align=align)
    trained = np.nonzero(emb.train_mask)[0]
    t0 = emb.step(t_from) if t_from is not None else int(trained[0])
    t1 = emb.step(t_to) if t_to is not None else int(trained[-1])
    _note_held_out(emb, (t0, t1), echo)
    ch = word_changes(emb, t0, t1, min_count=min_count, samples=samples, level=level, seed=seed, by=by)
    key = {"mean": "1-cos of the means", "posterior": "posterior mean of 1-cos"}.get(by, by)
    echo(f"{emb.source} ({emb.description}): {emb.labels[t0]} -> {emb.labels[t1]}, {len(ch.ranked)} words ranked by "
         f"{key}" + (f" ({samples} posterior samples)" if ch.post_mean is not None else ""))
    echo(f"\nmost changed:\n{changes_table(emb, ch, ch.ranked[:top])}")
    echo(f"\nmost stable:\n{changes_table(emb, ch, ch.ranked[::-1][:top])}")
    if len(ch.unranked):
        eg = ", ".join(emb.vocab[i] for i in ch.unranked[:8].tolist())
        n0 = int((~emb.present(t0, min_count)).sum())
        n1 = int((~emb.present(t1, min_count)).sum())
        echo(f"\nnot ranked: {len(ch.unranked)} words with co-occurrence mass < {min_count:g} in {emb.labels[t0]} "
             f"({n0} words) or {emb.labels[t1]} ({n1} words), i.e. without data there, e.g. {eg}")
    header, rows = change_records(emb, ch)
    stem = f"changes_{safe_stem(emb.labels[t0])}_{safe_stem(emb.labels[t1])}"
    paths = write_csv_json(out or default_out(emb), stem, header, rows, {
        "source": str(emb.source), "description": emb.description, "from": emb.labels[t0], "to": emb.labels[t1],
        "min_count": min_count, "by": by, "samples": samples if ch.post_mean is not None else 0, "level": level,
        "seed": seed, "ranked": int(len(ch.ranked)), "unranked": int(len(ch.unranked))})
    echo("\n" + _fmt_written(paths))


def neighbors(words: Sequence[str], run: Path, echo: Echo, steps: Optional[str] = None, top: int = 10,
              min_count: float = 1.0, show_cos: bool = False, align: Optional[bool] = None,
              out: Optional[Path] = None) -> None:
    from goldstone_cli.analysis.neighbors import default_steps, neighbors as nb, neighbors_records, neighbors_table

    emb = load_embeddings(run, align=align)
    for w in words:
        emb.index(w)  # unknown words fail before any output
    st = _steps(emb, steps) or default_steps(emb)
    echo(f"{emb.source} ({emb.description})")
    all_rows = []
    for w in words:
        res = nb(emb, w, st, top=top, min_count=min_count)
        echo("\n" + neighbors_table(w, res, show_cos))
        header, rows = neighbors_records(w, res)
        all_rows += rows
    stem = "neighbors_" + safe_stem("_".join(words))
    paths = write_csv_json(out or default_out(emb), stem, header, all_rows, {
        "source": str(emb.source), "words": list(words), "steps": [emb.labels[t] for t in st], "min_count": min_count})
    echo("\n" + _fmt_written(paths))


def plot_word(words: Sequence[str], run: Path, echo: Echo, top: int = 6, min_count: float = 1.0, samples: int = 200,
              level: float = 0.9, seed: int = 0, align: Optional[bool] = None, out: Optional[Path] = None,
              t_from: Optional[str] = None, t_to: Optional[str] = None) -> None:
    from goldstone_cli.analysis.changes import check_sampling
    from goldstone_cli.analysis.plots import distance_curves, plot_distance_curves, plot_word_paths

    check_sampling(samples, level)  # before any work (a variational run's curves sample the posterior)
    emb = load_embeddings(run, align=align)
    for w in words:
        emb.index(w)
    first = emb.step(t_from) if t_from is not None else None
    last = emb.step(t_to) if t_to is not None else None
    if min_count <= 0:  # with --min-count > 0, plot_word_paths refuses a held-out step (no word present there)
        _note_held_out(emb, [t for t in (first, last) if t is not None], echo)
    folder = out or default_out(emb)
    stem = safe_stem("_".join(words))
    p1 = plot_word_paths(emb, words, folder / f"path_{stem}.png", top=top, min_count=min_count, first=first, last=last)
    curves = distance_curves(emb, words, samples=samples, level=level, seed=seed, ref=first)
    p2 = plot_distance_curves(emb, words, folder / f"distance_{stem}.png", curves, level=level)
    header = ["word", "step", "start", "end", "trained", "distance_to_first"]
    if curves["lo"] is not None:
        header += ["posterior_mean", "low", "high"]
    rows = []
    for k, w in enumerate(words):
        for t in range(emb.T):
            r = [w, emb.labels[t], int(emb.years[t]), int(emb.year_end[t]), bool(emb.train_mask[t]),
                 round(float(curves["means"][k, t]), 6)]
            if curves["lo"] is not None:
                r += [round(float(curves[x][k, t]), 6) for x in ("post_mean", "lo", "hi")]
            rows.append(r)
    paths = write_csv_json(folder, f"distance_{stem}", header, rows, {
        "source": str(emb.source), "words": list(words), "reference_step": emb.labels[curves["ref"]], "level": level,
        "samples": samples if curves["lo"] is not None else 0})
    echo(_fmt_written([p1, p2, *paths]))


def export(run: Path, out: Path, echo: Echo, fmt: str = "word2vec", align: Optional[bool] = None,
           force: bool = False) -> None:
    from goldstone_cli.analysis.export import export_embeddings

    emb = load_embeddings(run, align=align)
    path = export_embeddings(emb, out, fmt=fmt, force=force)
    what = "word2vec text" if fmt == "word2vec" else ".npy"
    extra = []
    if emb.counts is not None:
        extra.append("counts.npy")
    if emb.posterior_std() is not None:
        extra.append("posterior std per step")
    if emb.rotations is not None:
        extra.append("rotations.npy")
    echo(f"wrote {path}: {emb.T} steps x {emb.V} words x {emb.U.shape[-1]} dims ({what}, one file per step), "
         f"vocab.txt, steps.tsv" + "".join(", " + e for e in extra) + ", export.json")
    if emb.counts is None:
        echo(f"note: no counts.npy ({emb.counts_note})")


def align(files: Sequence[Path], out: Path, echo: Echo, skip: int = 1, anchor: str = "first",
          reflections: bool = True, force: bool = False) -> None:
    from goldstone_cli.analysis.align import align_files

    res = align_files(files, out, skip=skip, anchor=anchor, allow_reflections=reflections, force=force)
    rows = [[str(k), Path(f).name, str(res.shared[k]) if k < len(res.shared) else "-",
             "yes" if k in res.reflections else "no"] for k, f in enumerate(files)]
    echo(format_table(["period", "file", "words shared with next", "reflection (det R = -1)"], rows))
    echo(f"\npsi over neighbouring periods: {res.psi_before:.6g} -> {res.psi_after:.6g}")
    echo(f"wrote {len(res.files)} files and alignment.json to {out}")


def eval_lsc(run: Path, targets: Path, echo: Echo, truth: Optional[Path] = None, t_from: Optional[str] = None,
             t_to: Optional[str] = None, threshold: str = "mean", score: str = "mean", samples: int = 200,
             seed: int = 0, align: Optional[bool] = None, out: Optional[Path] = None) -> None:
    from goldstone_cli.analysis.lsc import evaluate, lsc_predict, read_truth, write_answers

    emb = load_embeddings(run, align=align)
    trained = np.nonzero(emb.train_mask)[0]
    t0 = emb.step(t_from) if t_from is not None else int(trained[0])
    t1 = emb.step(t_to) if t_to is not None else int(trained[-1])
    pred = lsc_predict(emb, targets, t0, t1, threshold=threshold, score=score, samples=samples, seed=seed)
    _note_held_out(emb, (t0, t1), echo)  # after lsc_predict's checks (same step), before any result
    folder = out or default_out(emb) / "lsc"
    files = write_answers(pred, folder)
    rows = [[w, f"{g:.4f}", str(b)] for w, g, b in zip(pred.targets, pred.graded, pred.binary)]
    header = ["target", "graded (1-cos)" if score == "mean" else "graded (posterior mean of 1-cos)", "binary"]
    result = {}
    if truth is not None:
        tb, tg = read_truth(truth, pred.targets)
        result = evaluate(pred, tb, tg)
        header += ["true binary", "true graded"]
        rows = [r + [str(tb[w]), f"{tg[w]:g}"] for r, w in zip(rows, pred.targets)]
    echo(f"{emb.source} ({emb.description}): {emb.labels[t0]} -> {emb.labels[t1]}, {len(pred.targets)} targets, "
         f"binary threshold {pred.threshold:.4f} ({threshold})")
    echo(format_table(header, rows))
    if result:
        echo(f"\nsubtask 1 (binary): accuracy {result['accuracy']:.3f} ({result['correct']} of {len(pred.targets)})")
        echo(f"subtask 2 (graded): Spearman's rho {result['spearman']:.3f}")
    csv_rows = [[w, g, b] for w, g, b in zip(pred.targets, pred.graded, pred.binary)]
    paths = write_csv_json(folder, "lsc", ["target", "graded", "binary"], csv_rows, {
        "source": str(emb.source), "from": emb.labels[t0], "to": emb.labels[t1], "threshold": pred.threshold,
        "threshold_rule": threshold, "score": score, **result})
    echo("\n" + _fmt_written(files + list(paths)))


def eval_changes(run: Path, planted: Path, echo: Echo, min_count: float = 1.0, align: Optional[bool] = None,
                 out: Optional[Path] = None) -> dict:
    from goldstone_cli.analysis.planted import evaluate_planted, read_truth

    truth = read_truth(planted)
    emb = load_embeddings(run, align=align)
    sc = evaluate_planted(emb, truth, min_count=min_count)
    rows = [[w, str(sc.ranks[w]), str(sc.years_true[w]), str(sc.years_found[w]),
             str(abs(sc.years_found[w] - sc.years_true[w]))] for w in truth.words]
    echo(f"{emb.source} ({emb.description})")
    echo(format_table(["planted word", "rank", "true change year", "found", "error (years)"], rows))
    echo(f"\nprecision of the top {sc.k}: {sc.precision:.3f} (top {sc.k}: {', '.join(sc.top)}); mean change-year "
         f"error {sc.year_error:.1f} years")
    result = {"precision_at_k": sc.precision, "k": sc.k, "top": sc.top, "year_error": sc.year_error,
              "ranks": sc.ranks, "years_true": sc.years_true, "years_found": sc.years_found}
    paths = write_csv_json(out or default_out(emb), "eval_changes", ["word", "rank", "true_year", "found_year", "error"],
                           [[r[0], int(r[1]) if r[1] != "None" else "", int(r[2]), int(r[3]), int(r[4])] for r in rows],
                           {"source": str(emb.source), "description": emb.description, **result})
    echo(_fmt_written(paths))
    return result
