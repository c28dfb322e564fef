"""The embedded local scheduler: found through its state file, started in the background on first use."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scheduler.contract import paths

from .errors import UNREACHABLE, CliError

START_TIMEOUT = 20.0


def _state() -> dict[str, Any] | None:
    try:
        return json.loads(paths.state_file().read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _healthy(url: str) -> bool:
    from scheduler.contract.transport import httpx

    try:
        r = httpx.get(f"{url}/healthz", timeout=2.0, verify=False)  # plain http, loopback
    except httpx.HTTPError:
        return False
    # 503 "degraded" (its disk is full) is still our scheduler, up: commands reach it and say why they fail
    return r.status_code == 200 or (r.status_code == 503 and "degraded" in r.text)


def probably_running() -> tuple[str, str | None] | None:
    """The state file's address if its process is alive (no request made)."""
    st = _state()
    if st and alive(int(st.get("pid", 0))) and _is_scheduler(int(st["pid"])):
        return st["url"], _token()
    return None


def _token() -> str | None:
    try:
        return paths.token_file().read_text().strip() or None
    except OSError:
        return None


def running() -> tuple[str, str | None]:
    """Address and token of the local scheduler if it is up; exit 3 if not."""
    st = _state()
    if st and alive(int(st.get("pid", 0))) and _healthy(st["url"]):
        return st["url"], _token()
    raise CliError("no local scheduler is running (any `fedml launch` starts one)", UNREACHABLE)


def ensure_running() -> tuple[str, str | None]:
    st = _state()
    if st and alive(int(st.get("pid", 0))) and _healthy(st["url"]):
        return st["url"], _token()
    local = paths.local_dir()
    local.mkdir(parents=True, exist_ok=True)
    with open(local / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two CLIs starting at once: the second waits and reuses
        st = _state()
        if st and alive(int(st.get("pid", 0))) and _healthy(st["url"]):
            return st["url"], _token()
        url = _start(local)
    return url, _token()


def _start(local: Path) -> str:
    log_path = local / "scheduler.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            # One person's own machine, on loopback: its jobs run as that person (docs/security.md).
            [sys.executable, "-m", "scheduler.server", "--home", str(paths.home()), "--quiet", "--run-as", "self"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        st = _state()
        if st and st.get("pid") == proc.pid and _healthy(st["url"]):
            print(f"Started the local scheduler at {st['url']} (state in {local}; "
                  "`fedml scheduler stop` stops it)", file=sys.stderr)
            return str(st["url"])
        if proc.poll() is not None:
            tail = _tail(log_path)
            raise CliError(f"the local scheduler failed to start (exit {proc.returncode}); see {log_path}"
                           + (f": {tail}" if tail else ""), UNREACHABLE)
        time.sleep(0.02)
    raise CliError(f"the local scheduler did not answer within {START_TIMEOUT:.0f} s; see {log_path}", UNREACHABLE)


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def stop(timeout: float = 10.0) -> list[str]:
    """Stop the local scheduler and its agent. Returns what was stopped. Jobs keep running."""
    stopped = []
    st = _state()
    pids: list[tuple[str, int]] = []
    if st and alive(int(st.get("pid", 0))):
        pids.append((f"scheduler (pid {st['pid']}, {st['url']})", int(st["pid"])))
    try:
        apid = int((paths.local_dir() / "agent" / "agent.pid").read_text().strip())
        if alive(apid) and _is_agent(apid):
            pids.append((f"agent (pid {apid})", apid))
    except (OSError, ValueError):
        pass
    for what, pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # the scheduler stops its agent itself
            stopped.append(what)
            continue
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(what)
    return stopped


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_agent(pid: int) -> bool:
    return b"agents.agent" in _cmdline(pid)


def _is_scheduler(pid: int) -> bool:
    # A pid from a stale state file may now belong to anything; `fedml scheduler start` runs in `fedml`.
    cmd = _cmdline(pid)
    return b"scheduler.server" in cmd or any(c.endswith(b"fedml") for c in cmd)
