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
        y = df[c].where(df[c] > 0)  # log scale: non-positive values are not drawn
        ax.plot(df["step"], y, label=c if c != "suboptimality" else "L - L*")
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
