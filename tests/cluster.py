"""A real head scheduler plus real agents (`fedml login --node`) on this machine, for end-to-end tests.

`start_cluster(tmp_path, names)` yields a Cluster; on the way out it logs the agents out, stops the head and
fails the test if any process of the cluster is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from scheduler.contract.transport import httpx

from .conftest import FEDML, Fedml, needs
from .procs import free_port, our_processes, wait_for

VENV_BIN = str(Path(sys.executable).parent)  # the jobs' `python3` must be the one with torch


def head_answers(head: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    """The head scheduler answers /healthz (the test fails at once, with its log, if it exited)."""
    if head.poll() is not None:
        pytest.fail(f"the head exited ({head.returncode}): {log.read_text()}")
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Cluster:
    base: Path
    port: int
    head: subprocess.Popen[bytes] | None = None
    admin: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def agents(self) -> Fedml:
        return Fedml(self.base / "agents")

    def fedml(self, *args: str, timeout: float = 60, key: str | None = None) -> subprocess.CompletedProcess[str]:
        """`fedml ARGS` as a client of the head (the admin key, or `key`)."""
        return Fedml(self.base / "client")(*args, timeout=timeout,
                                           env={"FEDML_SERVER": self.url, "FEDML_API_KEY": key or self.admin})

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return Fedml(self.base / "client").popen(*args, env={"FEDML_SERVER": self.url, "FEDML_API_KEY": self.admin})

    def json(self, *args: str) -> Any:
        r = self.fedml(*args, "--json")
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def healthy(self) -> bool:
        assert self.head is not None
        return head_answers(self.head, self.url, self.base / "head.log")

    def logs(self, run_id: str) -> dict[int, list[str]]:
        r = self.fedml("logs", run_id, "--json")
        assert r.returncode == 0, r.stderr
        by_rank: dict[int, list[str]] = {}
        for x in (json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()):
            if "line" in x:
                by_rank.setdefault(x["rank"], []).append(x["line"])
        return by_rank


def start_cluster(tmp_path: Path, names: tuple[str, ...], *, torch: bool = True,
                  heartbeat: float = 1.0, agent_env: dict[str, str] | None = None,
                  node_args: dict[str, list[str]] | None = None) -> Iterator[Cluster]:
    """`node_args`: more `fedml login` options per node name (e.g. ["--gpus", "A100-80G:1"])."""
    if torch:
        needs("torch", all(importlib.util.find_spec(m) for m in ("torch", "sklearn")),
              f"torch and scikit-learn must be importable by {sys.executable} (the jobs' python3)")
    c = Cluster(tmp_path, free_port())
    try:
        with open(tmp_path / "head.log", "ab") as log:
            c.head = subprocess.Popen(
                [FEDML, "scheduler", "start", "--port", str(c.port), "--no-agent", "--heartbeat-interval", str(heartbeat)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=Fedml(tmp_path / "head").env())
        wait_for("the head scheduler to answer /healthz", c.healthy, timeout=30)
        token = tmp_path / "head" / "local" / "token"
        c.admin = wait_for("the admin key in $FEDML_HOME/local/token",
                           lambda: token.exists() and token.read_text().strip(), timeout=10)
        env = c.agents.env({"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **(agent_env or {})})
        logins = {name: subprocess.Popen([FEDML, "login", c.admin, "--server", c.url, "--node", "--name", name,
                                          *(node_args or {}).get(name, [])],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                         stdin=subprocess.DEVNULL) for name in names}
        for name, p in logins.items():
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, (name, out, err)
            assert f"Node {name} joined {c.url}" in err, err
        yield c
    finally:
        problems = []
        if (tmp_path / "agents" / "nodes").exists():
            r = c.agents("logout", timeout=60)
            if r.returncode != 0:
                problems.append(f"fedml logout exited {r.returncode}: {r.stderr}")
        if c.head is not None and c.head.poll() is None:
            c.head.terminate()
            try:
                c.head.wait(timeout=15)
            except subprocess.TimeoutExpired:
                c.head.kill()
                problems.append("the head did not exit within 15 s of SIGTERM")
        deadline = time.monotonic() + 10
        while (left := our_processes(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in left:
            try:
                problems.append(f"leaked process {p.pid}: {' '.join(p.cmdline())}")
                p.kill()
            except psutil.Error:
                pass
        assert not problems, problems
