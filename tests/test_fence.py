"""The lease guard's loop (runtime/fence.py) over a real child process: it acts at the lease's expiry, sees a
lease shortened meanwhile, learns of the job's end from a pidfd without polling it, and costs little while it waits.

The handle is a small stand-in for a runtime's handle (the guard needs `pid`, `poll` and `stop`); the job is a real
process and the lease a real file."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runtime import fence

from .procs import alive, wait_for

pytestmark = pytest.mark.unit


class Job:
    def __init__(self, seconds: float) -> None:
        self.proc = subprocess.Popen(["sleep", str(seconds)])
        self.pid = self.proc.pid
        self.polls = 0
        self.stopped = False

    def poll(self) -> int | None:
        self.polls += 1
        return self.proc.poll()

    def stop(self, grace: float) -> None:
        self.stopped = True
        self.proc.kill()
        self.proc.wait()


def lease(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / "lease"
    fence.renew(path, fence.now() + seconds, seconds)
    return path


def test_an_ended_job_ends_the_guard_at_once_without_polling_it(tmp_path: Path) -> None:
    job = Job(0.3)
    t0 = time.monotonic()
    assert fence.guard(lease(tmp_path, 30), tmp_path / "fenced", job, period=5.0) == "ended"
    assert time.monotonic() - t0 < 2.0, "the guard noticed the end only after its period (no pidfd wake-up)"
    assert job.polls <= 3 and not job.stopped and not (tmp_path / "fenced").exists()


def test_an_expired_lease_kills_the_job_when_it_expires_and_marks_it(tmp_path: Path) -> None:
    job = Job(60)
    t0 = time.monotonic()
    assert fence.guard(lease(tmp_path, 0.5), tmp_path / "fenced", job, period=5.0) == "fenced"
    took = time.monotonic() - t0
    assert 0.4 < took < 2.0, f"fenced after {took:.2f} s, the lease ran 0.5 s"
    assert job.stopped and job.proc.returncode is not None and (tmp_path / "fenced").exists()


def test_renewals_keep_the_job_and_a_shortened_lease_is_seen_within_the_period(tmp_path: Path) -> None:
    job = Job(60)
    path = lease(tmp_path, 1.0)
    stop = threading.Event()

    def renew() -> None:  # the agent's answered polls, then a scheduler that hands out a 0.2 s lease
        while not stop.wait(0.2):
            fence.renew(path, fence.now() + 1.0, 1.0)
        fence.renew(path, fence.now() + 0.2, 0.2)
    t = threading.Thread(target=renew)
    t.start()
    threading.Timer(1.5, stop.set).start()  # 1.5 s of renewals: longer than the first lease
    t0 = time.monotonic()
    assert fence.guard(path, tmp_path / "fenced", job, period=0.3) == "fenced"
    t.join()
    took = time.monotonic() - t0
    assert 1.5 < took < 2.6, f"fenced after {took:.2f} s: renewals ran 1.5 s, then a 0.2 s lease (seen in 0.3 s)"


def test_a_waiting_guard_costs_almost_no_cpu(tmp_path: Path) -> None:
    """The reason for the pidfd: dozens of guards per node. 2 s of waiting must cost well under 1 % of a core."""
    job = Job(2.0)
    # The guard runs in this thread: its CPU alone (RUSAGE_SELF also counted whatever other threads of the test
    # process did meanwhile, and failed a CI run at 24.7 ms).
    before = resource.getrusage(resource.RUSAGE_THREAD)
    assert fence.guard(lease(tmp_path, 30), tmp_path / "fenced", job, period=0.5) == "ended"
    after = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.02, f"{cpu * 1000:.1f} ms of CPU in 2 s of guarding"
    assert job.polls <= 3


def test_without_a_pid_it_polls_the_handle(tmp_path: Path) -> None:
    """Containers have no pid here: the guard asks the handle every period."""
    job = Job(0.5)
    job.pid = None  # type: ignore[assignment]
    assert fence.guard(lease(tmp_path, 30), tmp_path / "fenced", job, period=0.05) == "ended"
    assert job.polls >= 5
    assert os.path.exists(path := tmp_path / "lease") and fence.expiry(path) > fence.now()


# ---- the spawner: guards forked by a helper process ---------------------------------------------------------

def _job(tmp_path: Path, seconds: float) -> tuple[subprocess.Popen[bytes], dict[str, object], Path]:
    """A real job in a process group of its own, and the state its runtime handle would save."""
    import psutil

    proc = subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    run_dir = tmp_path / f"run-{proc.pid}"
    run_dir.mkdir()
    state = {"runtime": "process", "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
             "run_id": run_dir.name}
    return proc, state, run_dir


def _gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie its parent has not reaped yet)."""
    import psutil

    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


def test_guards_forked_by_the_spawner_fence_their_job_and_outlive_the_spawner(tmp_path: Path) -> None:
    """A guard forked by the spawner is a process of its own session (a terminal's Ctrl-C or the agent's death
    does not reach it), keeps guarding once the spawner is gone, and fences its job at the lease's expiry; the
    next request starts a new spawner."""
    import psutil

    spawner = fence.Spawner()
    try:
        path = lease(tmp_path, 2.0)
        job, state, run_dir = _job(tmp_path, 60)
        pid = spawner.spawn(path, run_dir / "fenced", state, run_dir)
        assert pid is not None
        helper = spawner._proc.pid
        assert psutil.Process(pid).ppid() == helper
        # (its first act, just after the fork)
        wait_for("the guard's own session", lambda: os.getsid(pid) == pid, timeout=10, every=0.02)
        spawner._proc.kill()  # the agent, and with it the spawner, gone
        spawner._proc.wait()
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # the guard goes on
        job.wait(timeout=15)  # killed by the guard when the lease ran out (no one renews it)
        assert (run_dir / "fenced").exists()
        wait_for("the guard to exit", lambda: _gone(pid), timeout=10)

        path = lease(tmp_path, 30)
        job, state, run_dir = _job(tmp_path, 0.5)
        pid = spawner.spawn(path, run_dir / "fenced", state, run_dir)
        assert pid is not None and spawner._proc.pid != helper  # a new spawner
        job.wait(timeout=15)
        wait_for("the guard to exit with its job", lambda: _gone(pid), timeout=10)
        assert not (run_dir / "fenced").exists()
    finally:
        spawner._stop()


def test_a_spawner_that_does_not_answer_is_replaced_by_a_guard_of_its_own_process(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    stuck = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    monkeypatch.setattr(fence._spawner, "_proc", stuck)
    monkeypatch.setattr(fence.Spawner, "TIMEOUT", 0.5)
    job, state, run_dir = _job(tmp_path, 60)
    try:
        pid = fence.spawn(lease(tmp_path, 30), run_dir / "fenced", state, run_dir)
        assert stuck.wait(timeout=5) is not None  # the stuck one was killed
        assert "--lease" in psutil.Process(pid).cmdline() and os.getsid(pid) == pid  # (a session from its start)
    finally:
        job.kill()
        job.wait()
        fence._spawner._stop()
    wait_for("the guard to exit", lambda: _gone(pid), timeout=10)
