"""Scheduler replicas on one Redis, for the load and fault tests: real processes over real HTTP.

    replicas (python -m scheduler.server --store redis://...?prefix=P, each its own --home, one --blob-dir)
        behind a TCP load balancer (tests/lb.py: one address, a dead replica skipped)
    agents   (python -m agents.agent --server LB --gpus T4:2 ...), each its own home

Everything lives under one temp dir and one Redis key prefix; `close()` kills every process it started and
wipes the prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from scheduler.contract.transport import httpx

from .procs import answers, free_port, wait_for
from .test_store_contract import redis_url

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("FINISHED", "FAILED", "KILLED")


@dataclass
class Replicas:
    base: Path
    n: int = 2
    heartbeat: float = 1.0
    host: str = "127.0.0.1"  # where the balancer listens (a namespace test adds its bridge address)
    url: str = field(default_factory=redis_url)
    admin: str = field(default_factory=lambda: "fml_a_" + secrets.token_urlsafe(24))
    ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    lb_port: int = 0
    _http: httpx.Client | None = None

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(self.n)]
        self.lb_port = free_port()

    @property
    def server(self) -> str:
        return f"http://{self.host}:{self.lb_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
        env.update(FEDML_STOP_GRACE="2", PYTHONDONTWRITEBYTECODE="1", **extra)
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], prefix: list[str] | None = None) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        self.procs[name] = subprocess.Popen([*(prefix or []), *cmd], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, env=env, cwd=ROOT, start_new_session=True)
        log.close()

    def log(self, name: str) -> str:
        try:
            return (self.base / f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- replicas ----------------------------------------------------------------------------------------
    def start_replica(self, i: int, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "scheduler.server", "--store", self.url, "--home", str(self.base / f"r{i}"),
               "--blob-dir", str(self.base / "blobs"), "--host", "127.0.0.1", "--port", str(self.ports[i]),
               "--no-agent", "--quiet", "--heartbeat-interval", str(self.heartbeat), "--max-workspace-mb", "1"]
        self._spawn(f"r{i}", cmd, self.env(FEDML_ADMIN_KEY=self.admin, FEDML_HOME=str(self.base / f"r{i}")))
        if wait:
            self.wait_replica(i)

    def wait_replica(self, i: int, timeout: float = 30) -> None:
        def up() -> bool:
            p = self.procs[f"r{i}"]
            if p.poll() is not None:
                pytest.fail(f"replica {i} exited with {p.returncode}: {self.log(f'r{i}')}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.ports[i]}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(f"replica {i} to answer", up, timeout=timeout, every=0.05)

    def kill_replica(self, i: int) -> None:
        p = self.procs[f"r{i}"]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def start(self) -> Replicas:
        for i in range(self.n):
            self.start_replica(i, wait=False)
        for i in range(self.n):
            self.wait_replica(i)
        self._spawn("lb", [sys.executable, "-m", "tests.lb", "--listen", f"{self.host}:{self.lb_port}",
                           *[a for p in self.ports for a in ("--backend", f"127.0.0.1:{p}")]], self.env())
        wait_for("the balancer to answer", lambda: answers(self.server), timeout=15, every=0.05)
        return self

    # -- agents ------------------------------------------------------------------------------------------
    def start_agent(self, name: str, gpus: str = "T4:2", netns: str | None = None, server: str | None = None,
                    address: str = "127.0.0.1") -> None:
        home = self.base / "agents" / name
        home.mkdir(parents=True, exist_ok=True)
        key_file = home / ".join-key"  # the agent deletes it once read: keys never go by argv or environment
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.admin)
        cmd = [sys.executable, "-m", "agents.agent", "--server", server or self.server, "--home",
               str(home), "--name", name, "--gpus", gpus, "--address", address, "--key-file", str(key_file)]
        prefix = ["ip", "netns", "exec", netns] if netns else None
        self._spawn(f"agent-{name}", cmd, self.env(), prefix=prefix)

    def agent_pid(self, name: str) -> int:
        return int((self.base / "agents" / name / "agent.pid").read_text().strip())

    def wait_nodes(self, names: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
        def online() -> dict[str, dict[str, Any]] | None:
            nodes = {n["name"]: n for n in self.api().get("/nodes").json()}
            return nodes if all(nodes.get(x, {}).get("state") == "ONLINE" for x in names) else None
        return wait_for(f"nodes {names} to be online", online, timeout=timeout, every=0.2)

    # -- API ---------------------------------------------------------------------------------------------
    def api(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.server + "/api/v1", timeout=30,
                                      headers={"Authorization": f"Bearer {self.admin}"})
        return self._http

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One API call through the balancer, retried while a replica is being restarted."""
        for attempt in range(50):
            try:
                return self.api().request(method, path, **kw)
            except httpx.TransportError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def runs(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        got = self.call("GET", "/runs", params={"limit": 100_000}).json()
        mine = set(ids)
        return {r["id"]: r for r in got if r["id"] in mine}

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            runs = self.runs(ids)
            return runs if len(runs) == len(ids) and all(r["status"] in TERMINAL for r in runs.values()) else None
        try:
            return wait_for(f"{len(ids)} runs to end", done, timeout=timeout, every=0.5)
        except pytest.fail.Exception:
            runs = self.runs(ids)
            stuck = {i: (r["status"], r["reason"]) for i, r in runs.items() if r["status"] not in TERMINAL}
            pytest.fail(f"runs not ended after {timeout:.0f} s: {len(stuck)} of {len(ids)}, e.g. "
                        f"{dict(list(stuck.items())[:5])}\nreplica 0 log: {self.log('r0')}")

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        r = self.call("GET", f"/runs/{run_id}/logs")
        assert r.status_code == 200, r.text
        return [x for x in (json.loads(ln) for ln in r.text.splitlines() if ln) if "line" in x]

    # -- the end -----------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        for name, p in self.procs.items():
            if p.poll() is None and not name.startswith("agent-"):
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            if name.startswith("agent-") and p.poll() is None:
                p.send_signal(signal.SIGKILL)  # jobs run in their own sessions: found below
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for proc in psutil.process_iter():  # jobs started by our agents (their cwd is under base)
            with contextlib.suppress(psutil.Error, OSError):
                if proc.cwd().startswith(str(self.base)):
                    proc.kill()
        from scheduler.redis_store import wipe_prefix

        wipe_prefix(self.url)
