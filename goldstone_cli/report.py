"""Plots of a run's metrics (``loss.png``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Total loss, local loss and psi (and the suboptimality when known) against steps, log scale."""
    plt = _plt()
    df = pd.read_csv(metrics_csv)
    cols = [c for c in ("total", "local", "psi", "suboptimality") if c in df and df[c].notna().any()]
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


def load_snapshots(run_dir: str | Path) -> dict[int, dict]:
    """``{step: {tensor name: (T, N, d)}}`` from a run's ``snapshots.pt`` (read with weights_only=True,
    checksum verified; a crafted or damaged file is a one-line ValueError)."""
    from goldstone_cli import checkpoint as ckpt

    path = Path(run_dir) / ckpt.SNAPSHOTS
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
    fig = plt.figure(figsize=(4 * len(steps), 4 * len(snaps)))
    for r, (run, snap) in enumerate(zip(run_dirs, snaps)):
        label = _run_label(run)
        for c, step in enumerate(steps):
            if tensor not in snap[step]:
                raise ValueError(f"snapshot has no tensor '{tensor}'; available: {', '.join(snap[step])}")
            Z = _top3(snap[step][tensor])  # (T, N, 3)
            ax = fig.add_subplot(len(snaps), len(steps), r * len(steps) + c + 1, projection="3d")
            colors = plt.cm.tab10(np.arange(Z.shape[1]) % 10)
            for i in range(Z.shape[1]):  # one line per embedding vector (a handful in Fig. 2)
                ax.plot(Z[:, i, 0], Z[:, i, 1], Z[:, i, 2], ".-", color=colors[i], ms=3, lw=0.8)
            ax.set_title(f"{label}\nstep {step}", fontsize=9)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
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
