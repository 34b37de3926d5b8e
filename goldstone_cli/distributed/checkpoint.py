"""Sharded checkpoints of row-sharded runs with torch.distributed.checkpoint (DCP).

A distributed run (``trainer.distributed=true`` on N > 1 ranks) writes ``checkpoints/last.dcp/``:

- ``*.distcp`` + ``.metadata``: DCP's files with every row-sharded tensor (the sharded model
  parameters and the base optimizer's per-parameter state of the same shape) saved as a DTensor
  with placement ``Shard(1)`` of its global ``(T, N, d)`` shape; each rank writes its own rows.
- ``meta.pt``: everything else (step, wall time, config, generator and scheduler state, the
  optimizer's scalars and gauge fields: the same on every rank), with placeholders naming the
  sharded tensors, plus the SHA-256 of every DCP file. Written by rank 0 as a goldstone checkpoint
  (checkpoint.save: plain containers only, checksummed, read with ``weights_only=True``).

Crash safety as in checkpoint.py: the folder is written as ``.last.dcp.tmp``, and only after every
rank has finished (a barrier) and rank 0 has hashed the files and written ``meta.pt`` is it renamed
to ``last.dcp`` (the old one becoming ``prev.dcp``). A folder without a verified ``meta.pt`` is never
loaded; a damaged ``last.dcp`` falls back to ``prev.dcp`` (on resume it is first renamed to
``last.dcp.corrupt``, so that the next save does not rotate it over the good ``prev.dcp``).

What DCP's own loader does, and what we do about it: ``FileSystemReader.read_metadata`` reads
``.metadata`` with a bare ``pickle.load``, and non-tensor entries are read with
``torch.load(weights_only=False)``; only the tensor data go through ``torch.load(weights_only=True)``.
So (1) we store no non-tensor entries in DCP's files (they live in ``meta.pt``) and refuse a
checkpoint whose metadata lists any; (2) ``.metadata`` is read by :class:`SafeReader` with an
unpickler that resolves only DCP's own metadata classes and a few torch / builtin types, so a crafted
file gets a one-line error instead of running code; (3) every file's SHA-256, recorded in the
checksummed ``meta.pt``, is verified before DCP reads it.

Resharding: DCP stores each rank's rows with their offsets, so a checkpoint saved on N ranks loads
on M ranks (each asks for its own ``RowShard`` block) and on one process (plain full tensors); a
one-process ``last.pt`` is split into rows by :func:`take_rows`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.checkpoint import CheckpointError
from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.io import file_sha256

LAST = "last.dcp"
PREV = "prev.dcp"
BEST = "best.dcp"
META = "meta.pt"
KIND = "dcp"
_MARK = "__dcp_sharded__"

Path_ = tuple  # a path of keys into a nested state dict


# ----------------------------------------------------------------------------- which tensors are sharded
def _get(obj: Any, path: Path_) -> Any:
    for k in path:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def sharded_paths(state: dict[str, Any], model, optimizer, full: bool = False) -> dict[Path_, int]:
    """``{path into state: global rows}`` of the row-sharded tensors of a training state
    (``model`` / ``optimizer`` entries as train.py's ``state_at`` builds them).

    The model's :meth:`sharded_params`, and the base optimizer's per-parameter state tensors with the
    shape of their parameter (``full``: of the full, unsharded parameter, as a one-process ``last.pt``
    holds them)."""
    spec = model.sharded_params() if hasattr(model, "sharded_params") else {}
    if not spec:
        return {}
    out: dict[Path_, int] = {("model", name): n for name, n in spec.items()}
    if optimizer is None:
        return out
    params = dict(model.named_parameters())
    base = getattr(optimizer, "base", optimizer)
    prefix = ("optimizer", "base", "state") if base is not optimizer else ("optimizer", "state")
    order = [p for group in base.param_groups for p in group["params"]]
    names = {id(p): name for name, p in params.items()}
    per_param = _get(state, prefix)
    if not isinstance(per_param, dict):
        return out
    for idx, entry in per_param.items():
        if not isinstance(idx, int) or not 0 <= idx < len(order) or not isinstance(entry, dict):
            continue
        name = names.get(id(order[idx]))
        if name not in spec:
            continue
        want = list(params[name].shape)
        if full:
            want[1] = spec[name]
        for key, value in entry.items():
            if isinstance(value, Tensor) and list(value.shape) == want:
                out[prefix + (idx, key)] = spec[name]
    return out


def _replace(obj: Any, path: Path_, value: Any) -> Any:
    """A copy of the nested dicts along ``path`` with the leaf replaced (other entries shared)."""
    if not path:
        return value
    new = dict(obj)
    new[path[0]] = _replace(obj[path[0]], path[1:], value)
    return new


def take_rows(state: dict[str, Any], paths: dict[Path_, int], shard: RowShard) -> dict[str, Any]:
    """A one-process state (full tensors) as this rank's: its rows of every sharded tensor."""
    for path in paths:
        state = _replace(state, path, shard.take(_get(state, path)).clone())
    return state


def _key(path: Path_) -> str:
    return "/".join(str(k) for k in path)


def _walk(obj: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))


