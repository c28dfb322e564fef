"""Workspace and artifact archives: pack, check, unpack. The one module the CLI, the scheduler and the agent use.

The rule (documented in docs/security.md): nothing is ever written through a symlink, and nothing lands outside
the destination directory, whatever the archive says.

- `check` reads member headers only and refuses, naming the member: absolute paths and `..`, hard links that do
  not name an earlier regular file, devices and fifos, a symlink whose target leaves the tree or goes through
  another symlink (chains, including PATH_MAX-length ones that defeat `realpath`-based checks), a member whose
  path goes through a symlink member, a name given twice, and an archive that is truncated (no end-of-archive
  block). Limits on members, name length, depth, unpacked bytes and compression ratio are checked on running
  totals, so a bomb is refused after reading about as much as the limit, never all of it.
- `unpack` checks first, then extracts by walking directory file descriptors with O_NOFOLLOW and creating every
  file with O_EXCL: even a destination prepared by an attacker (a symlink where a directory should be, a file
  of the same name) makes it refuse instead of following. Hard links become copies; ownership and setuid bits
  are never taken from the archive.

One module, over the usual size, on purpose: the checks and the extraction are one security argument, read
and reviewed together (tests/test_workspace_safety.py attacks them as one).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class UnsafeArchive(ValueError):
    """An archive refused; the message names the member (or says what is wrong with the whole archive)."""


class TooLarge(UnsafeArchive):
    """An archive over one of its size limits (HTTP 413 rather than 400)."""


@dataclass(frozen=True)
class Limits:
    unpacked_bytes: int = 2 * 1024**3
    members: int = 100_000
    name_bytes: int = 1024  # a member's whole path
    component_bytes: int = 255  # one path component (NAME_MAX)
    depth: int = 64
    ratio: int = 200  # unpacked / compressed, beyond ...
    ratio_floor: int = 64 * 1024**2  # ... this many unpacked bytes (small archives of zeros are fine)


@dataclass
class Summary:
    members: int
    files: int
    unpacked_bytes: int


BLOCK = 512
_READ = 1 << 20


# ---- check ---------------------------------------------------------------------------------------------------

def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _norm_name(m: tarfile.TarInfo, limits: Limits) -> str:
    name = m.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
        raise UnsafeArchive(f"{name}: absolute path")
    if "\\" in name:
        raise UnsafeArchive(f"{name}: backslash in a path")
    if "\0" in name:
        raise UnsafeArchive(f"{name}: NUL in a path")
    parts = _parts(name)
    if ".." in parts:
        raise UnsafeArchive(f"{name}: path contains '..'")
    if len(name.encode()) > limits.name_bytes:
        raise UnsafeArchive(f"{name[:60]}...: path longer than {limits.name_bytes} bytes")
    if any(len(p.encode()) > limits.component_bytes for p in parts):
        raise UnsafeArchive(f"{name}: a path component is longer than {limits.component_bytes} bytes")
    if len(parts) > limits.depth:
        raise UnsafeArchive(f"{name}: nested deeper than {limits.depth} directories")
    return "/".join(parts)


def _resolve_link(name: str, target: str, symlinks: set[str]) -> str:
    """Where symlink `name` -> `target` points, resolved lexically; refused if it leaves the tree or passes
    through another symlink (the tree holds only what the archive made, so lexical resolution is the real one
    as long as no component is a symlink)."""
    if not target or target.startswith("/") or "\\" in target or "\0" in target:
        raise UnsafeArchive(f"{name}: symlink to an absolute or empty path ({target!r})")
    path = _parts(posixpath.dirname(name))
    for comp in _parts(target):
        if comp == "..":
            if not path:
                raise UnsafeArchive(f"{name}: symlink points outside the workspace ({target})")
            path.pop()
            continue
        path.append(comp)
        if "/".join(path) in symlinks:
            raise UnsafeArchive(f"{name}: symlink points through another symlink ({target}); chains are refused")
    return "/".join(path)


def _check_open(tar: tarfile.TarFile, compressed: int, limits: Limits, raw: IO[bytes]) -> tuple[Summary, list]:
    seen: dict[str, tarfile.TarInfo] = {}
    symlinks: set[str] = set()
    dirs: set[str] = set()
    implicit: set[str] = set()  # directories that members' paths make
    files = total = count = 0
    members: list[tuple[tarfile.TarInfo, str]] = []
    while True:
        try:
            m = tar.next()
        except tarfile.TarError as exc:
            raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
        if m is None:
            break
        count += 1
        if count > limits.members:
            raise TooLarge(f"archive has more than {limits.members:,} members")
        name = _norm_name(m, limits)
        if not name:
            if m.isdir():
                continue
            raise UnsafeArchive(f"{m.name}: not a file name")
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in symlinks:
                raise UnsafeArchive(f"{m.name}: path goes through the symlink {prefix}")
            if prefix in seen and prefix not in dirs:
                raise UnsafeArchive(f"{m.name}: path goes through the file {prefix}")
            implicit.add(prefix)
        if name in seen and not (m.isdir() and seen[name].isdir()):
            raise UnsafeArchive(f"{m.name}: appears twice in the archive")
        if name in implicit and not m.isdir():
            raise UnsafeArchive(f"{m.name}: appears twice in the archive (as a directory before)")
        if m.isreg():
            files += 1
            total += m.size
        elif m.isdir():
            dirs.add(name)
        elif m.issym():
            symlinks.add(name)
        elif m.islnk():
            try:
                target = _norm_name(tarfile.TarInfo(m.linkname), limits) if m.linkname else ""
            except UnsafeArchive:
                raise UnsafeArchive(f"{m.name}: hard link points outside the workspace ({m.linkname})") from None
            first = seen.get(target)
            if first is None or not first.isreg():
                raise UnsafeArchive(f"{m.name}: hard link to something that is not an earlier file ({m.linkname})")
            files += 1
            total += first.size
        else:
            raise UnsafeArchive(f"{m.name}: device, fifo or other special file")
        if total > limits.unpacked_bytes:
            raise TooLarge(f"archive unpacks to more than {limits.unpacked_bytes // 1024**2:,} MiB")
        if total > limits.ratio_floor and total > limits.ratio * max(compressed, 1):
            raise TooLarge(f"archive unpacks to more than {limits.ratio}x its size (a compression bomb?)")
        seen[name] = m
        members.append((m, name))
    # Links are resolved once every member is known (a symlink may point at a member that comes later).
    for m, name in members:
        if m.issym():
            _resolve_link(name, m.linkname, symlinks)
    # A tar cut short at a member boundary reads as a shorter valid tar: require the end-of-archive block.
    try:
        raw.seek(tar.offset)
        end = raw.read(BLOCK)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
    if len(end) < BLOCK or end.count(0) != BLOCK:
        raise UnsafeArchive("truncated archive: it ends before its end-of-archive block")
    return Summary(members=count, files=files, unpacked_bytes=total), members


def _open(path: str | Path) -> tuple[IO[bytes], int]:
    size = os.path.getsize(path)
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    magic = f.read(2)
    f.seek(0)
    return (gzip.GzipFile(fileobj=f, mode="rb") if magic == b"\x1f\x8b" else f), size


def check(path: str | Path, limits: Limits = Limits()) -> Summary:
    """Raise UnsafeArchive naming the first bad member (TooLarge past a limit); return what it holds."""
    raw, size = _open(path)
    try:
        with tarfile.open(fileobj=raw, mode="r:") as tar:
            return _check_open(tar, size, limits, raw)[0]
    except (EOFError, OSError, gzip.BadGzipFile, tarfile.TarError) as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
    finally:
        raw.close()


# ---- unpack --------------------------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(root_fd: int, parts: list[str], name: str, create: bool) -> int:
    """A file descriptor of directory root/parts, never through a symlink; made when `create`."""
    fd = os.dup(root_fd)
    try:
        for p in parts:
            try:
                nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(p, 0o755, dir_fd=fd)
                nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeArchive(f"{name}: {p} is a symlink or a file in the destination") from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mode(m: tarfile.TarInfo, default: int) -> int:
    return (m.mode & 0o777 or default) & ~0o022 | 0o600  # no setuid/setgid/sticky, never group/other-writable


def unpack(archive: str | Path, dest: str | Path, limits: Limits = Limits()) -> Summary:
    """Check, then extract into `dest` (made if missing) without following any symlink. On refusal, whatever
    was extracted so far stays under `dest` only; callers unpack into a fresh directory they remove."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw, size = _open(archive)
    try:
        with tarfile.open(fileobj=raw, mode="r:") as tar:
            summary, members = _check_open(tar, size, limits, raw)
            root = os.open(dest, _DIR_FLAGS)
            try:
                for m, name in members:
                    _extract(tar, m, name, root)
            finally:
                os.close(root)
        return summary
    except (EOFError, gzip.BadGzipFile, tarfile.TarError) as exc:
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from None
    finally:
        raw.close()


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, name: str, root: int) -> None:
    parts = name.split("/")
    parent = _walk(root, parts[:-1], m.name, create=True)
    leaf = parts[-1]
    try:
        if m.isdir():
            try:
                os.mkdir(leaf, _mode(m, 0o755) | 0o700, dir_fd=parent)
            except FileExistsError:
                os.close(_walk(parent, [leaf], m.name, create=False))  # a real directory made earlier: fine
            return
        if m.issym():
            try:
                os.symlink(m.linkname, leaf, dir_fd=parent)
            except FileExistsError:
                raise UnsafeArchive(f"{m.name}: exists already in the destination") from None
            return
        if m.islnk():  # a copy of the earlier file, read back through the tree we made (never a real link)
            src_parts = _parts(m.linkname)
            sdir = _walk(root, src_parts[:-1], m.name, create=False)
            try:
                src = os.open(src_parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
            finally:
                os.close(sdir)
            with os.fdopen(src, "rb") as fsrc:
                _write(leaf, parent, m, fsrc, m.name, size=os.fstat(fsrc.fileno()).st_size)
            return
        src_f = tar.extractfile(m)
        assert src_f is not None
        _write(leaf, parent, m, src_f, m.name)
    finally:
        os.close(parent)


def _write(leaf: str, parent: int, m: tarfile.TarInfo, src: IO[bytes], name: str, size: int | None = None) -> None:
    try:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _mode(m, 0o644),
                     dir_fd=parent)
    except FileExistsError:
        raise UnsafeArchive(f"{name}: exists already in the destination") from None
    with os.fdopen(fd, "wb") as out:
        left = m.size if size is None else size
        while left > 0:
            chunk = src.read(min(_READ, left))
            if not chunk:
                raise UnsafeArchive(f"{name}: truncated archive (the file's data ends early)")
            out.write(chunk)
            left -= len(chunk)


