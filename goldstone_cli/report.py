"""Plots of a run's metrics (``loss.png``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics_csv: str | Path, out_png: str | Path, title: str = "",
                heldout: list[tuple[str, str]] | tuple = ()) -> Path:
    """Total loss, local loss and psi (and the suboptimality when known) against steps, log scale;
    with ``heldout`` ((metric, label) pairs, e.g. DWE's held-out likelihood) that the run logged, a
    second panel draws them against steps (the minibatch loss alone is noisy)."""
    plt = _plt()
    df = pd.read_csv(metrics_csv)
    cols = [c for c in ("total", "local", "psi", "suboptimality") if c in df and df[c].notna().any()]
    evals = [(c, label) for c, label in heldout if c in df and df[c].notna().any()]
    if evals:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        _plot_heldout(ax2, df, evals)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cols:
        rows = df[df[c].notna()]  # evaluation metrics exist only every eval_every steps
        y = rows[c].where(rows[c] > 0)  # log scale: non-positive values are not drawn
        ax.plot(rows["step"], y, label=c if c != "suboptimality" else "L - L*")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _plot_heldout(ax, df: pd.DataFrame, evals: list[tuple[str, str]]) -> None:
    """Evaluation metrics against steps, one line each; per-point log-likelihoods share one axis,
    any other metric (AUC, cosines) gets a second y axis."""
    ll = [(c, lab) for c, lab in evals if "ll" in c.split("_")]
    other = [(c, lab) for c, lab in evals if (c, lab) not in ll]
    axes = [(ax, ll or other, "log-likelihood per point" if ll else "metric")]
    if ll and other:
        axes.append((ax.twinx(), other, ", ".join(lab for _, lab in other)))
    styles = iter(zip(["o-", "s--", "^-.", "d:", "v-"], ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown"]))
    handles = []
    for a, items, ylabel in axes:
        for c, label in items:
            rows = df[df[c].notna()]
            style, color = next(styles)  # the twin axis would restart the colour cycle
            handles += a.plot(rows["step"], rows[c], style, color=color, ms=3, label=label)
        a.set_ylabel(ylabel)
    ax.set_xlabel("training step")
    ax.set_title("evaluation (every trainer.eval_every steps)")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="lower right")


def load_snapshots(run_dir: str | Path) -> dict[int, dict]:
    """``{step: {tensor name: (T, N, d)}}`` from a run's ``snapshots.pt`` (read with weights_only=True,
    checksum verified; a crafted or damaged file is a one-line ValueError)."""
    from goldstone_cli import checkpoint as ckpt

    path = Path(run_dir) / ckpt.SNAPSHOTS
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no snapshots.pt: trajectories are kept for small models only "
            "(e.g. model=dense_mf); is this a run folder under outputs/?"
        )
    snaps = ckpt.load(path, kind="snapshots").get("snapshots")
    if not isinstance(snaps, dict) or not all(isinstance(v, dict) for v in snaps.values()):
        raise ValueError(f"{path} holds no snapshots")
    return snaps


def _top3(points):
    """Project (..., d) points onto their top three principal directions (PCA); pad if d < 3."""
    import torch

    flat = points.reshape(-1, points.shape[-1]).to(torch.float64)
    d = flat.shape[1]
    if d > 3:
        centered = flat - flat.mean(0)
        _, _, Vh = torch.linalg.svd(centered, full_matrices=False)
        flat = centered @ Vh[:3].T
    elif d < 3:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 3 - d)], 1)
    return flat.reshape(*points.shape[:-1], 3)


def plot_trajectories(run_dirs: list[str | Path], out_png: str | Path, steps: list[int] | None = None,
                      tensor: str = "U") -> Path:
    """Fig. 2: every embedding vector's trajectory over t (one colour per vector, t along the line),
    at a few training steps (columns), one row per run. d > 3 is projected onto the top three
    principal directions of each panel."""
    import numpy as np

    plt = _plt()
    snaps = [load_snapshots(r) for r in run_dirs]
    common = sorted(set.intersection(*(set(s) for s in snaps)))
    if steps is None:
        # the start, the end, and two log-spaced steps between (1% and 10% of the run)
        last = common[-1]
        wanted = [0, last / 100, last / 10, last]
        steps = sorted({min(common, key=lambda s: abs(s - w)) for w in wanted})
    missing = [s for s in steps if s not in common]
    if missing:
        raise ValueError(f"no snapshot at step(s) {missing}; available in every run: {common}")
    fig = plt.figure(figsize=(4 * len(steps), 4 * len(snaps) + 0.6))
    for r, (run, snap) in enumerate(zip(run_dirs, snaps)):
        label = _run_label(run)
        for c, step in enumerate(steps):
            if tensor not in snap[step]:
                raise ValueError(f"snapshot has no tensor '{tensor}'; available: {', '.join(snap[step])}")
            d = snap[step][tensor].shape[-1]
            Z = _top3(snap[step][tensor])  # (T, N, 3)
            ax = fig.add_subplot(len(snaps), len(steps), r * len(steps) + c + 1, projection="3d")
            colors = plt.cm.tab10(np.arange(Z.shape[1]) % 10)
            for i in range(Z.shape[1]):  # one line per embedding vector (a handful in Fig. 2)
                ax.plot(Z[:, i, 0], Z[:, i, 1], Z[:, i, 2], ".-", color=colors[i], ms=3, lw=0.8)
                ax.scatter(Z[0, i, 0], Z[0, i, 1], Z[0, i, 2], color=colors[i], s=18, marker="o")  # t = 1
            ax.set_title(f"{label}\ntraining step {step}", fontsize=9)
            names = [f"PC {k + 1}" if d > 3 else f"coordinate {k + 1}" if k < d else "(zero: d < 3)" for k in range(3)]
            for setter, name in zip((ax.set_xlabel, ax.set_ylabel, ax.set_zlabel), names):
                setter(name, fontsize=7, labelpad=-2)
            ax.tick_params(labelsize=6, pad=0)
    what = "principal directions of each panel" if any(s[steps[0]][tensor].shape[-1] > 3 for s in snaps) else "coordinates"
    fig.suptitle(f"Fig. 2: each line is one row of {tensor} (one embedding vector) across the time steps t = 1..T "
                 f"(big dot: t = 1); axes: embedding {what}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _run_label(run_dir: str | Path) -> str:
    import json

    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        return f"{s.get('optimizer', '?')} ({Path(run_dir).name})"
    return Path(run_dir).name
