"""Pack a workspace into a deterministic .tar.gz (same files -> same sha256 -> upload skipped).

Respects .gitignore and .fedmlignore at the workspace root and never packs .git. Symlinks that point
outside the workspace are refused here with the file named (the scheduler would refuse them too).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import USAGE, CliError


@dataclass
class Packed:
    path: str
    sha256: str
    files: int
    size: int  # compressed bytes


def _ignore(root: Path):  # type: ignore[no-untyped-def]
    patterns: list[str] = []
    for name in (".gitignore", ".fedmlignore"):
        f = root / name
        if f.is_file():
            patterns += f.read_text(errors="replace").splitlines()
    if not patterns:
        return None
    import pathspec

    return pathspec.PathSpec.from_lines("gitwildmatch", patterns)


def pack(root: Path) -> Packed:
    spec = _ignore(root)
    fd, out = tempfile.mkstemp(prefix="fedml-ws-", suffix=".tar.gz")
    files = 0
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=3) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(root):
                rel_dir = os.path.relpath(dirpath, root)
                rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
                dirnames.sort()
                keep = []
                for d in dirnames:
                    rel = posixpath.join(rel_dir, d)
                    if d == ".git" or (spec and spec.match_file(rel + "/")):
                        continue
                    if os.path.islink(os.path.join(dirpath, d)):
                        filenames.append(d)  # packed as a link, not followed
                        continue
                    keep.append(d)
                    _add(tar, root, rel, dirs=True)
                dirnames[:] = keep
                for f in sorted(filenames):
                    rel = posixpath.join(rel_dir, f)
                    if spec and spec.match_file(rel):
                        continue
                    _add(tar, root, rel)
                    files += 1
        digest = hashlib.sha256()
        with open(out, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return Packed(path=out, sha256=digest.hexdigest(), files=files, size=os.path.getsize(out))
    except BaseException:
        os.unlink(out)
        raise


def _add(tar: tarfile.TarFile, root: Path, rel: str, dirs: bool = False) -> None:
    full = root / rel
    try:
        st = os.lstat(full)
    except OSError as exc:
        raise CliError(f"workspace {full}: cannot read: {exc.strerror}", USAGE) from None
    info = tarfile.TarInfo(rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = st.st_mode & 0o755 | (0o644 if not (st.st_mode & 0o111) else 0o755)
    if os.path.islink(full):
        target = os.readlink(full)
        inside = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if target.startswith("/") or inside == ".." or inside.startswith("../"):
            raise CliError(f"workspace {full}: symlink points outside the workspace ({target})", USAGE)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tar.addfile(info)
    elif dirs or os.path.isdir(full):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    elif os.path.isfile(full):
        info.size = st.st_size
        with open(full, "rb") as f:
            tar.addfile(info, f)
    # sockets, fifos and devices in a workspace are skipped: they cannot be shipped