# ---- pack ----------------------------------------------------------------------------------------------------

@dataclass
class Packed:
    path: str
    sha256: str
    files: int
    size: int  # compressed bytes


class PackError(ValueError):
    """A workspace that cannot be packed (the message names the file)."""


def pack(root: Path, *, ignore: object = None, out: IO[bytes] | None = None,
         on_file: Callable[[], None] | None = None) -> Packed:
    """Pack `root` into a deterministic .tar.gz (same files -> same sha256). `ignore` is a pathspec (or None).

    Files are opened with O_NOFOLLOW and checked to be regular files after opening, so packing a tree someone
    else controls (a job's artifact directory) never reads through a link it swapped in. Symlinks are packed
    as links, and only if they stay inside. Sockets, fifos and devices are skipped."""
    root = Path(root)
    fd, tmp = tempfile.mkstemp(prefix="fedml-ws-", suffix=".tar.gz")
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
                    if d == ".git" or (ignore is not None and ignore.match_file(rel + "/")):  # type: ignore[attr-defined]
                        continue
                    if os.path.islink(os.path.join(dirpath, d)):
                        filenames.append(d)  # packed as a link, not followed
                        continue
                    keep.append(d)
                    _add(tar, root, rel, is_dir=True)
                dirnames[:] = keep
                for f in sorted(filenames):
                    rel = posixpath.join(rel_dir, f)
                    if ignore is not None and ignore.match_file(rel):  # type: ignore[attr-defined]
                        continue
                    files += _add(tar, root, rel)
                    if on_file is not None:  # progress: one more file packed
                        on_file()
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(_READ), b""):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
        return Packed(path=tmp, sha256=digest.hexdigest(), files=files, size=os.path.getsize(tmp))
    except BaseException:
        os.unlink(tmp)
        raise


