"""Who a job runs as, and what that user may reach.

An agent running as root (the systemd unit; CI) runs every job as an unprivileged account (`--run-as USER`,
default `fedml-job`, created here if missing), so a job cannot read the agent's key, its node token or the
scheduler's files. An agent that is not root cannot do that: its jobs run as its own user, and the node is
single-tenant (the scheduler places only its owner's runs there).

The job user needs the interpreter and packages the agent runs with (the templates' `python3`), which may live
under a 0700 home (pyenv in /root, a venv in a home directory). Rather than loosen those directories for
everyone, `grant_traverse` gives the job user alone search (x, never read) on the directories in the way, with
a POSIX ACL entry. Listing them or reading files in them still follows their own modes.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "fedml-job"
_ACL = "system.posix_acl_access"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


class JobUserError(RuntimeError):
    pass


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int

    @property
    def separate(self) -> bool:
        """Jobs run as another user than the agent: the node can be shared between users."""
        return self.uid != os.getuid()


def current() -> JobUser:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return JobUser(name=name, uid=uid, gid=os.getgid())


def resolve(run_as: str | None) -> JobUser:
    """`--run-as`: None/"auto" = fedml-job when root, else ourselves; "self" = ourselves; else that user (made
    if it is the default name and missing)."""
    if run_as in (None, "", "auto"):
        run_as = DEFAULT_USER if os.getuid() == 0 else "self"
    if run_as == "self":
        return current()
    if os.getuid() != 0:
        raise JobUserError(f"--run-as {run_as}: only an agent running as root can run jobs as another user")
    try:
        pw = pwd.getpwnam(run_as)
    except KeyError:
        if run_as != DEFAULT_USER:
            raise JobUserError(f"--run-as {run_as}: no such user") from None
        pw = _create(run_as)
    if pw.pw_uid == 0:
        raise JobUserError(f"--run-as {run_as}: that is root; jobs must run unprivileged")
    return JobUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid)


def _create(name: str) -> pwd.struct_passwd:
    import fcntl

    # One creator at a time across agents (useradd's own locking let two racing agents both "succeed").
    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
    with open(os.path.join(lock_dir, "fedml-useradd.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _create_locked(name)


def _create_locked(name: str) -> pwd.struct_passwd:
    tool = shutil.which("useradd") or "/usr/sbin/useradd"
    shell = shutil.which("nologin") or "/usr/sbin/nologin"
    err = ""
    for _ in range(50):  # agents starting together race for /etc/passwd's lock: the loser tries again
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        r = subprocess.run([tool, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", shell, name], capture_output=True, text=True)
        if r.returncode in (0, 9):  # 9: it appeared meanwhile (another agent made it)
            return pwd.getpwnam(name)
        err = r.stderr.strip() or str(r.returncode)
        time.sleep(0.1)
    raise JobUserError(f"cannot create the job user {name}: {err}")


# ---- reach ------------------------------------------------------------------------------------------------

def _can_search(st: os.stat_result, user: JobUser) -> bool:
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _entries(path: str, mode: int) -> list[tuple[int, int, int]]:
    try:
        blob = os.getxattr(path, _ACL, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, getattr(errno, "ENOATTR", errno.ENODATA)):
            raise
        return [(_USER_OBJ, (mode >> 6) & 7, _NO_ID), (_GROUP_OBJ, (mode >> 3) & 7, _NO_ID),
                (_OTHER, mode & 7, _NO_ID)]
    return [struct.unpack_from("<HHI", blob, 4 + 8 * i) for i in range((len(blob) - 4) // 8)]


def _add_search(path: str, uid: int) -> None:
    st = os.stat(path, follow_symlinks=False)
    ents = _entries(path, st.st_mode)
    mine = next((e for e in ents if e[0] == _USER and e[2] == uid), None)
    ents = [e for e in ents if e is not mine]
    ents.append((_USER, (mine[1] if mine else 0) | 1, uid))
    group_obj = next(e[1] for e in ents if e[0] == _GROUP_OBJ)
    mask = next((e for e in ents if e[0] == _MASK), None)
    ents = [e for e in ents if e[0] != _MASK]
    # The mask caps named entries and the owning group alike: keep what it allowed (the owning group's bits when
    # there was none), add search. The owning group's own entry is unchanged, so its members gain nothing.
    ents.append((_MASK, (mask[1] if mask else group_obj) | 1, _NO_ID))
    ents.sort(key=lambda e: (e[0], e[2]))
    os.setxattr(path, _ACL, struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents),
                follow_symlinks=False)


def grant_traverse(paths: list[str | Path], user: JobUser) -> list[str]:
    """Give `user` search permission on every directory above `paths` (and on directories in `paths`) that it
    lacks. Returns the directories changed."""
    changed: list[str] = []
    if not user.separate:
        return changed
    seen: set[str] = set()
    for p in paths:
        try:
            real = os.path.realpath(p)
        except OSError:
            continue
        node = real if os.path.isdir(real) else os.path.dirname(real)
        chain = []
        while True:
            chain.append(node)
            parent = os.path.dirname(node)
            if parent == node:
                break
            node = parent
        for d in reversed(chain):
            if d in seen:
                continue
            seen.add(d)
            try:
                st = os.stat(d)
                if not _can_search(st, user):
                    _add_search(d, user.uid)
                    changed.append(d)
            except OSError as exc:
                raise JobUserError(f"cannot let the job user {user.name} reach {d}: {exc.strerror}") from None
    return changed


def interpreter_paths() -> list[str]:
    """What a job needs to run the agent's Python and its packages (the templates' `python3`)."""
    out = {sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix}
    out.update(p for p in sys.path if p and os.path.isdir(p))
    out.update(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and os.path.isdir(p))
    return sorted(out)


def chown_tree(root: Path, user: JobUser) -> None:
    """Hand a tree the agent just made (nobody else could reach it yet) to the job user, never following links."""
    if not user.separate:
        return
    os.chown(root, user.uid, user.gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.uid, user.gid, follow_symlinks=False)
