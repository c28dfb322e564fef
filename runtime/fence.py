"""The lease guard: one small process per running attempt that kills the attempt when the node's lease expires.

    python -m runtime.fence --lease HOME/lease --marker RUNS/<ref>/fenced --state '<handle state JSON>' --run-dir D
    python -m runtime.fence --serve     (the agent's spawner: forks a guard per request, see Spawner)

Why: the scheduler gives up on a node it has not heard from for `offline timeout` seconds and may start the run's
next attempt elsewhere. The job must be dead by then, whatever happened to the agent (SIGKILLed, SIGSTOPped,
partitioned): so the agent holds a lease that it renews with every poll the scheduler answers, and this guard,
which is not the agent (it outlives it, as the job does), kills the job's whole process group (or container) once
the lease has run out. The scheduler's offline timeout is longer than the lease plus a slack, so when it declares
the node lost, the old attempt is already gone (Nomad's `stop_after_client_disconnect`, made the rule).

The lease file holds the CLOCK_BOOTTIME second at which the lease expires (boot time: the same clock for every
process of the machine, not moved by NTP, and counting time spent suspended), then the lease's length. No file,
or one that cannot be read: expired. The guard exits by itself when the job ends.

One exception keeps jobs alive across a scheduler restart: while the agent positively knows that no scheduler is
running (its connection is refused: nothing listens at the address; the embedded scheduler's state file is gone),
it extends the lease. No scheduler, no one to write the node off, and a scheduler that starts gives every node a
full offline timeout to check in before it does. A timeout or an unreachable network proves nothing, and the lease
runs out. (With scheduler replicas, agents must reach them through one balanced address, as docs/design.md says:
a refused connection to one replica would not prove the others are down.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

CLOCK = time.CLOCK_BOOTTIME


def now() -> float:
    return time.clock_gettime(CLOCK)


def renew(path: Path, until: float, length: float) -> None:
    """Write the lease (the agent, after the scheduler answered a poll sent at `until - length`)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{until:.3f} {length:.3f}\n")
    os.replace(tmp, path)


def read(path: Path) -> tuple[float, float]:
    """(expiry, length); (0, 0) when there is no readable lease."""
    try:
        with open(path) as f:
            parts = f.read(128).split()
        return float(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def expiry(path: Path) -> float:
    return read(path)[0]


def hold(path: Path) -> float:
    """Extend an existing lease by its length from now (the scheduler is known to be down). Returns the length."""
    until, length = read(path)
    if length > 0 and until > 0:
        renew(path, max(until, now() + length), length)
    return length


PARKED = 10 * 365 * 86400.0


def park(path: Path) -> None:
    """The embedded scheduler was stopped on purpose (`fedml scheduler stop`: its state file is gone) and its
    agent exits: jobs keep running. No scheduler can write this node off until one starts again, and a starting
    one restarts this agent first (which re-attaches and renews) and gives every node a full offline timeout."""
    _, length = read(path)
    renew(path, now() + PARKED, length)


def guard(lease: Path, marker: Path, handle, period: float = 0.1) -> str:  # type: ignore[no-untyped-def]
    """Watch until the job ends ("ended") or the lease runs out ("fenced": the job is killed first).

    It sleeps until the lease's expiry or `period`, whichever is first, so an expiry is acted on when it comes
    and a lease shortened meanwhile (a scheduler restarted with a shorter interval) within `period`. A process
    job's end wakes it through a pidfd, so it does not ask for the job's state at all: a node runs one guard per
    attempt, and 40 guards polling at 10 Hz took more than half a core of a 2-core node."""
    exited = _exit_fd(handle)
    try:
        while True:
            if exited is None and handle.poll() is not None:
                return "ended"
            left = expiry(lease) - now()
            if left <= 0:
                # The marker first: the agent, if it wakes up, must read the job's end as fenced, not as a failure.
                with contextlib.suppress(OSError):
                    marker.write_text(json.dumps({"at": time.time(), "lease": str(lease)}))
                handle.stop(0.0)  # SIGKILL to the group (or the container) and a sweep of what escaped it
                return "fenced"
            wait = min(period, max(left, 0.01))
            if exited is None:
                time.sleep(wait)
            elif select.select([exited], [], [], wait)[0]:
                if handle.poll() is not None:  # reaps what the job left behind, as the agent's poll does
                    return "ended"
                os.close(exited)  # cannot be (the process is gone), but never spin on a readable fd
                exited = None
    finally:
        if exited is not None:
            os.close(exited)


def _exit_fd(handle) -> int | None:  # type: ignore[no-untyped-def]
    """A pidfd that becomes readable when the job's process exits (Linux 5.3+), or None (the guard polls)."""
    pid = getattr(handle, "pid", None)
    if not isinstance(pid, int) or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    # Still the job after the fd was opened (same process, by its start time): the fd is the job's, not that
    # of a process that reused its pid.
    if handle.poll() is not None:
        os.close(fd)
        return None
    return fd


def spawn(lease: Path, marker: Path, state: dict, run_dir: Path) -> int:  # type: ignore[type-arg]
    """Start a guard for a started job (detached: it survives the agent). Returns its pid.

    Forked by this process's spawner (below): a fresh interpreter per attempt cost ~50 ms of CPU, and 60 trivial
    jobs started at once took 3.6 s to end on a 2-core node instead of 1.1 s. Started directly where the spawner
    cannot be had."""
    pid = _spawner.spawn(lease, marker, state, run_dir)
    return pid if pid is not None else _spawn_process(lease, marker, state, run_dir)


def _guard_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FEDML_RUN")}


def _spawn_process(lease: Path, marker: Path, state: dict, run_dir: Path) -> int:  # type: ignore[type-arg]
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "runtime.fence", "--lease", str(lease), "--marker", str(marker),
                          "--run-dir", str(run_dir), "--state", json.dumps(state)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, cwd="/", env=_guard_env())
    # Reaped in the background so the agent does not keep a zombie (the guard's exit status means nothing).
    import threading

    threading.Thread(target=p.wait, daemon=True, name=f"fence-{p.pid}").start()
    return p.pid


