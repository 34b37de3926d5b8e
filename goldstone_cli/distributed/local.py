"""Run a function on N local CPU processes joined by gloo: for tests and benchmarks.

``run_local(fn, world, *args)`` starts ``world`` processes (multiprocessing "spawn"), sets the
variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls
``fn(*args)`` in each after :func:`~goldstone_cli.distributed.env.init_distributed`, and returns the
list of their return values (rank order). Return values travel through ``torch.save`` files in a
temporary folder, read back with ``weights_only=True``: return tensors, numbers, strings, lists,
dicts. ``fn`` must be importable by name (a module-level function).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, threads: int, fn: Callable, args: tuple) -> None:
    from goldstone_cli.distributed.env import init_distributed, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        init_distributed("cpu", timeout_s=120)
        result = fn(*args)
        torch.save({"result": result}, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        shutdown()


def run_local(fn: Callable, world: int, *args: Any, threads: int = 1, timeout_s: float = 300) -> list:
    with tempfile.TemporaryDirectory(prefix="goldstone-dist-") as out:
        port = free_port()
        ctx = mp.start_processes(_worker, args=(world, port, out, threads, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        if proc.is_alive():
                            proc.kill()
                    raise TimeoutError(f"{world} local ranks did not finish within {timeout_s:.0f} s")
        except TimeoutError:
            raise
        except Exception as e:
            errors = sorted(Path(out).glob("rank*.err"))
            detail = "\n".join(p.read_text() for p in errors)
            raise RuntimeError(f"a rank failed:\n{detail or e}") from None
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True)["result"] for r in range(world)]