def _info(rel: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if mode & 0o111 else 0o644
    return info


def _add(tar: tarfile.TarFile, root: Path, rel: str, is_dir: bool = False) -> int:
    full = root / rel
    try:
        st = os.lstat(full)
    except OSError as exc:
        raise PackError(f"{full}: cannot read: {exc.strerror}") from None
    info = _info(rel, st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        inside = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if target.startswith("/") or inside == ".." or inside.startswith("../"):
            raise PackError(f"{full}: symlink points outside the workspace ({target})")
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tar.addfile(info)
        return 1
    if is_dir or stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return 0
    if not stat.S_ISREG(st.st_mode):
        return 0
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PackError(f"{full}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped for something else since lstat
            return 0
        info.size = st.st_size
        tar.addfile(info, f)
    return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m scheduler.contract.archive pack DIR`: the tar.gz on stdout. The agent runs this as the job's user to
    pack what a job left behind (the job controls that tree; the agent's privileges never touch it)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "pack":
        sys.stderr.write("usage: python -m scheduler.contract.archive pack DIR\n")
        return 2
    try:
        packed = pack(Path(args[1]), out=sys.stdout.buffer)
    except (PackError, OSError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    os.unlink(packed.path)
    sys.stderr.write(f"{packed.files} {packed.sha256}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
