"""Process helpers shared by the end-to-end tests: free ports, polling, and finding a test's processes."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    """The scheduler at `url` answers /healthz with 200 (False while it refuses, resets or times out)."""
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(what: str, pred: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy; fail with `what` (and the last value) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {got!r})")
        time.sleep(every)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_processes(run_id: str, under: Path | None = None) -> list[psutil.Process]:
    """Live processes carrying the run's id in their environment (optionally: working under `under`)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDML_CURRENT_RUN_ID") != run_id or not alive(p):
                continue
            if under is not None and not p.cwd().startswith(str(under)):
                continue
            out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def cmdline(p: psutil.Process) -> str:
    """The process's command line, "" once it has exited (a zombie until its parent reaps it has none)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def our_processes(base: Path) -> list[psutil.Process]:
    """Live processes that belong to this cluster: FEDML_HOME or cmdline or cwd under `base`."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid == me or not alive(p):
                continue
            env_home = p.environ().get("FEDML_HOME", "")
            cwd = p.cwd()
            if env_home.startswith(str(base)) or str(base) in " ".join(p.cmdline()) or cwd.startswith(str(base)):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out
