"""Who am I: rank, world size and device of this process, from the launcher's environment.

Two launchers are understood:

- ``torchrun`` (and ``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
- Slurm (``srun``, or submitit's ``hydra.launcher.nodes`` / ``tasks_per_node``) sets
  ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_JOB_NODELIST``; the master is
  the first host of the node list (as submitit's own ``TorchDistributedEnvironment`` does) and the
  port is derived from the job id, unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set.

torchrun's variables win when both are present (torchrun started inside a Slurm allocation).
submitit's local executor (``hydra/launcher=submitit_local`` with ``tasks_per_node``) is understood
too (``SUBMITIT_LOCAL_GLOBALID`` / ``SUBMITIT_LOCAL_NTASKS``; master 127.0.0.1), to test a Slurm set-up
on one machine.
The backend is NCCL on CUDA devices and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from goldstone_cli.distributed.errors import RankError


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process (nothing initialized yet)."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


@dataclass(frozen=True)
class Dist:
    """An initialized process group and this process's place in it."""

    rank: int
    world: int
    local_rank: int
    group: Optional[dist.ProcessGroup]
    device: torch.device
    backend: str

    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; "
                         f"launch with torchrun or srun, which set it") from None


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list: ``"gpu[003-005,009],cpu1"`` -> ``"gpu003"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's host name")
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR to the first "
                         f"node's host name")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding kept: "003-005" -> "003"
    return prefix + first


def launch_env(env: Optional[Mapping[str, str]] = None) -> Optional[LaunchEnv]:
    """The launcher's view of this process, or ``None`` when no launcher set one up."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; launch with "
                             f"torchrun, which sets all of them")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        source = "torchrun"
        addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        source = "slurm"
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
            addr = first_host(nodelist)
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            job = env.get("SLURM_JOB_ID", "0")
            port = 20000 + (int(job) % 20000 if job.isdigit() else 0)  # same on every task of the job
    elif "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        # submitit's local executor (hydra/launcher=submitit_local, tasks_per_node > 1): one machine
        rank, world = _int(env, "SUBMITIT_LOCAL_GLOBALID"), _int(env, "SUBMITIT_LOCAL_NTASKS")
        local = _int(env, "SUBMITIT_LOCAL_LOCALID") if "SUBMITIT_LOCAL_LOCALID" in env else rank
        source = "submitit_local"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else \
            20000 + (int(job) % 20000 if job.isdigit() else 0)
    else:
        return None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"{source} set rank {rank} of world size {world} (local rank {local}): need "
                         f"0 <= rank < world size")
    return LaunchEnv(rank=rank, world=world, local_rank=local, master_addr=addr, master_port=port,
                     source=source)


def pick_device(requested: str | torch.device, local_rank: int) -> torch.device:
    """``cuda`` (or ``auto`` with CUDA available) becomes ``cuda:<local rank>``; anything else as is."""
    requested = str(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device asks for CUDA but torch sees no GPU; use trainer.device=cpu")
        count = torch.cuda.device_count()
        if device.index is None:
            if local_rank >= count:
                raise RankError(f"local rank {local_rank} has no GPU: this node has {count}; start at most "
                                f"{count} processes per node (torchrun --nproc-per-node={count})")
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float = 1800.0,
                     env: Optional[Mapping[str, str]] = None) -> Optional[Dist]:
    """Join the process group the launcher set up; ``None`` if this process was not launched by one.

    The backend is NCCL when ``device`` is CUDA (one GPU per process: ``cuda:<local rank>``), gloo
    otherwise. Calling it again in a process that already joined returns the same group.
    """
    launch = launch_env(env)
    if launch is None:
        return None
    dev = pick_device(device, launch.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # env:// reads MASTER_ADDR / MASTER_PORT; Slurm does not set them, so pass them explicitly
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world, timeout=timedelta(seconds=timeout_s), **kwargs)
    elif dist.get_world_size() != launch.world or dist.get_rank() != launch.rank:
        raise RuntimeError(f"the process group is already initialized as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, but the launcher says {launch.rank} of {launch.world}")
    return Dist(rank=launch.rank, world=launch.world, local_rank=launch.local_rank,
                group=dist.group.WORLD, device=dev, backend=dist.get_backend())


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_log(run_dir: str | os.PathLike, rank: int) -> Iterator[None]:
    """Rank 0 prints as usual; any other rank's output (stdout, stderr, warnings, progress messages)
    goes to ``<run_dir>/logs/rank<r>.log`` (appended, so a resumed run keeps the earlier log)."""
    if rank == 0:
        yield
        return
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield
