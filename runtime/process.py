"""The process runtime: bootstrap then job under `bash -e`, in their own session and process group.

Layout of a run directory:
    workspace/      the unpacked workspace; the job's working directory
    bootstrap.sh    job.sh    wrapper.sh
    exit_code ("job 0", "bootstrap 3"; written by wrapper.sh)
and in the log directory (the agent's, out of the job's reach when the job runs as another user):
    stdout.log      stderr.log
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .base import ExitStatus, Handle, LaunchSpec, Runtime, read_job_file, substitute

WRAPPER = r"""# written by the fedml agent; runs bootstrap then job with `set -e` semantics
# A stop signals the whole group: the wrapper outlives its child (which gets the signal too, and may take its
# grace to save a checkpoint), since the agent kills what is left of the group once the wrapper is gone. (A
# handler, not an ignore: children start with it reset to the default, and can trap it themselves.)
trap ':' TERM INT
cd "$FEDML_WORKSPACE_DIR" || exit 1
if [ -s "$FEDML_RUN_DIR/bootstrap.sh" ]; then
    bash -e "$FEDML_RUN_DIR/bootstrap.sh"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "bootstrap $rc" > "$FEDML_RUN_DIR/exit_code"
        exit $rc
    fi
fi
bash -e "$FEDML_RUN_DIR/job.sh"
rc=$?
echo "job $rc" > "$FEDML_RUN_DIR/exit_code"
exit $rc
"""


class ProcessHandle(Handle):
    def __init__(self, run_id: str, run_dir: Path, pid: int, create_time: float,
                 popen: subprocess.Popen[bytes] | None = None, log_dir: Path | None = None,
                 uid: int | None = None) -> None:
        self.run_id, self.run_dir, self.pid, self.create_time = run_id, run_dir, pid, create_time
        self.log_dir = log_dir or run_dir
        self.uid = uid
        self._popen = popen
        self._status: ExitStatus | None = None
        self._swept = False
        self._exited = threading.Event()
        if popen is not None:
            # Wakes the agent the moment the job ends, instead of at its next look.
            threading.Thread(target=lambda: (popen.wait(), self._exited.set()), daemon=True,
                             name=f"wait-{run_id}").start()

    def wait(self, timeout: float) -> None:
        self._exited.wait(timeout)

    def _alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def poll(self) -> ExitStatus | None:
        if self._status is not None:
            return self._status
        if self._alive():
            return None
        self._kill_group(signal.SIGKILL)  # background children the job left behind
        if not self._swept:  # and what left the group (a serve supervisor's replicas, setsid daemons)
            sweep(self.run_dir, self.uid)
        self._status = self._read_exit()
        return self._status

    def _read_exit(self) -> ExitStatus:
        try:
            phase, code = (read_job_file(self.run_dir / "exit_code", 64) or b"").decode().split()
            if phase not in ("job", "bootstrap"):
                raise ValueError(phase)
            return ExitStatus(code=int(code), phase=phase)
        except (UnicodeDecodeError, ValueError):
            rc = self._popen.returncode if self._popen is not None else None
            if rc is not None and rc < 0:
                return ExitStatus(code=128 - rc, signal=-rc)
            return ExitStatus(code=rc if rc is not None else 137, signal=None if rc is not None else 9)

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # start_new_session: the wrapper's pid is the group id
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float) -> None:
        # With no grace (the fence's kill), SIGKILL alone: a SIGTERM just before it gives no one time to save
        # anything, but can let the job's shell print "Terminated" for a child it lost, a line the job never wrote.
        if grace > 0:
            self._kill_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self._alive() and not self._group_alive():
                    break
                time.sleep(0.05)
        self._kill_group(signal.SIGKILL)
        sweep(self.run_dir, self.uid)
        self._swept = True  # poll() need not walk every process again
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def log_files(self) -> dict[str, Path]:
        return {"stdout": self.log_dir / "stdout.log", "stderr": self.log_dir / "stderr.log"}

    def state(self) -> dict[str, Any]:
        return {"runtime": "process", "run_id": self.run_id, "pid": self.pid, "create_time": self.create_time,
                "log_dir": str(self.log_dir), "uid": self.uid}


def sweep(run_dir: Path, uid: int | None = None) -> int:
    """Kill processes of this job that left its process group (setsid, double fork): every process of
    the job's user whose environment carries FEDML_RUN_DIR=<this attempt's directory>. (Not the run id:
    another rank or attempt of the same run may be running on this machine.)"""
    killed = 0
    me = os.getuid() if uid is None else uid
    needle = str(run_dir)
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or p.pid == os.getpid():
                continue
            if p.environ().get("FEDML_RUN_DIR") == needle:
                p.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return killed


class ProcessRuntime(Runtime):
    name = "process"

    def start(self, spec: LaunchSpec) -> ProcessHandle:
        d = spec.run_dir
        logs = spec.log_dir or d
        d.mkdir(parents=True, exist_ok=True)
        spec.workspace.mkdir(parents=True, exist_ok=True)
        scripts = {"bootstrap.sh": substitute(spec.bootstrap, spec.env) + "\n",
                   "job.sh": substitute(spec.job, spec.env) + "\n", "wrapper.sh": WRAPPER}
        for name, text in scripts.items():
            (d / name).unlink(missing_ok=True)
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            spec.own(d / name)
        (d / "exit_code").unlink(missing_ok=True)
        env = {**spec.env, "FEDML_RUN_DIR": str(d), "FEDML_WORKSPACE_DIR": str(spec.workspace)}
        as_user: dict[str, Any] = {}
        if spec.uid is not None:  # a root agent: the job gets no privilege, no group, nothing of ours
            as_user = {"user": spec.uid, "group": spec.gid, "extra_groups": []}
        with open(logs / "stdout.log", "ab") as out, open(logs / "stderr.log", "ab") as err:
            popen = subprocess.Popen(["bash", str(d / "wrapper.sh")], cwd=spec.workspace, env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=err, umask=0o022,
                                     start_new_session=True, close_fds=True, **as_user)
        try:
            created = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            created = time.time()
        return ProcessHandle(spec.run_id, d, popen.pid, created, popen, log_dir=logs, uid=spec.uid)

    def reattach(self, state: dict[str, Any], run_dir: Path) -> ProcessHandle | None:
        if state.get("runtime") != "process" or "pid" not in state:
            return None
        log_dir = Path(state["log_dir"]) if state.get("log_dir") else None
        uid = int(state["uid"]) if state.get("uid") is not None else None
        return ProcessHandle(str(state.get("run_id", run_dir.name)), run_dir, int(state["pid"]),
                             float(state["create_time"]), log_dir=log_dir, uid=uid)