class Spawner:
    """A small helper process (`python -m runtime.fence --serve`, single-threaded, this module and the process
    runtime loaded) that forks a guard for each request on its stdin and answers with the guard's pid. A fork of
    it costs ~1 ms. It exits when its stdin closes (the agent is gone); the guards, each in a session of its own,
    go on. One request at a time (the agent's workers share it); None where it is not answering (the caller
    starts the guard directly, and the next request starts a new helper)."""

    TIMEOUT = 10.0  # seconds for an answer: a stuck helper must not hold a job's start

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._proc: Any = None

    def spawn(self, lease: Path, marker: Path, state: dict, run_dir: Path) -> int | None:  # type: ignore[type-arg]
        req = json.dumps({"lease": str(lease), "marker": str(marker), "run_dir": str(run_dir), "state": state})
        with self._lock:
            try:
                proc = self._started()
                proc.stdin.write(req.encode() + b"\n")
                proc.stdin.flush()
                if not select.select([proc.stdout], [], [], self.TIMEOUT)[0]:
                    raise TimeoutError("the guard spawner did not answer")
                return int(json.loads(proc.stdout.readline())["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                self._stop()
                return None

    def _started(self) -> Any:
        import subprocess

        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "runtime.fence", "--serve"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                          close_fds=True, cwd="/", env=_guard_env())
        return self._proc

    def _stop(self) -> None:
        import subprocess

        if self._proc is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=5)
            for pipe in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
            self._proc = None


_spawner = Spawner()


def serve() -> int:
    """The spawner's side: one JSON request a line on stdin, one `{"pid": N}` a line on stdout."""
    import signal

    from .process import ProcessRuntime  # noqa: F401 - loaded once here, not in every guard

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # guards are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin.buffer:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the guard: its own session, nothing of the agent's pipes, nothing of the helper's loop
            rc = 1
            try:
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
                rc = _watch(Path(req["lease"]), Path(req["marker"]), Path(req["run_dir"]), req["state"])
            finally:
                os._exit(rc)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
    return 0


class _Container:
    """A container, as the guard sees it: ended once its wrapper wrote its exit code or the engine lost it.
    (Not the runtime's handle: that one also settles and removes the container, which is the agent's to do.)"""

    def __init__(self, container_id: str, run_dir: Path) -> None:
        self.id, self.run_dir = container_id, run_dir
        self._client = None
        self._checked = 0.0

    def _container(self):  # type: ignore[no-untyped-def]
        from .docker import _client

        if self._client is None:
            self._client = _client()
        return self._client.containers.get(self.id)

    def poll(self) -> object | None:
        ctr = self.run_dir / "ctr"
        if (ctr / "exit_code").exists() or (ctr / "final").exists():
            return "ended"
        if time.monotonic() - self._checked > 2.0:
            self._checked = time.monotonic()
            try:
                if self._container().status in ("exited", "dead"):
                    return "ended"
            except Exception as exc:  # NotFound: removed; anything else: ask again later
                if type(exc).__name__ == "NotFound":
                    return "ended"
        return None

    def stop(self, grace: float) -> None:
        for _ in range(20):
            try:
                self._container().kill()
                return
            except Exception as exc:
                if type(exc).__name__ == "NotFound":
                    return
                time.sleep(0.25)


def _watch(lease: Path, marker: Path, run_dir: Path, state: dict) -> int:  # type: ignore[type-arg]
    """Guard the job `state` names until it ends or is fenced (exit 0); 2 for a runtime no guard can watch."""
    rt = state.get("runtime", "process")
    if rt == "process":
        from .process import ProcessRuntime

        handle = ProcessRuntime().reattach(state, run_dir)
        period = 0.5  # the pidfd says when the job ends; this only bounds how late a shortened lease is seen
    elif rt == "docker" and state.get("container"):
        handle = _Container(str(state["container"]), run_dir)
        period = 0.5
    else:
        return 2
    if handle is None:
        return 0
    guard(lease, marker, handle, period)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--serve"]:
        return serve()
    p = argparse.ArgumentParser(prog="fedml-fence")
    p.add_argument("--lease", type=Path, required=True)
    p.add_argument("--marker", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--state", required=True)
    a = p.parse_args(args)
    return _watch(a.lease, a.marker, a.run_dir, json.loads(a.state))


if __name__ == "__main__":
    sys.exit(main())
