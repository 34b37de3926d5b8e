"""Checkpoints: one file with everything a run needs to continue exactly where it stopped.

- Only tensors and plain containers are stored (dict, list, tuple, str, int, float, bool, None):
  :func:`save` refuses anything else, and every file is read with ``torch.load(weights_only=True)``,
  so a crafted ``last.pt`` or ``snapshots.pt`` cannot run code; it gets a one-line error instead.
- Every file carries a SHA-256 checksum of its contents (every tensor's bytes, dtype and shape, and
  every other value), verified on load: torch does not check the zip CRC, so a flipped bit would
  otherwise be trusted.
- Written atomically (temporary file + rename): a crash or Ctrl-C while saving leaves the previous
  checkpoint intact and never a half-written one under the final name. :func:`save_last` also keeps
  the previous ``last.pt`` as ``prev.pt``, so a corrupt ``last.pt`` leaves one to resume from
  (:func:`load_latest`).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from goldstone_cli.io import atomic_path

LAST = "last.pt"
PREV = "prev.pt"
BEST = "best.pt"
SNAPSHOTS = "snapshots.pt"
FORMAT = "goldstone-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or does not fit (one line: what, which file, what to do)."""


# ----------------------------------------------------------------------------- checksum
_SCALARS = (bool, int, float, str, bytes, type(None))
_MAPPINGS = (dict, collections.OrderedDict)


