"""Workspace archives: the checks that keep a tar inside its directory (tar-slip), and safe unpacking.

The scheduler runs `check_archive` on every upload; the agent runs it again before unpacking.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path


class UnsafeArchive(ValueError):
    pass


def _inside(name: str) -> bool:
    norm = posixpath.normpath(name)
    return not (norm.startswith("/") or norm == ".." or norm.startswith("../"))


def check_member(m: tarfile.TarInfo) -> None:
    name = m.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"{name}: absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchive(f"{name}: path contains '..'")
    if not _inside(name):
        raise UnsafeArchive(f"{name}: path leaves the workspace")
    if m.issym():
        target = m.linkname
        if target.startswith("/"):
            raise UnsafeArchive(f"{name}: symlink to absolute path {target}")
        if not _inside(posixpath.join(posixpath.dirname(name), target)):
            raise UnsafeArchive(f"{name}: symlink points outside the workspace ({target})")
    elif m.islnk():
        if not _inside(m.linkname) or ".." in m.linkname.split("/"):
            raise UnsafeArchive(f"{name}: hard link points outside the workspace ({m.linkname})")
    elif not (m.isfile() or m.isdir()):
        raise UnsafeArchive(f"{name}: device, fifo or other special file")


def check_archive(path: str | Path) -> int:
    """Raise UnsafeArchive naming the first bad member; return the unpacked size in bytes."""
    total = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                check_member(m)
                total += m.size if m.isfile() else 0
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
    except (EOFError, OSError) as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
    return total


def unpack(archive: str | Path, dest: str | Path) -> None:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    check_archive(archive)
    with tarfile.open(archive, "r:*") as tar:
        # The data filter repeats our checks inside the stdlib and strips setuid bits and ownership.
        tar.extractall(dest, filter="data")
