"""Verified downloads: stream a file, check its checksum, unpack a zip archive safely.

The download is streamed into a temporary file next to its destination (with a tqdm byte bar),
its MD5 or SHA-256 is compared with the expected value, and only then is anything unpacked. A
zip is unpacked into a temporary folder inside the destination and its top-level entries are
renamed into place, so an interrupted or corrupt download never leaves a half-unpacked data set.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm.auto import tqdm

from goldstone_cli import __version__

USER_AGENT = f"goldstone/{__version__} (+https://pypi.org/project/goldstone)"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download could not be completed (network, HTTP status, truncated transfer, bad archive)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the expected checksum (the file has been deleted)."""


def _open(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https/file by design)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"Could not download {url}: HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"Could not reach {url}: {reason}. Check the URL and your network.") from e


def fetch_text(url: str, timeout: float = 60.0, max_bytes: int = 1 << 16) -> str:
    """Return a small text resource (e.g. a published ``.md5`` file)."""
    with _open(url, timeout) as response:
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DownloadError(f"{url} is larger than {max_bytes} bytes; expected a short text file.")
    return data.decode("utf-8", errors="replace")


def parse_checksum_file(text: str, filename: str | None = None, algorithm: str = "md5") -> str:
    """Extract the hex digest from a checksum file.

    Accepts the BSD layout ``MD5 (ml-20m.zip) = cd24...`` (what GroupLens publishes), the GNU
    ``md5sum`` layout ``cd24...  ml-20m.zip`` and a bare digest. With several lines, the line that
    names ``filename`` is used.
    """
    n_hex = {"md5": 32, "sha256": 64}[algorithm]
    digest_re = re.compile(rf"(?<![0-9a-fA-F])([0-9a-fA-F]{{{n_hex}}})(?![0-9a-fA-F])")
    found: list[tuple[str, str]] = []  # (digest, line)
    for line in text.splitlines():
        m = digest_re.search(line)
        if m:
            found.append((m.group(1).lower(), line))
    if filename is not None and len(found) > 1:
        found = [f for f in found if filename in f[1]] or found
    if len(found) != 1:
        raise DownloadError(
            f"Could not read one {algorithm} digest from the checksum file "
            f"({len(found)} candidates); its text starts with: {text[:200]!r}"
        )
    return found[0][0]


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Stream ``url`` to ``dest`` and verify its checksum (``md5`` or ``sha256``, hex).

    The bytes go to a temporary file next to ``dest`` and are renamed into place only after the
    checksum matched. On a mismatch, a truncated transfer, or any interruption the temporary file
    is deleted and ``dest`` is left as it was.
    """
    if (md5 is None) == (sha256 is None):
        raise ValueError("Give exactly one expected checksum: md5=... or sha256=...")
    algorithm, expected = ("md5", md5) if md5 is not None else ("sha256", sha256)
    expected = expected.strip().lower()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.new(algorithm)
        n_read = 0
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"download {dest.name}", disable=not progress) as bar:
                try:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        n_read += len(chunk)
                        bar.update(len(chunk))
                except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                    raise DownloadError(
                        f"Download of {url} was interrupted after {n_read} bytes ({e!r}). Run the command again."
                    ) from e
            out.flush()
            os.fsync(out.fileno())
        if total is not None and n_read != total:
            raise DownloadError(
                f"Download of {url} was truncated: got {n_read} of {total} bytes. Run the command again."
            )
        actual = h.hexdigest()
        if actual != expected:
            raise ChecksumMismatchError(
                f"Checksum mismatch for {url}: expected {algorithm} {expected}, got {actual} "
                f"({n_read} bytes). The corrupt download was deleted; nothing was unpacked. "
                "Run the command again; if it keeps failing, the server's file or its published "
                "checksum has changed."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _safe_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """Reject archive members that would land outside the target folder (absolute paths, ``..``)."""
    members = zf.infolist()
    for info in members:
        p = PurePosixPath(info.filename.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
            raise DownloadError(f"Refusing to unpack {archive}: member {info.filename!r} points outside the folder.")
    return members


def _check_required(members: list[zipfile.ZipInfo], archive: Path, require_any: Sequence[str]) -> None:
    if not require_any:
        return
    names = {PurePosixPath(m.filename.replace("\\", "/")).as_posix() for m in members if not m.is_dir()}
    if not any(r in names for r in require_any):
        shown = ", ".join(sorted(names)[:10]) or "nothing"
        raise DownloadError(f"{archive.name} holds none of {', '.join(require_any)} (it holds {shown}); "
                            "nothing was unpacked. Check --base-url and --variant.")


def unpack_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike, *, overwrite: bool = False,
               require_any: Sequence[str] = ()) -> list[Path]:
    """Unpack ``archive`` into ``dest_dir``; return the top-level paths created.

    Everything is first extracted into a temporary folder inside ``dest_dir`` (same file system),
    then each top-level entry is renamed into place. If extraction fails, nothing appears under
    ``dest_dir``. An existing top-level entry is an error unless ``overwrite``. With
    ``require_any`` (member paths such as ``ml-20m/ratings.csv``), an archive that holds none of
    them is rejected before anything is extracted.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.stem}.", suffix=".unpack", dir=dest_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = _safe_members(zf, archive)
                _check_required(members, archive, require_any)
                with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True,
                          unit_divisor=1024, desc=f"unpack {archive.name}",
                          disable=len(members) < 2) as bar:
                    for info in members:
                        zf.extract(info, staging)
                        bar.update(info.file_size)
        except zipfile.BadZipFile as e:
            raise DownloadError(f"{archive} is not a valid zip archive: {e}") from e
        entries = sorted(staging.iterdir())
        targets = [dest_dir / e.name for e in entries]
        clash = [t for t in targets if t.exists()]
        if clash and not overwrite:
            raise DownloadError(f"{clash[0]} already exists; remove it or pass overwrite/--force.")
        for entry, target in zip(entries, targets):
            if target.exists():
                # Move the old copy aside first so that the new one appears by a single rename.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=dest_dir))
                os.replace(target, old / target.name)
                os.replace(entry, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, target)
        return targets
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_and_unpack(
    url: str,
    dest_dir: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    keep_archive: bool = False,
    overwrite: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    require_any: Sequence[str] = (),
) -> list[Path]:
    """Download a zip from ``url``, verify its checksum, unpack it into ``dest_dir``.

    Returns the top-level paths created. The archive is deleted after unpacking unless
    ``keep_archive`` (then it stays as ``dest_dir/<name>.zip``); an archive that could not be
    unpacked (not a zip, or none of the ``require_any`` members) is always deleted, so a failed
    download leaves nothing behind.
    """
    dest_dir = Path(dest_dir)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download.zip"
    archive = download_file(url, dest_dir / name, md5=md5, sha256=sha256, timeout=timeout, progress=progress)
    ok = False
    try:
        out = unpack_zip(archive, dest_dir, overwrite=overwrite, require_any=require_any)
        ok = True
        return out
    finally:
        if not (keep_archive and ok):
            archive.unlink(missing_ok=True)
