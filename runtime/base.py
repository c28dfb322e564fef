"""The Runtime interface: how one rank of a run executes on a node.

A runtime writes the job's stdout and stderr to files in the run directory (the agent tails them), so a job
outlives a restart of its agent and the agent can re-attach and ship every line it has not shipped yet.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LaunchSpec:
    run_id: str
    run_dir: Path
    workspace: Path
    bootstrap: str
    job: str
    env: dict[str, str]
    rank: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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
        """Ask the job to end, wait up to `grace` seconds, then kill everything it started."""

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
