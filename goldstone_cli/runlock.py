"""One process per run folder: an exclusive ``flock`` on ``<run_dir>/run.lock``, held for the run's life.

The kernel releases the lock when the process ends in any way (including SIGKILL), so a stale lock
file never blocks a later run; only a *live* holder does. The file holds the holder's process id,
for the message that a second ``train`` / ``resume`` / ``sweep --dir`` prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking, runs work as before
    fcntl = None

LOCK = "run.lock"


class RunLocked(ValueError):
    """Another live process holds the run folder's lock."""


def _holder_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire()`` ... ``lock.release()``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by subprocesses (PEP 446)
        if fcntl is None:
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise in_use(self.path.parent, _holder_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock; the file stays (harmless)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def in_use(run_dir: str | os.PathLike, pid: Optional[int]) -> RunLocked:
    path = Path(run_dir) / LOCK
    return RunLocked(f"{path.parent} is in use by another goldstone process" + (f" (pid {pid})" if pid and pid > 0 else "")
                     + f" that holds {path}; wait for it to finish or stop it (Ctrl-C or kill), then try again")


def holder(run_dir: str | os.PathLike) -> Optional[int]:
    """The pid (or -1 when unknown) of a live process holding ``run_dir``'s lock; None when free."""
    path = Path(run_dir) / LOCK
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # succeeds unless someone holds LOCK_EX
    except BlockingIOError:
        return _holder_pid(path) or -1
    finally:
        os.close(fd)  # also releases our shared lock at once
    return None