# ----------------------------------------------------------------------------- the safe metadata reader
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_META, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"),  # layout by name: torch.strided
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
             ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata dataclasses / enums and torch's dtype, size and layout types."""

    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if (module, name) in _ALLOWED or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def read_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not DCP metadata of a goldstone checkpoint ({exc}); refused "
                              "without running it") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {exc}); the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():  # where DCP will read each shard
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", "..") \
                or not rel.endswith(".distcp") or not (path.parent / rel).is_file():
            raise CheckpointError(f"{path} points DCP at {rel!r}, not a shard file of its own folder; refused")
    bytes_items = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if bytes_items:  # DCP would read them with torch.load(weights_only=False)
        raise CheckpointError(f"{path} lists non-tensor entries ({', '.join(bytes_items[:3])}); goldstone "
                              "checkpoints hold only tensors there: refused")
    return metadata


def _safe_reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's FileSystemReader with :func:`read_metadata` instead of a bare ``pickle.load``."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            if not (Path(self.path) / name).is_file():  # DCP then tries the other kind of metadata file
                raise FileNotFoundError(f"no {name} in {self.path}")
            metadata = read_metadata(Path(self.path) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


# ----------------------------------------------------------------------------- save
_mesh_cache: dict[tuple, Any] = {}


def _mesh(shard: RowShard, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    key = (shard.world, device.type, id(shard.group))  # a new process group gets a new mesh
    if key not in _mesh_cache:
        _mesh_cache[key] = init_device_mesh(device.type, (shard.world,))
    return _mesh_cache[key]


def _dtensor(local: Tensor, n: int, shard: RowShard, device: torch.device):
    from torch.distributed.tensor import DTensor, Shard

    shape = list(local.shape)
    shape[1] = n
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), _mesh(shard, device), [Shard(1)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def save(ckpt_dir: str | Path, state: dict[str, Any], paths: dict[Path_, int], shard: RowShard,
         device: torch.device, name: str = LAST, rotate: bool = True) -> Path:
    """Write ``state`` as ``ckpt_dir/last.dcp`` (collective: every rank calls it with its own rows).
    The ``last.dcp`` it replaces becomes ``prev.dcp`` (``rotate=False``: it is dropped and ``prev.dcp``
    stays, as in :func:`goldstone_cli.checkpoint.save_last`; without a ``last.dcp``, e.g. one set aside
    as damaged, ``prev.dcp`` stays too). ``name=BEST``: ``best.dcp``, replaced."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    tmp, last = ckpt_dir / f".{name}.tmp", ckpt_dir / name
    if name == LAST and rotate:
        prev, old = ckpt_dir / PREV, ckpt_dir / f".{PREV}.old.tmp"
    else:  # the folder it replaces is dropped
        prev = old = ckpt_dir / f".{name}.old.tmp"
    def make_tmp() -> None:  # rank 0; an error (a full disk, no permission) stops every rank here
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    shard.from_main(make_tmp, f"make {tmp}")  # in place of a barrier: the others wait for it, or for its error
    meta_state, tensors = state, {}
    for path, n in sorted(paths.items(), key=lambda kv: _key(kv[0])):
        local = _get(state, path)
        shape = list(local.shape)
        shape[1] = n
        tensors[_key(path)] = _dtensor(local.detach(), n, shard, device)
        meta_state = _replace(meta_state, path, {_MARK: _key(path), "shape": shape,
                                                 "dtype": str(local.dtype).replace("torch.", "")})
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), process_group=shard.group)
    shard.barrier()  # every rank's rows are on disk
    # every rank hashes its share of the files (rank 0 alone would read the whole model)
    names = shard.from_main(lambda: sorted(p.name for p in tmp.iterdir() if p.is_file()), f"list {tmp}", 1 << 16)
    try:
        mine: dict[str, Any] = {"digests": {n: file_sha256(tmp / n) for n in _share(names, shard)}}
    except OSError as exc:  # told to the other ranks, so that none waits in the gather
        mine = {"error": f"rank {shard.rank} cannot read the checkpoint it just wrote ({exc})"}
    files: dict[str, str] = {}
    for part in shard.all_gather_json(mine):
        if "error" in part:
            raise CheckpointError(part["error"])
        files.update(part["digests"])
    def finish() -> None:  # rank 0
        ckpt.save(tmp / META, {"state": meta_state, "files": files, "world": shard.world}, kind=KIND)
        ckpt._fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if prev.exists() and prev != old and last.exists():  # no last.dcp: nothing replaces prev.dcp
            os.replace(prev, old)
        if last.exists():  # a kill between the renames leaves prev.dcp and no last.dcp: load_latest copes
            os.replace(last, prev)
        os.replace(tmp, last)
        ckpt._fsync_dir(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    # in place of a barrier: a failure of rank 0's part (meta.pt on a full disk) raises on every rank
    # (PeerRankError on the others) instead of leaving them in the barrier; the folder it replaces stays
    shard.from_main(finish, f"write {last}")
    return last


def remove_stale(ckpt_dir: str | Path) -> None:
    """Remove the temporary folders a process killed while saving left (call under the run lock);
    folders set aside as damaged (``last.dcp.corrupt``, :func:`set_aside`) stay for the user to inspect."""
    for name in (f".{LAST}.tmp", f".{LAST}.old.tmp", f".{PREV}.old.tmp", f".{BEST}.tmp", f".{BEST}.old.tmp"):
        shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)


# ----------------------------------------------------------------------------- load
def set_aside(ckpt_dir: str | Path, names: tuple[str, ...] = (LAST, PREV)) -> list[str]:
    """Rename the damaged checkpoint folders ``names`` to ``NAME.corrupt`` (rank 0, under the run
    lock), so that the next save does not rotate one into ``prev.dcp`` over a good one and nothing
    takes it for a checkpoint to fall back to; an older ``NAME.corrupt`` is replaced. Returns the new
    names."""
    out = []
    for name in names:
        src = Path(ckpt_dir) / name
        if not src.is_dir():
            continue
        dst = src.with_name(name + ".corrupt")
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        os.replace(src, dst)
        out.append(dst.name)
    if out:
        ckpt._fsync_dir(Path(ckpt_dir))
    return out


def read_meta(folder: Path, verify: bool = True) -> dict[str, Any]:
    """``meta.pt`` of a DCP checkpoint folder, verified (checksum; with ``verify`` every file's SHA-256)."""
    meta_path = folder / META
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} has no {META}: it was not completely written")
    meta = ckpt.load(meta_path, kind=KIND)
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("state"), dict) or ".metadata" not in files:
        raise CheckpointError(f"{meta_path} lacks its file list (with .metadata) or state; it is not a complete checkpoint")
    for name, digest in files.items():
        p = folder / name
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{meta_path} names a file outside its folder ({name!r}); refused")
        if not p.is_file():
            raise CheckpointError(f"{folder} lacks {name}; the checkpoint is incomplete")
        if verify and file_sha256(p) != digest:
            raise CheckpointError(f"{p} is corrupt: its contents do not match the SHA-256 in {META}")
    return meta


def step_of(folder: Path) -> Optional[int]:
    """The step of a DCP checkpoint folder from its meta.pt (None if it does not read)."""
    try:
        return int(read_meta(folder, verify=False)["state"]["step"])
    except (CheckpointError, FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def load(folder: Path, shard: RowShard, device: torch.device, verify: bool = True) -> dict[str, Any]:
    """The training state in ``folder`` for this rank: its rows of every sharded tensor (all rows on
    one process). Collective when ``shard`` is distributed. Raises CheckpointError (one line)."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(folder, verify=verify and not shard.distributed)  # distributed: load_latest verified
    read_metadata(folder / ".metadata")  # a one-line error for a crafted or damaged file, before DCP reads it
    state = meta["state"]
    targets: dict[str, Tensor] = {}
    places: list[tuple[Path_, str]] = []
    for path, value in list(_walk(state)):
        if isinstance(value, dict) and _MARK in value:
            key, shape = value[_MARK], [int(s) for s in value["shape"]]
            dtype = getattr(torch, str(value["dtype"]), None)
            if not isinstance(key, str) or not isinstance(dtype, torch.dtype) or len(shape) < 2:
                raise CheckpointError(f"{folder / META}: bad placeholder at {_key(path)}")
            if shard.distributed:
                local_shape = list(shape)
                local_shape[1] = shard.local_size(shape[1])
                targets[key] = _dtensor(torch.zeros(local_shape, dtype=dtype, device=device), shape[1], shard, device)
            else:
                targets[key] = torch.zeros(shape, dtype=dtype, device=device)
            places.append((path, key))
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(targets, storage_reader=_safe_reader(folder), process_group=shard.group,
                     no_dist=not shard.distributed)
    except CheckpointError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise CheckpointError(f"cannot read the sharded checkpoint {folder} ({type(exc).__name__}: "
                              f"{text[0] if text else ''})") from None
    # DCP's own collectives do not go through collective.run: one of ours, waited for, lets gloo's
    # workers free DCP's last tensors now rather than at the interpreter's exit (SIGABRT there: see
    # distributed/collective.py); as after dcp.save
    shard.barrier()
    for path, key in places:
        t = targets[key]
        state = _replace(state, path, t.to_local() if shard.distributed else t)
    return state


def _share(names: list[str], shard: RowShard) -> list[str]:
    """This rank's share of a checkpoint's files for hashing: every ``world``-th, from its rank."""
    return names[shard.rank::shard.world]


def _verify_shared(folder: Path, shard: RowShard) -> Optional[str]:
    """Verify ``folder`` with every rank checking the SHA-256 of its share of the files (collective);
    the first problem found (the same on every rank), or None."""
    problem = None
    try:
        files = read_meta(folder, verify=False)["files"]  # names checked; meta.pt's own checksum verified
        for name in _share(sorted(files), shard):
            if file_sha256(folder / name) != files[name]:
                raise CheckpointError(f"{folder / name} is corrupt: its contents do not match the SHA-256 in {META}")
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        problem = str(exc)
    return next((p for p in shard.all_gather_json(problem) if p is not None), None)


def load_latest(ckpt_dir: str | Path, shard: RowShard, device: torch.device, warn=print,
                quarantine: bool = False) -> tuple[dict[str, Any], Path]:
    """The newest DCP checkpoint that verifies and loads, ``last.dcp`` else ``prev.dcp``; every rank
    gets the same choice (the ranks verify the files' checksums in shares and agree; DCP's load fails
    on every rank or none). ``quarantine`` (resume, under the run lock): rank 0 renames a bad
    ``last.dcp`` to ``last.dcp.corrupt`` before ``prev.dcp`` is loaded, so that the next save does not
    rotate it over the good ``prev.dcp``. Raises CheckpointError when neither works."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / LAST, ckpt_dir / PREV]
    exists = shard.broadcast_json([f.is_dir() for f in candidates] if shard.is_main() else None)
    problems: list[str] = []
    for j, folder in enumerate(candidates):
        if not exists[j]:
            continue
        problem = _verify_shared(folder, shard)
        if problem is None:
            note = ""
            if j == 1 and exists[0] and quarantine:  # last.dcp was there and did not verify or load
                if shard.is_main():
                    set_aside(ckpt_dir, (LAST,))
                note = f" (kept as {LAST}.corrupt)"
            try:
                state = load(folder, shard, device, verify=False)
            except CheckpointError as exc:
                problem = str(exc)
            else:
                if j == 1 and shard.is_main():
                    reason = problems[0] if problems else f"{candidates[0]} is missing"
                    warn(f"warning: {reason}{note}; resuming from the previous checkpoint {folder} "
                         f"(step {state.get('step')})")
                return state, folder
        problems.append(problem)
    raise CheckpointError("; ".join(problems) if problems else f"no readable sharded checkpoint in {ckpt_dir}")


def has_checkpoint(ckpt_dir: str | Path) -> bool:
    d = Path(ckpt_dir)
    return (d / LAST / META).is_file() or (d / PREV / META).is_file()


def remove(ckpt_dir: str | Path) -> None:
    """Remove last.dcp / prev.dcp (superseded by a newer one-process last.pt)."""
    for name in (LAST, PREV):
        shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)
