"""The train_ddp template end to end: a real head scheduler (`fedml scheduler start`), two real agents
(`fedml login KEY --server URL --node`) on this machine, and `fedml launch job_templates/train_ddp/job.yaml`
running real torch.distributed (gloo over loopback) on both.

Both ranks must log under their rank, the loss must fall, and the two ranks must end with identical weights
(the `weights sha256:` line each prints).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedml_cli._http import httpx

from .conftest import FEDML, ROOT, Fedml, needs
from .procs import free_port, our_processes, wait_for

TEMPLATE = ROOT / "job_templates" / "train_ddp" / "job.yaml"
NODE_NAMES = ("dA", "dB")
VENV_BIN = str(Path(sys.executable).parent)  # the jobs' `python3` must be the one with torch


@dataclass
class TwoNodes:
    base: Path
    port: int
    head: subprocess.Popen[bytes] | None = None
    admin: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def agents(self) -> Fedml:
        """The FEDML_HOME both agents are started from; PATH starts with this venv's bin (torch)."""
        return Fedml(self.base / "agents")

    def agent_env(self) -> dict[str, str]:
        return {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}

    def fedml(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`fedml ARGS` as a client of the head, with the admin key."""
        return Fedml(self.base / "client")(*args, timeout=timeout,
                                           env={"FEDML_SERVER": self.url, "FEDML_API_KEY": self.admin})

    def json(self, *args: str) -> Any:
        r = self.fedml(*args, "--json")
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def healthy(self) -> bool:
        assert self.head is not None
        if self.head.poll() is not None:
            pytest.fail(f"the head exited ({self.head.returncode}): {(self.base / 'head.log').read_text()}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[TwoNodes]:
    needs("torch", all(importlib.util.find_spec(m) for m in ("torch", "sklearn")),
          f"torch and scikit-learn must be importable by {sys.executable} (the jobs' python3)")
    c = TwoNodes(tmp_path, free_port())
    try:
        with open(tmp_path / "head.log", "ab") as log:
            c.head = subprocess.Popen(
                [FEDML, "scheduler", "start", "--port", str(c.port), "--no-agent", "--heartbeat-interval", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=Fedml(tmp_path / "head").env())
        wait_for("the head scheduler to answer /healthz", c.healthy, timeout=30)
        token = tmp_path / "head" / "local" / "token"
        c.admin = wait_for("the admin key in $FEDML_HOME/local/token",
                           lambda: token.exists() and token.read_text().strip(), timeout=10)
        env = c.agents.env(c.agent_env())
        logins = {name: subprocess.Popen([FEDML, "login", c.admin, "--server", c.url, "--node", "--name", name],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                         stdin=subprocess.DEVNULL) for name in NODE_NAMES}
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


def weights_sha256(checkpoint: Path) -> str:
    """What the template prints as `weights sha256:`, recomputed from a saved state_dict: each tensor's
    name, dtype, shape and bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(torch.load(checkpoint, weights_only=True).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


EPOCH = re.compile(r"^epoch (\d+)/(\d+) loss ([0-9.]+)(?: accuracy ([0-9.]+))?$")
HASH = re.compile(r"^weights sha256: ([0-9a-f]{64})$")


def test_train_ddp_template_trains_on_two_nodes_to_identical_weights(two_nodes: TwoNodes) -> None:
    c = two_nodes
    started = time.monotonic()
    r = c.fedml("launch", str(TEMPLATE), "--json", timeout=90)
    took = time.monotonic() - started
    recs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert r.returncode == 0, (r.stderr, recs)
    run_id = recs[-1]["run_id"]
    assert recs[-1]["status"] == "FINISHED", recs[-1]

    # the run: one placement per rank, on two distinct nodes, both done
    run = c.json("run", "status", run_id)
    assert run["status"] == "FINISHED" and run["num_nodes"] == 2, run
    ps = sorted(run["placements"], key=lambda p: p["rank"])
    assert [p["rank"] for p in ps] == [0, 1], ps
    nodes = {n["id"]: n["name"] for n in c.json("node", "list")}
    assert len({p["node_id"] for p in ps}) == 2 and {nodes[p["node_id"]] for p in ps} == set(NODE_NAMES), ps
    assert all(p["status"] == "FINISHED" and p["exit_code"] == 0 for p in ps), ps

    # the logs, stored per rank
    r = c.fedml("logs", run_id, "--json")
    assert r.returncode == 0, r.stderr
    logs = [x for x in (json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()) if "line" in x]
    by_rank: dict[int, list[str]] = {}
    for x in logs:
        by_rank.setdefault(x["rank"], []).append(x["line"])
    assert set(by_rank) == {0, 1}, logs
    hashes: dict[int, str] = {}
    for rank, lines in by_rank.items():
        assert any(f"rank {rank}/2: backend gloo" in ln for ln in lines), (rank, lines)
        found = [m.group(1) for ln in lines if (m := HASH.match(ln))]
        assert len(found) == 1, (rank, lines)
        hashes[rank] = found[0]
        epochs = [m for ln in lines if (m := EPOCH.match(ln))]
        assert [int(m.group(1)) for m in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) >= 3, lines
        assert all((m.group(4) is not None) == (rank == 0) for m in epochs), lines  # accuracy: rank 0 only
    assert hashes[0] == hashes[1], hashes  # DDP kept the replicas in sync: identical weights

    epochs0 = [m for ln in by_rank[0] if (m := EPOCH.match(ln))]
    losses = [float(m.group(3)) for m in epochs0]
    assert losses[-1] < 0.5 * losses[0] and min(losses) < losses[0], losses
    accuracy = float(epochs0[-1].group(4))
    assert accuracy >= 0.85, by_rank[0]

    # the CLI views: ranks tagged in the plain view, one rank alone with --rank
    r = c.fedml("logs", run_id)
    assert r.returncode == 0, r.stderr
    assert f"[rank 1] weights sha256: {hashes[1]}" in r.stdout.splitlines(), r.stdout
    assert f"[rank 0] weights sha256: {hashes[0]}" in r.stdout.splitlines(), r.stdout
    r = c.fedml("logs", run_id, "--rank", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [x["line"] for x in logs if x["rank"] == 1 and x.get("stream") != "stderr"]
    # rank 0's checkpoint, kept as the run's artifact, holds the very weights both ranks hashed
    assert any(ln.startswith("checkpoint saved to ") for ln in by_rank[0]), by_rank[0]
    dest = c.base / "artifacts"
    r = c.fedml("run", "artifacts", run_id, "--download", str(dest))
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["rank0/model_ddp.pt"]
    assert weights_sha256(dest / "rank0" / "model_ddp.pt") == hashes[0]

    print("\n".join(f"[rank {x['rank']}] {x['line']}" for x in logs))
    print(f"train_ddp: launch took {took:.1f} s, loss {losses[0]} -> {losses[-1]}, accuracy {accuracy}, "
          f"weights sha256 {hashes[0]}")