def _feed(h, obj: Any, where: str) -> None:
    """Hash ``obj`` into ``h``; raise TypeError for anything that is not a tensor or plain value."""
    t = type(obj)
    if isinstance(obj, torch.Tensor):
        x = obj.detach()
        if x.layout != torch.strided:
            x = x.to_dense()
        x = x.cpu().contiguous()
        h.update(f"T{x.dtype}{tuple(x.shape)}|".encode())
        if x.numel():
            h.update(x.reshape(-1).view(torch.uint8).numpy())
    elif t in _MAPPINGS:
        h.update(f"D{len(obj)}|".encode())
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint")
            _feed(h, k, where)
            _feed(h, v, f"{where}.{k}")
    elif t in (list, tuple, torch.Size):
        h.update(f"{'L' if t is list else 'U'}{len(obj)}|".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif t in _SCALARS:
        h.update(f"{t.__name__}:{obj!r}|".encode())
    else:
        raise TypeError(f"{where} is a {t.__module__}.{t.__name__}; checkpoints hold only tensors and plain "
                        "containers (dict, list, tuple, str, int, float, bool, None)")


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over everything in ``state`` except its ``checksum`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"}, "checkpoint")
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing
def _payload(state: dict[str, Any], kind: str) -> dict[str, Any]:
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, **state}
    payload["checksum"] = checksum(payload)
    return payload


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, state: dict[str, Any], kind: str = "last") -> None:
    """Write ``state`` (tensors and plain containers only) with its checksum, atomically."""
    payload = _payload(state, kind)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_last(ckpt_dir: str | Path, state: dict[str, Any], rotate: bool = True) -> None:
    """Write ``ckpt_dir/last.pt``; the ``last.pt`` it replaces becomes ``prev.pt`` (``rotate=False``:
    it is dropped and ``prev.pt`` stays, e.g. when it was an off-schedule checkpoint of an interrupt,
    so that a resumed run ends with the ``prev.pt`` of an uninterrupted one)."""
    ckpt_dir = Path(ckpt_dir)
    last, prev = ckpt_dir / LAST, ckpt_dir / PREV
    payload = _payload(state, "last")
    with atomic_path(last) as tmp:
        torch.save(payload, tmp)
        if rotate and last.exists():  # a kill between the two renames leaves prev.pt and no last.pt: load_latest copes
            os.replace(last, prev)
    _fsync_dir(ckpt_dir)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files that an earlier process killed mid-write left in ``folder``.
    Call only while holding the run folder's lock (no other writer can be using them)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------- reading
def _first_line(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Unsupported global:", "Unsupported operand", "Trying to load unsupported GLOBAL"):
        if marker in text:
            line = text[text.index(marker):].splitlines()[0]
            return line.split(" was not an allowed global")[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load(path: str | Path, map_location="cpu", kind: Optional[str] = None) -> dict[str, Any]:
    """Read and verify a checkpoint; ``kind`` (``last``, ``best``, ``snapshots``; None: any kind)
    is the kind of file expected. Raises FileNotFoundError or CheckpointError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a goldstone checkpoint: it holds objects that are not tensors or "
                              f"plain containers ({_first_line(exc)}); refused without running them") from None
    except Exception as exc:  # truncated, flipped zip structure, not a zip at all
        raise CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)}); the file is damaged "
                              "or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a goldstone checkpoint (no '{FORMAT}' marker); it was written by "
                              "another program or an older goldstone version")
    stored = state.get("checksum")
    try:
        actual = checksum(state)
    except TypeError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    if stored != actual:
        raise CheckpointError(f"{path} is corrupt: its contents do not match their SHA-256 checksum "
                              "(changed on disk after it was written)")
    if kind is not None and state.get("kind") != kind:
        hint = " (was best.pt copied over last.pt?)" if kind == "last" and state.get("kind") == "best" else ""
        raise CheckpointError(f"{path} is a '{state.get('kind')}' file, not a '{kind}' checkpoint{hint}")
    for key in ("format", "version", "kind", "checksum"):
        state.pop(key, None)
    return state


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint to resume from (last.pt or prev.pt, or the
    sharded last.dcp / prev.dcp of a distributed run: goldstone_cli.distributed.checkpoint)."""
    d = Path(run_dir) / "checkpoints"
    return (d / LAST).is_file() or (d / PREV).is_file() or any((d / f / "meta.pt").is_file()
                                                                for f in ("last.dcp", "prev.dcp"))


def load_latest(ckpt_dir: str | Path, map_location="cpu", warn=print,
                quarantine: bool = False) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that reads and verifies: ``last.pt``, else ``prev.pt`` (with a warning
    that says why ``last.pt`` was not used). ``quarantine`` (resume, under the run lock): rename a bad
    ``last.pt`` to ``last.pt.corrupt``, so the next save does not rotate it over the good ``prev.pt``.
    Raises CheckpointError when neither works."""
    ckpt_dir = Path(ckpt_dir)
    last, prev = ckpt_dir / LAST, ckpt_dir / PREV
    if not last.is_file() and not prev.is_file() and _has_sharded(ckpt_dir):
        return _load_sharded(ckpt_dir, map_location, warn)  # a run saved on several ranks
    problems = []
    for path in (last, prev):
        if not path.is_file():
            continue
        try:
            state = load(path, map_location=map_location, kind="last")
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if path == prev:
            reason = problems[0] if problems else f"{last} is missing"
            if last.is_file() and quarantine:
                os.replace(last, last.with_name(LAST + ".corrupt"))
                reason += f" (kept as {LAST}.corrupt)"
            warn(f"warning: {reason}; resuming from the previous checkpoint {prev} (step {state.get('step')})")
        if _has_sharded(ckpt_dir) and _sharded_step(ckpt_dir) > int(state.get("step", -1)):
            try:  # continued on several ranks since
                return _load_sharded(ckpt_dir, map_location, warn)
            except CheckpointError as exc:  # damaged: the verified one-process checkpoint is the newest good one
                warn(f"warning: the newer sharded checkpoint does not load ({exc}); using {path} "
                     f"(step {state.get('step')})")
        return state, path
    if not problems:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (expected {LAST} or {PREV})")
    raise CheckpointError("; ".join(problems) + ("" if prev.is_file() else f"; there is no {PREV} to fall back to"))


def fits(state: dict[str, Any], required: list[str], path: Path) -> None:
    """One line naming the keys a resumable checkpoint lacks."""
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the key(s) {', '.join(missing)}; it is not a complete "
                              "checkpoint of this version")


# ----------------------------------------------------------------------------- sharded runs
def _has_sharded(ckpt_dir: Path) -> bool:
    return any((ckpt_dir / f / "meta.pt").is_file() for f in ("last.dcp", "prev.dcp"))


def _sharded_step(ckpt_dir: Path) -> int:
    from goldstone_cli.distributed import checkpoint as dck

    steps = [dck.step_of(ckpt_dir / f) for f in (dck.LAST, dck.PREV)]
    return max([s for s in steps if s is not None], default=-1)


def _load_sharded(ckpt_dir: Path, map_location, warn) -> tuple[dict[str, Any], Path]:
    """The newest sharded checkpoint of a distributed run, as one process's state (full tensors):
    goldstone_cli.distributed.checkpoint (verified, weights-only, prev.dcp fallback)."""
    from goldstone_cli.distributed import checkpoint as dck
    from goldstone_cli.distributed.shard import RowShard

    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else torch.device("cpu")
    return dck.load_latest(ckpt_dir, RowShard.single(), device, warn=warn)
