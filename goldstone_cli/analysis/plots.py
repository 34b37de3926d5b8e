"""Pictures of a word's semantic change.

- :func:`plot_word_paths`: one panel per word: its embedding at every step (a path with step labels)
  among its nearest neighbours at the first and the last step, in the aligned space projected onto
  two dimensions. Everything is unit-normalized (cosine geometry) and projected onto the top two
  principal directions of the drawn points. Neighbours are drawn at their position in the step they
  are neighbours of; only words present in that step are candidates.
- :func:`plot_distance_curves`: 1 - cos(u_t, u_ref) against time for each word (ref: the first
  trained step, or ``--from``), with the posterior's credible band (variational runs; from
  whole-path posterior samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings
from goldstone_cli.analysis.neighbors import neighbors

F64 = torch.float64


def _save(fig, out: Path) -> Path:
    from goldstone_cli.io import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return out


def plot_word_paths(emb: Embeddings, words: Sequence[str], out: str | Path, top: int = 6, min_count: float = 1.0,
                    first: Optional[int] = None, last: Optional[int] = None) -> Path:
    from goldstone_cli.report import _plt

    plt = _plt()
    trained = np.nonzero(emb.train_mask)[0]
    t_first = int(trained[0]) if first is None else first
    t_last = int(trained[-1]) if last is None else last
    for t, opt in ((t_first, "--from"), (t_last, "--to")):
        if not emb.train_mask[t] and min_count > 0:  # held-out steps count as empty: no word is a candidate
            raise AnalysisError(f"{opt} {emb.labels[t]}: that step was held out of training, so no word has data "
                                "there and no neighbours can be drawn; choose a trained step, or pass --min-count 0 "
                                "to draw neighbours among all words (the prior's interpolation there)")
    idx = [emb.index(w) for w in words]
    n = len(words)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 5.6), squeeze=False)
    for ax, w, i in zip(axes[0], words, idx):
        nb_first, nb_last = (neighbors(emb, w, [t], top=top, min_count=min_count)[0] for t in (t_first, t_last))
        path = torch.nn.functional.normalize(emb.U[:, i], dim=-1)  # (T, d)
        keep = emb.train_mask & emb.present(slice(None), min_count)[:, i] if emb.counts is not None and min_count > 0 \
            else emb.train_mask.copy()
        P1 = torch.nn.functional.normalize(emb.U[t_first, [emb.index(x) for x in nb_first.words]], dim=-1)
        P2 = torch.nn.functional.normalize(emb.U[t_last, [emb.index(x) for x in nb_last.words]], dim=-1)
        pts = torch.cat([path, P1, P2])  # (T + k1 + k2, d)
        X = pts - pts.mean(0)
        _, _, Vh = torch.linalg.svd(X, full_matrices=False)
        Y = (X @ Vh[:2].T).numpy()  # (., 2) top two principal directions
        T = emb.T
        yp, y1, y2 = Y[:T], Y[T:T + len(nb_first.words)], Y[T + len(nb_first.words):]
        ax.plot(yp[:, 0], yp[:, 1], "-", color="0.6", lw=1, zorder=1)
        sc = ax.scatter(yp[keep, 0], yp[keep, 1], c=emb.years[keep], cmap="viridis", s=28, zorder=3,
                        label=f"'{w}' per step")
        if (~keep).any():
            ax.scatter(yp[~keep, 0], yp[~keep, 1], facecolors="none", edgecolors="0.5", s=28, zorder=2,
                       label="step without data for it")
        step = max(1, T // 8)
        for t in sorted(set(list(range(0, T, step)) + [T - 1])):
            ax.annotate(emb.labels[t], yp[t], fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter(y1[:, 0], y1[:, 1], marker="^", color="tab:blue", s=30, label=f"neighbours in {emb.labels[t_first]}")
        ax.scatter(y2[:, 0], y2[:, 1], marker="s", color="tab:red", s=30, label=f"neighbours in {emb.labels[t_last]}")
        for (x, y), name in zip(y1, nb_first.words):
            ax.annotate(name, (x, y), fontsize=8, color="tab:blue", xytext=(3, -8), textcoords="offset points")
        for (x, y), name in zip(y2, nb_last.words):
            ax.annotate(name, (x, y), fontsize=8, color="tab:red", xytext=(3, -8), textcoords="offset points")
        ax.set_title(f"'{w}': {emb.labels[t_first]} -> {emb.labels[t_last]}")
        ax.set_xlabel("principal direction 1 (unit-normalized embeddings)")
        ax.set_ylabel("principal direction 2")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.colorbar(sc, ax=ax, label="year (first year of the step)")
    fig.suptitle(emb.description, fontsize=9)
    fig.tight_layout()
    path = _save(fig, Path(out))
    plt.close(fig)
    return path


def distance_curves(emb: Embeddings, words: Sequence[str], samples: int = 200, level: float = 0.9, seed: int = 0,
                    ref: Optional[int] = None) -> dict:
    """Per word: 1 - cos(u_t, u_ref) for every step t (means), and for variational runs the posterior
    mean and the ``level`` credible band of the same quantity from whole-path samples."""
    idx = [emb.index(w) for w in words]
    trained = np.nonzero(emb.train_mask)[0]
    ref = int(trained[0]) if ref is None else ref
    U = emb.U[:, idx]  # (T, W, d)
    mean = (1.0 - torch.nn.functional.cosine_similarity(U, U[ref:ref + 1], dim=-1, eps=1e-12)).T.numpy()  # (W, T)
    out = {"ref": ref, "means": mean, "post_mean": None, "lo": None, "hi": None}
    if emb.variational:
        g = torch.Generator().manual_seed(seed)
        X = emb.sample_paths(idx, samples, g)  # (S, T, W, d)
        D = 1.0 - torch.nn.functional.cosine_similarity(X, X[:, ref:ref + 1], dim=-1, eps=1e-12)  # (S, T, W)
        q = torch.quantile(D, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64), dim=0)  # (2, T, W)
        out.update(post_mean=D.mean(0).T.numpy(), lo=q[0].T.numpy(), hi=q[1].T.numpy())
    return out


def plot_distance_curves(emb: Embeddings, words: Sequence[str], out: str | Path, curves: dict, level: float = 0.9) -> Path:
    from goldstone_cli.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    x = (emb.years + emb.year_end) / 2.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, w in enumerate(words):
        c = colors[k % len(colors)]
        ax.plot(x, curves["means"][k], "-o", ms=3, color=c, label=f"{w}")
        if curves["lo"] is not None:
            ax.fill_between(x, curves["lo"][k], curves["hi"][k], color=c, alpha=0.2, lw=0)
    held = ~emb.train_mask
    for t in np.nonzero(held)[0]:
        ax.axvspan(emb.years[t], emb.year_end[t] + 1, color="0.9", zorder=0)
    band = f"; band: {int(round(level * 100))}% posterior interval" if curves["lo"] is not None else ""
    ax.set_title(f"1 - cos(u_t, u_{emb.labels[curves['ref']]}) (posterior means{band})", fontsize=10)
    ax.set_xlabel("year" + ("  (grey: steps held out of training)" if held.any() else ""))
    ax.set_ylabel(f"cosine distance to step {emb.labels[curves['ref']]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, Path(out))
    plt.close(fig)
    return path
