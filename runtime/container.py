"""A started container (the docker runtime's Handle): its state from the Engine, its end (exit code, OOM),
stop (SIGTERM to the whole container, then SIGKILL), and the outcome of one removed before an agent restart."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import ExitStatus, Handle, StartError, read_job_file, write_job_file
from .engine import OOM_REASON, _client

if TYPE_CHECKING:
    from .docker import DockerRuntime

log = logging.getLogger("fedml.agent")


class DockerHandle(Handle):
    def __init__(self, runtime: DockerRuntime, run_id: str, run_dir: Path, container: Any,
                 labels: dict[str, str]) -> None:
        self.runtime, self.run_id, self.run_dir, self.container = runtime, run_id, run_dir, container
        self.labels = labels
        self._status: ExitStatus | None = None
        self._stopping = False
        self._gone = False  # the container vanished under us (removed by hand, engine reset)
        self._ended = threading.Event()
        threading.Thread(target=self._wait, daemon=True, name=f"wait-{run_id}").start()

    def _wait(self) -> None:
        """Block in the Engine's wait until the container has stopped; again after a broken connection."""
        import docker

        delay = 0.1
        while True:
            client = None
            try:
                client = _client(timeout=None)  # a long job must not time the wait out
                client.api.wait(self.container.id)
                if not client.api.inspect_container(self.container.id)["State"].get("Running"):
                    self._ended.set()
                    return
            except docker.errors.NotFound:
                self._gone = True
                self._ended.set()
                return
            except (docker.errors.DockerException, StartError, OSError):
                pass  # the engine restarts or the connection broke: ask again
            finally:
                if client is not None:
                    client.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # ---- Handle -------------------------------------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        self._ended.wait(timeout)

    def poll(self) -> ExitStatus | None:
        import docker

        if self._status is not None:
            return self._status
        # The wrapper's last act is writing exit_code: seeing it saves the ~0.3 s podman takes to answer `wait`.
        if not self._ended.is_set() and not (self.run_dir / "ctr" / "exit_code").exists():
            return None
        self._status = self._exit_status()
        write_job_file(self.run_dir / "ctr" / "final",
                       f"{self._status.phase} {self._status.code} {self._status.reason or ''}".encode())
        try:
            self.runtime.remove(self.container.id)
        except (docker.errors.DockerException, OSError) as exc:  # the agent's next start sweeps it
            log.warning("run %s: container %s not removed: %s", self.run_id, self.container.id[:12], exc)
        return self._status

    def _exit_status(self) -> ExitStatus:
        import docker

        state: dict[str, Any] = {}
        if not self._gone:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                self.container.reload()
                state = self.container.attrs.get("State", {})
        if not state:
            return ExitStatus(code=137, signal=9, reason="lost: the container was removed while it ran")
        code = int(state.get("ExitCode", 0))
        phase = "job"
        try:
            p, c = (read_job_file(self.run_dir / "ctr" / "exit_code", 64) or b"").decode().split()
            if p not in ("job", "bootstrap"):
                raise ValueError(p)
            phase, code = p, int(c)
        except (UnicodeDecodeError, ValueError):
            self._engine_output()  # ended before or outside the wrapper: what the engine saw says why
        if code == 137 and not self._stopping:
            # Not asked to stop, so the kernel or someone else killed it; OOMKilled alone is not reliable.
            oom = " (the engine reports OOMKilled)" if state.get("OOMKilled") else ""
            return ExitStatus(code=137, phase=phase, signal=9, reason=OOM_REASON + oom)
        return ExitStatus(code=code, phase=phase)

    def _engine_output(self) -> None:
        """The container's own output (e.g. "exec /bin/sh: no such file"), to stderr.log. Read once the
        container has stopped, without follow: podman's followed log stream can lose lines."""
        import docker

        with contextlib.suppress(docker.errors.DockerException, OSError):
            text = self.container.logs(stdout=True, stderr=True, follow=False)
            if text:  # the file is in the job's directory: append only to a plain file, never through a link
                fd = os.open(self.log_files()["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "ab") as f:
                    f.write(text if text.endswith(b"\n") else text + b"\n")

    def stop(self, grace: float) -> None:
        import docker

        self._stopping = True
        try:
            self.container.stop(timeout=max(1, round(grace)))  # SIGTERM, then SIGKILL after `grace`
        except docker.errors.NotFound:
            self._gone = True
        except (docker.errors.DockerException, OSError):
            with contextlib.suppress(docker.errors.DockerException, OSError):
                self.container.kill()
        self._ended.wait(grace + 10)

    def log_files(self) -> dict[str, Path]:
        return log_files(self.run_dir)

    def state(self) -> dict[str, Any]:
        return {"runtime": "docker", "run_id": self.run_id, "container": self.container.id, "labels": self.labels}


def log_files(run_dir: Path) -> dict[str, Path]:
    # Written by the container's processes themselves (see WRAPPER), tailed by the agent.
    return {"stdout": run_dir / "ctr" / "stdout.log", "stderr": run_dir / "ctr" / "stderr.log"}


class _Finished(Handle):
    """A job whose container ended and was removed before the agent restarted: its recorded outcome."""

    def __init__(self, run_id: str, run_dir: Path, status: ExitStatus) -> None:
        self.run_id, self.run_dir, self._status = run_id, run_dir, status

    def poll(self) -> ExitStatus | None:
        return self._status

    def wait(self, timeout: float) -> None:
        return None

    def stop(self, grace: float) -> None:
        return None

    def log_files(self) -> dict[str, Path]:
        return log_files(self.run_dir)

    def state(self) -> dict[str, Any]:
        return {"runtime": "docker", "run_id": self.run_id}
