"""The Runtime interface: how one rank of a run executes on a node.

A runtime writes the job's stdout and stderr to files in the run directory (the agent tails them), so a job
outlives a restart of its agent and the agent can re-attach and ship every line it has not shipped yet.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the lease guard (runtime/fence.py) starts per attempt without pydantic
    from scheduler.contract.jobspec import JobSpec
    from scheduler.contract.models import Assignment


@dataclass
class LaunchSpec:
    run_id: str
    run_dir: Path
    workspace: Path
    bootstrap: str
    job: str
    env: dict[str, str]
    rank: int = 0
    # The typed job spec (image, resources, pull policy) and the assignment (attempt, GPUs, gang, ports), for
    # runtimes that need more than commands and environment (containers, pods).
    job_spec: JobSpec | None = None
    assignment: Assignment | None = None
    # Where the runtime keeps what only the agent may touch (the job's stdout/stderr files); default run_dir.
    log_dir: Path | None = None
    # The job's user when it is not the agent's (a root agent): files the job must write are handed to it.
    uid: int | None = None
    gid: int | None = None

    def own(self, *paths: Path) -> None:
        """Hand paths the runtime just made in the job's directory to the job's user."""
        import os

        if self.uid is None:
            return
        for p in paths:
            os.chown(p, self.uid, self.gid if self.gid is not None else -1, follow_symlinks=False)


@dataclass
class ExitStatus:
    code: int
    phase: str = "job"  # "bootstrap" or "job": where a failure happened
    signal: int | None = None
    reason: str | None = None  # the runtime knows better than the code (e.g. docker: out of memory or SIGKILL)


class StartError(Exception):
    """The job could not be started (no image, engine refused): the message becomes the run's reason."""


class Handle(abc.ABC):
    """A started job. `state()` is JSON that `Runtime.reattach` turns back into a Handle after an agent
    restart."""

    run_id: str

    @abc.abstractmethod
    def poll(self) -> ExitStatus | None: ...

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds, returning early if the job may have ended."""
        import time

        time.sleep(timeout)

    @abc.abstractmethod
    def stop(self, grace: float) -> None:
        """Ask the job to end, wait up to `grace` seconds, then kill everything it started (no grace: at once)."""

    @abc.abstractmethod
    def log_files(self) -> dict[str, Path]:
        """stream name -> file the job's output of that stream is appended to."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]: ...


class Runtime(abc.ABC):
    name: str

    @abc.abstractmethod
    def start(self, spec: LaunchSpec) -> Handle: ...

    @abc.abstractmethod
    def reattach(self, state: dict[str, Any], run_dir: Path) -> Handle | None:
        """The handle of a job started by an earlier agent process, or None if it is gone without a trace."""


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, env: dict[str, str]) -> str:
    """Replace $FEDML_* / ${FEDML_*} with their values in the job text, as FedML does before running it.

    Only FEDML_ variables we set are replaced; anything else is left for bash to expand at run time.
    """

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name.startswith("FEDML_") and name in env:
            return env[name]
        return m.group(0)

    return _VAR.sub(repl, text)


# ---- files in a job's directory ------------------------------------------------------------------------------
# The job owns its run directory, so anything there may be a symlink, a fifo or huge by the time the agent (root,
# perhaps) looks. The agent reads and writes there only through these two.

def read_job_file(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The file's bytes (at most `limit`), or None if missing or not a plain file. Never follows a symlink,
    never blocks on a fifo."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(limit)


def write_job_file(path: Path, data: bytes, uid: int | None = None, gid: int | None = None) -> None:
    """Replace `path` atomically: a fresh temp file (O_EXCL, O_NOFOLLOW) renamed over it, so a symlink the job
    left there is replaced, never written through."""
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if uid is not None:
                os.fchown(f.fileno(), uid, gid if gid is not None else -1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
