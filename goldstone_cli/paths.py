"""Names read from files (run names in ``sweep.json``, file names in a prepared corpus's manifest)
must name something *inside* their folder.

A crafted or hand-edited file could otherwise make a command read, overwrite or delete anything the
user can reach: a run name ``../victim`` in ``sweep.json`` made ``goldstone sweep --dir`` remove that
folder. Every such name goes through :func:`child` before it is used.
"""

from __future__ import annotations

import os
from pathlib import Path


class UnsafeNameError(ValueError):
    """A name read from a file would leave its folder (``..``, an absolute path, a symlink out)."""


def child(folder: str | os.PathLike, name: object, what: str, source: str | os.PathLike | None = None,
          allow_symlink: bool = True) -> Path:
    """``folder / name``, refused unless ``name`` is one plain path component that stays inside
    ``folder``: not empty, not ``.`` or ``..``, no ``/`` or ``\\``, not absolute, and (when it exists)
    not a symbolic link that resolves outside ``folder`` (``allow_symlink=False``: no link at all).

    ``what`` names the thing in the error (``"run name"``), ``source`` the file it was read from."""
    folder = Path(folder)
    where = f" in {source}" if source is not None else ""
    if not isinstance(name, str):
        raise UnsafeNameError(f"{what} {name!r}{where} is not a string")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise UnsafeNameError(f"{what} {name!r}{where} is not a plain name inside {folder}; "
                              "names read from files may not contain '/', '\\' or be '..'")
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        if not allow_symlink:
            raise UnsafeNameError(f"{what} {name!r}{where}: {path} is a symbolic link (to {target}); "
                                  "replace it by a real folder")
        if not target.is_relative_to(folder.resolve()):
            raise UnsafeNameError(f"{what} {name!r}{where}: {path} is a symbolic link to {target}, outside {folder}")
    return path
