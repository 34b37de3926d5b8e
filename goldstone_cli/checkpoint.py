"""Checkpoints: one file with everything a run needs to continue exactly where it stopped.

Written atomically (temporary file + rename): a crash or Ctrl-C while saving leaves the previous
checkpoint intact and never a half-written one under the final name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from goldstone_cli.io import atomic_path

LAST = "last.pt"
BEST = "best.pt"


def save(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a file that is not a checkpoint (or from an incompatible version)
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
