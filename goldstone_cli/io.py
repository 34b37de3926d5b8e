"""Atomic file writing and content hashing.

Every file that a later run trusts (checkpoints, caches, prepared corpora, summaries) is written
to a temporary file in the same folder and renamed into place, so an interrupted write never leaves
a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid in the name: remove_abandoned_temporaries can tell a live write from one
    # that a kill (SIGKILL, power loss) abandoned
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600: give the file the mode a new file gets from open(), 0666 minus the
        # umask, so colleagues on a shared file system can read the run if the user's umask allows it
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def _writer_tag() -> str:
    return f"{_host()}.{os.getpid()}"


# .NAME.HOST.PID.XXXXXXXX[.SUFFIX].tmp, as atomic_path names its temporary files (mkstemp's 8 characters)
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?\.tmp$")


def remove_abandoned_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``atomic_path`` writes in ``folder`` whose writer no longer runs
    (killed mid-write: SIGKILL, OOM, power loss), so a shared cache does not fill up with them. Only
    files this host's processes wrote are judged (another host's pids mean nothing here); a live
    writer's file, or a name of another form, is left alone. Returns the removed paths."""
    folder, host, removed = Path(folder), _host(), []
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if (m and m.group("host") == host and int(m.group("pid")) != os.getpid()
                and not process_running(int(m.group("pid"))) and p.is_file() and not p.is_symlink()):
            try:
                p.unlink(missing_ok=True)
            except OSError:  # a read-only cache folder: left as it is
                continue
            removed.append(p)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it: from /proc/self/status (Linux >= 4.7); else by
    setting and restoring it under a lock (the only portable way; another thread creating a file
    in between would see umask 0o077, the safe direction)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: a NaN or infinite float is written as ``null`` (``json.dumps`` would write the
    bare tokens ``NaN`` / ``Infinity``, which strict parsers reject). Callers that need to say why
    record :func:`non_finite_paths` next to the values first."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def non_finite_paths(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"final.test_auc": "nan", ...}``: the dotted paths of the non-finite floats in ``obj``."""
    out: dict[str, str] = {}
    if isinstance(obj, float) and not math.isfinite(obj):
        out[prefix or "."] = repr(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(non_finite_paths(v, f"{prefix}[{i}]"))
    return out


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22, cancel=None) -> str:
    """Hex SHA-256 of a file's content, read in chunks (bounded memory for multi-GB files; hashing
    releases the GIL, so threads hash files in parallel). ``cancel``: a ``threading.Event`` that
    stops the read between chunks with ``InterruptedError``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            if cancel is not None and cancel.is_set():
                raise InterruptedError(f"hashing {path} was cancelled")
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` runs on this host (or exists but is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_running(pid: int) -> bool:
    """``pid_alive``, and not a zombie (dead, not yet reaped by its parent)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def proc_kib_field(path: str, key: str) -> int | None:
    """The number of a ``KEY:  N kB`` line of a /proc file (``/proc/meminfo``'s MemAvailable,
    ``/proc/self/status``'s VmRSS / VmHWM), in bytes; None where it cannot be read (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, split at "\\n" only, one "\\r" at the end of each dropped (Windows line
    ends), as the readers of user files need them: ``str.splitlines`` also splits at U+2028,
    U+2029, \\x85, \\x0b, \\x0c and \\x1c-\\x1e, which a word may hold (gensim's word2vec reader keeps
    them), and text-mode reading (universal newlines) at a lone "\\r". Like ``splitlines``, a final
    "\\n" ends the last line (no empty line after it), and an empty text has no lines; other empty
    lines are kept, so that ``enumerate`` counts file lines."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """:func:`split_lines` of a file's text (read as bytes and decoded: no newline translation);
    UnicodeDecodeError as ``Path.read_text``."""
    return split_lines(Path(path).read_bytes().decode(encoding))
