"""Many nodes, end to end: one real head scheduler (`fedml scheduler start`, heartbeat 1 s) and real agents
(`fedml login KEY --server URL --node --gpus ...`) on this machine, each declaring its own GPUs, over loopback.

The cluster is shared by the module (starting it costs seconds); every test leaves it idle (all its runs
ended, no node drained) for the next. Tests that SIGKILL agents use their own nodes (n5, n6) and the test
that SIGKILLs the scheduler runs late.

    n1 n2 n3   A100-80G x2   host=nX                 $1.5 / GPU-hour
    n4         H100-80G x1   host=n4 zone=b          $9   / GPU-hour
    n5 n6      T4 x1         host=nX pool=kill       $1   / GPU-hour   (killed and restarted)
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from scheduler.contract.transport import httpx

from .cluster import head_answers
from .conftest import FEDML, Fedml, write_job
from .procs import alive, cmdline, free_port, our_processes, run_processes, wait_for

HEARTBEAT = 1.0
TERMINAL = ("FINISHED", "FAILED", "KILLED")
ACTIVE = ("QUEUED", "STARTING", "RUNNING", "LOST")
A100_NODES = ("n1", "n2", "n3")
NODES: dict[str, list[str]] = {
    "n1": ["--gpus", "A100-80G:2", "--label", "host=n1", "--price-per-gpu-hour", "1.5"],
    "n2": ["--gpus", "A100-80G:2", "--label", "host=n2", "--price-per-gpu-hour", "1.5"],
    "n3": ["--gpus", "A100-80G:2", "--label", "host=n3", "--price-per-gpu-hour", "1.5"],
    "n4": ["--gpus", "H100-80G:1", "--label", "host=n4", "--label", "zone=b", "--price-per-gpu-hour", "9"],
    "n5": ["--gpus", "T4:1", "--label", "host=n5", "--label", "pool=kill", "--price-per-gpu-hour", "1"],
    "n6": ["--gpus", "T4:1", "--label", "host=n6", "--label", "pool=kill", "--price-per-gpu-hour", "1"],
}


@dataclass
class Cluster:
    base: Path
    port: int
    head: subprocess.Popen[bytes] | None = None
    admin: str = ""
    ops: str = ""  # the join token nodes join with (any number of nodes, never expires)
    secrets: set[str] = field(default_factory=set)
    http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def head_home(self) -> Path:
        return self.base / "head"

    @property
    def head_log(self) -> Path:
        return self.base / "head.log"

    @property
    def agents(self) -> Fedml:
        """The FEDML_HOME all agents are started from (their state: nodes/NAME)."""
        return Fedml(self.base / "agents")

    def node_home(self, name: str) -> Path:
        return self.base / "agents" / "nodes" / name

    # -- head --------------------------------------------------------------------------------------------
    def start_head(self) -> subprocess.Popen[bytes]:
        log = open(self.head_log, "ab")  # noqa: SIM115 - the head's stderr for the module
        self.head = subprocess.Popen(
            [FEDML, "scheduler", "start", "--port", str(self.port), "--no-agent", "--heartbeat-interval",
             str(HEARTBEAT)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=Fedml(self.head_home).env())
        log.close()
        wait_for("the head scheduler to answer /healthz", self._healthy, timeout=30)
        return self.head

    def _healthy(self) -> bool:
        assert self.head is not None
        return head_answers(self.head, self.url, self.head_log)

    # -- CLI ---------------------------------------------------------------------------------------------
    def fedml(self, *args: str, key: str | None = None, home: Path | None = None, timeout: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`fedml ARGS` as a client of the head (FEDML_SERVER + FEDML_API_KEY; admin key by default)."""
        e = {"FEDML_SERVER": self.url, "FEDML_API_KEY": self.admin if key is None else key, **(env or {})}
        return Fedml(home or self.base / "client")(*args, timeout=timeout, env=e)

    def json(self, *args: str, key: str | None = None) -> Any:
        r = self.fedml(*args, "--json", key=key)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def launch(self, job: Path, key: str | None = None) -> str:
        r = self.fedml("launch", str(job), "--detach", key=key)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def launch_many(self, jobs: list[Path]) -> list[str]:
        """Submit several jobs at once (in parallel), in the given order of submission not guaranteed."""
        env = Fedml(self.base / "client").env({"FEDML_SERVER": self.url, "FEDML_API_KEY": self.admin})
        procs = [subprocess.Popen([FEDML, "launch", str(j), "--detach"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
                 for j in jobs]
        ids = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            ids.append(out.strip())
        return ids

    def login_node(self, name: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.agents("login", key or self.ops, "--server", self.url, "--node", "--name", name, *NODES[name],
                           timeout=60)

    # -- API (cheap polling) -----------------------------------------------------------------------------
    def api(self) -> httpx.Client:
        if self.http is None:
            self.http = httpx.Client(base_url=self.url + "/api/v1", timeout=10,
                                     headers={"Authorization": f"Bearer {self.admin}"})
        return self.http

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.api().get(f"/runs/{run_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        r = self.api().get(f"/runs/{run_id}/logs")
        assert r.status_code == 200, r.text
        return [x for x in (json.loads(ln) for ln in r.text.splitlines() if ln) if "line" in x]

    def nodes(self) -> dict[str, dict[str, Any]]:
        r = self.api().get("/nodes")
        assert r.status_code == 200, r.text
        return {n["name"]: n for n in r.json()}

    def node_name(self, node_id: str) -> str:
        return next(name for name, n in self.nodes().items() if n["id"] == node_id)

    def wait(self, run_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        return wait_for(f"run {run_id} to be {'/'.join(statuses)}",
                        lambda: (r if (r := self.run(run_id))["status"] in statuses else None), timeout)

    def wait_all(self, ids: list[str], statuses: tuple[str, ...], timeout: float = 30) -> list[dict[str, Any]]:
        def done() -> list[dict[str, Any]] | None:
            runs = [self.run(i) for i in ids]
            return runs if all(r["status"] in statuses for r in runs) else None
        return wait_for(f"runs {ids} to be {'/'.join(statuses)}", done, timeout, every=0.2)

    def stop(self, *ids: str) -> None:
        for i in ids:
            self.api().post(f"/runs/{i}/stop")

    def after_a_pass(self, tmp: Path) -> None:
        """Return once a scheduling pass that began after the call has run: a probe that cannot be placed yet (2
        A100s, lowest priority) has been given its queue reason. A check that something did NOT start, made after
        this, is about a pass that happened, not one that was merely slow."""
        probe = self.launch(job(tmp / "probe", "true", gpus=2, priority=-1000))
        try:
            seen = wait_for("a scheduling pass to see the probe", lambda: (
                r if (r := self.run(probe))["reason"] or r["status"] != "QUEUED" else None), timeout=20)
            assert seen["status"] == "QUEUED", f"the probe was placed: the cluster was not full ({seen})"
        finally:
            self.stop(probe)

    def settle(self) -> None:
        """Leave the cluster idle: every run ended, every node accepting runs, online and fully free."""
        active = self.api().get("/runs", params={"status": list(ACTIVE)}).json()
        self.stop(*[r["id"] for r in active])
        if active:
            self.wait_all([r["id"] for r in active], TERMINAL, timeout=30)
        for name, n in self.nodes().items():
            if n["draining"]:
                self.api().post(f"/nodes/{name}/drain", params={"undo": True})

        def idle() -> bool:
            ns = self.nodes()
            return set(ns) == set(NODES) and all(
                n["state"] == "ONLINE" and len(n["gpus_free"]) == len(n["gpus"]) and not n["active_runs"]
                for n in ns.values())
        wait_for("the cluster to be idle", idle, timeout=20)

    def agent_pid(self, name: str) -> int:
        return int((self.node_home(name) / "agent.pid").read_text().strip())


def job(dir: Path, script: str, *, gpus: int = 1, gpu_type: str | None = "A100-80G", **extra: Any) -> Path:
    """A job YAML: `script` as the job, `computing` from gpus/gpu_type, any other top-level keys as YAML."""
    computing = {"minimum_num_gpus": gpus}
    if gpu_type:
        computing["resource_type"] = gpu_type
    if "maximum_cost_per_hour" in extra:
        computing["maximum_cost_per_hour"] = extra.pop("maximum_cost_per_hour")
    doc = {"computing": computing, **extra}
    return write_job(dir, script, extra=yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), free_port())
    started_at = time.monotonic()
    try:
        c.start_head()
        token = c.head_home / "local" / "token"
        # Not a terminal: the banner says where the key is, and never prints it into the log.
        wait_for("the admin key's place in the head's output", lambda: "Admin API key saved to" in c.head_log.read_text(), 10)
        c.admin = token.read_text().strip()
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        r = c.fedml("scheduler", "token", "create", "--node", "--uses", "0", "--ttl", "never", "--name", "ops")
        assert r.returncode == 0, r.stderr
        c.ops = r.stdout.strip()
        c.secrets |= {c.admin, c.ops}
        env = c.agents.env()
        procs = {name: subprocess.Popen(
            [FEDML, "login", c.ops, "--server", c.url, "--node", "--name", name, *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL) for name, args in NODES.items()}
        for name, p in procs.items():
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, (name, err)
            assert f"Node {name} joined {c.url}" in err, err
        c.settle()
        print(f"cluster up in {time.monotonic() - started_at:.1f} s")
        yield c
    finally:
        problems = []
        if (c.base / "agents" / "nodes").exists():
            r = c.agents("logout", timeout=120)
            if r.returncode != 0:
                problems.append(f"fedml logout exited {r.returncode}: {r.stderr}")
        if c.http is not None:
            c.http.close()
        if c.head is not None and c.head.poll() is None:
            c.head.terminate()
            try:
                c.head.wait(timeout=15)
            except subprocess.TimeoutExpired:
                c.head.kill()
                problems.append("the head did not exit within 15 s of SIGTERM")
        deadline = time.monotonic() + 10
        while (left := our_processes(c.base)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in left:
            try:
                problems.append(f"leaked process {p.pid}: {' '.join(p.cmdline())}")
                p.kill()
            except psutil.Error:
                pass
        assert not problems, problems


@pytest.fixture
def c(cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, idle before and left idle after the test."""
    cluster.settle()
    yield cluster
    cluster.settle()


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]


# ---- nodes -------------------------------------------------------------------------------------------------

def test_node_list_shows_every_node_online_with_its_gpus(c: Cluster) -> None:
    nodes = {n["name"]: n for n in c.json("node", "list")}
    assert set(nodes) == set(NODES)
    for name in A100_NODES:
        n = nodes[name]
        assert n["state"] == "ONLINE" and not n["draining"], n
        assert [(g["index"], g["name"]) for g in n["gpus"]] == [(0, "A100-80G"), (1, "A100-80G")]
        assert sorted(n["gpus_free"]) == [0, 1] and n["active_runs"] == 0
        assert n["labels"] == {"host": name} and n["price_per_gpu_hour"] == 1.5
        assert time.time() - n["last_seen"] < 3 * HEARTBEAT
    n4 = nodes["n4"]
    assert [g["name"] for g in n4["gpus"]] == ["H100-80G"] and n4["gpus_free"] == [0]
    assert n4["labels"] == {"host": "n4", "zone": "b"} and n4["price_per_gpu_hour"] == 9
    assert len({n["id"] for n in nodes.values()}) == len(NODES)
    for name in NODES:  # what the agent saved about itself agrees with the scheduler
        saved = json.loads((c.node_home(name) / "node.json").read_text())
        assert saved == {"id": nodes[name]["id"], "name": name, "server": c.url}
        assert stat.S_IMODE((c.node_home(name) / "node_token").stat().st_mode) == 0o600
    table = c.fedml("node", "list", env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    for name in NODES:
        assert name in table.stdout
    assert "2/2 A100-80G" in table.stdout and "1/1 H100-80G" in table.stdout and "zone=b" in table.stdout


def test_login_as_the_same_name_while_online_is_refused(c: Cluster) -> None:
    other = Fedml(c.base / "other-machine")  # another machine trying to take the name n1
    r = other("login", c.ops, "--server", c.url, "--node", "--name", "n1", "--gpus", "A100-80G:8", timeout=60)
    assert r.returncode != 0
    assert "n1" in r.stderr and "exists already" in r.stderr, r.stderr
    assert len(c.nodes()["n1"]["gpus"]) == 2
    other("logout", timeout=60)


def test_node_options_imply_node_and_the_cli_reports_the_scheduler_it_logged_in_to(c: Cluster, tmp_path: Path) -> None:
    """`fedml login KEY --server URL --name n --gpus ...` without --node once stored client credentials and dropped
    the node options; after `fedml login`, `fedml env` / `scheduler status` described the local scheduler."""
    other = Fedml(c.base / "implied")
    r = other("login", c.ops, "--server", c.url, "--name", "n7", "--gpus", "L4:1", timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert "--name, --gpus implies --node" in r.stderr, r.stderr
        assert wait_for("n7 ONLINE", lambda: c.nodes().get("n7", {}).get("state") == "ONLINE", timeout=20)
        bad = other("login", c.ops, "--server", c.url, "--namespace", "x", timeout=60)
        assert bad.returncode == 2 and "--namespace only apply with --kubernetes" in bad.stderr, bad.stderr
    finally:
        other("logout", timeout=60)
        c.fedml("node", "remove", "n7")
    client = Fedml(c.base / "logged-in")
    r = client("login", c.admin, "--server", c.url, timeout=60)
    assert r.returncode == 0, r.stderr
    env = json.loads(client("env", "--json").stdout)
    assert env["scheduler"] == {"kind": "remote (fedml login)", "url": c.url}, env["scheduler"]
    st = client("scheduler", "status", "--json")
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["running"] and info["url"] == c.url and info["kind"] == "remote (fedml login)", info
    plain = client("scheduler", "status")
    assert plain.stdout.startswith(f"remote (fedml login) scheduler running at {c.url}:"), plain.stdout
    # run tables name nodes as their users named them
    run_id = c.launch(job(tmp_path, "echo on n4", gpu_type="H100-80G"))
    c.wait(run_id, TERMINAL)
    listed = client("run", "list", env={"COLUMNS": "200"}).stdout
    row = next(ln for ln in listed.splitlines() if run_id in ln)
    assert " n4 " in row and c.nodes()["n4"]["id"] not in row, row
    shown = " ".join(client("run", "status", run_id).stdout.split())
    assert "node n4" in shown, shown
    client("logout", timeout=60)


# ---- placement ---------------------------------------------------------------------------------------------

def test_concurrent_one_gpu_jobs_never_share_a_gpu(c: Cluster, tmp_path: Path, shared_tmp: Path) -> None:
    locks = shared_tmp / "locks"
    locks.mkdir(mode=0o1777)
    locks.chmod(0o1777)  # the jobs (fedml-job) make their lock directories in it
    script = (f'echo "cvd=$CUDA_VISIBLE_DEVICES edge=$FEDML_CURRENT_EDGE_ID"\n'
              f'd="{locks}/$FEDML_CURRENT_EDGE_ID-gpu$CUDA_VISIBLE_DEVICES"\n'
              'mkdir "$d" || echo CONFLICT\nsleep 2\nrmdir "$d"')
    ids = c.launch_many([job(tmp_path / f"j{i}", script) for i in range(8)])  # 8 jobs for 6 A100s
    runs = c.wait_all(ids, TERMINAL, timeout=60)
    a100 = {c.nodes()[n]["id"] for n in A100_NODES}
    for run in runs:
        assert run["status"] == "FINISHED", (run["reason"], run["placements"], c.logs(run["id"]))
        assert run["node_id"] in a100 and len(run["gpus"]) == 1, run
        lines = [x["line"] for x in c.logs(run["id"])]
        assert lines == [f"cvd={run['gpus'][0]} edge={run['node_id']}"], (run["id"], lines)
    pairs = {(r["node_id"], r["gpus"][0]) for r in runs}
    assert len(pairs) >= 3, pairs  # spread over the cluster's GPUs
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if (a["node_id"], a["gpus"]) == (b["node_id"], b["gpus"]):
                assert not overlaps(a, b), (a, b)
    # 8 two-second jobs on 6 GPUs: at most 6 at once, and the 2 extra ones waited
    starts = sorted(r["started_at"] for r in runs)
    assert all(sum(overlaps(r, {"started_at": t, "ended_at": t + 1e-6}) for r in runs) <= 6 for t in starts)


def test_two_one_gpu_jobs_on_a_one_gpu_node_run_one_after_the_other(c: Cluster, tmp_path: Path) -> None:
    script = 'echo "on $FEDML_CURRENT_EDGE_ID cvd=$CUDA_VISIBLE_DEVICES"\nsleep 1.5'
    first = c.launch(job(tmp_path / "a", script, gpu_type="H100-80G"))
    second = c.launch(job(tmp_path / "b", script, gpu_type="H100-80G"))
    c.wait(first, ("RUNNING",))
    assert c.run(second)["status"] == "QUEUED"
    a, b = c.wait_all([first, second], TERMINAL, timeout=30)
    n4 = c.nodes()["n4"]["id"]
    assert a["status"] == b["status"] == "FINISHED"
    assert a["node_id"] == b["node_id"] == n4 and a["gpus"] == b["gpus"] == [0]
    assert a["ended_at"] <= b["started_at"], (a, b)


def test_two_gpu_job_lands_on_the_node_with_two_free_gpus(c: Cluster, tmp_path: Path) -> None:
    holders = [c.launch(job(tmp_path / n, "sleep 100", labels={"host": n})) for n in ("n1", "n2")]
    held = c.wait_all(holders, ("RUNNING",))
    assert [len(h["gpus"]) for h in held] == [1, 1]
    r = c.fedml("launch", str(job(tmp_path / "big", 'echo "cvd=$CUDA_VISIBLE_DEVICES on $FEDML_CURRENT_EDGE_ID"',
                                  gpus=2)), "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    run = c.run(recs[-1]["run_id"])
    n3 = c.nodes()["n3"]["id"]
    assert run["status"] == "FINISHED" and run["node_id"] == n3 and run["gpus"] == [0, 1], run
    assert [x["line"] for x in recs if "line" in x] == [f"cvd=0,1 on {n3}"]


def test_job_that_fits_nowhere_now_waits_with_a_reason_then_runs(c: Cluster, tmp_path: Path) -> None:
    fillers = [c.launch(job(tmp_path / f"f{i}", "sleep 100", gpus=2)) for i in range(3)]
    filled = c.wait_all(fillers, ("RUNNING",))
    assert {f["node_id"] for f in filled} == {c.nodes()[n]["id"] for n in A100_NODES}
    # launched in the foreground: it says why it waits (off a terminal, one line per reason), then follows
    env = Fedml(c.base / "client").env({"FEDML_SERVER": c.url, "FEDML_API_KEY": c.admin})
    fg = subprocess.Popen([FEDML, "launch", str(job(tmp_path / "w", "echo got them", gpus=2))], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert fg.stderr is not None
    first = fg.stderr.readline()
    assert first.startswith("Run run-"), first
    waiting = first.split()[1].rstrip(";")
    shown_reason = fg.stderr.readline()
    assert shown_reason.startswith("queued: no node with 2 free A100-80G"), shown_reason
    run = wait_for("a queue reason", lambda: (r if (r := c.run(waiting))["reason"] else None), timeout=10)
    assert run["status"] == "QUEUED", run
    reason = run["reason"]
    assert "2 free A100-80G" in reason and "3 nodes have them busy" in reason, reason
    shown = c.fedml("run", "status", waiting)
    assert shown.returncode == 0, shown.stderr
    flat = " ".join(shown.stdout.split())
    assert "QUEUED" in flat and "3 nodes have them busy" in flat, shown.stdout
    c.after_a_pass(tmp_path)  # still waiting: nothing freed
    assert c.run(waiting)["status"] == "QUEUED"
    c.stop(*fillers)
    done = c.wait(waiting, TERMINAL, timeout=30)
    assert done["status"] == "FINISHED" and len(done["gpus"]) == 2 and done["reason"] is None, (done, c.logs(waiting))
    assert [x["line"] for x in c.logs(waiting)] == ["got them"]
    out, _ = fg.communicate(timeout=30)
    assert fg.returncode == 0 and out == "got them\n", out


@pytest.mark.parametrize("what,extra", [
    ("4 A100 on one node", {"gpus": 4}),
    ("a GPU type nobody has", {"gpu_type": "V100"}),
    ("4 nodes with A100s", {"num_nodes": 4}),
    ("a label nobody has", {"labels": {"zone": "mars"}}),
])
def test_job_that_can_never_fit_is_rejected_at_launch(c: Cluster, tmp_path: Path, what: str,
                                                     extra: dict[str, Any]) -> None:
    before = {r["id"] for r in c.json("run", "list", "--limit", "100000")}
    r = c.fedml("launch", str(job(tmp_path, "echo never", **extra)))
    assert r.returncode == 2, (what, r.stdout, r.stderr)
    assert "cannot ever run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    after = {r["id"] for r in c.json("run", "list", "--limit", "100000")}
    assert after == before, "a run was created"


def test_cost_cap(c: Cluster, tmp_path: Path) -> None:
    # only n4 has an H100, at $9: a $2 cap can never be met
    r = c.fedml("launch", str(job(tmp_path / "h", "echo x", gpu_type="H100-80G", maximum_cost_per_hour="$2")))
    assert r.returncode == 2 and "cannot ever run" in r.stderr and "cost" in r.stderr, r.stderr
    # any GPU type, $2 cap: fill every cheap GPU at once; none may land on the $9 node
    ids = c.launch_many([job(tmp_path / f"j{i}", "sleep 1", gpu_type=None, maximum_cost_per_hour=2)
                         for i in range(9)])  # 8 cheap GPUs: the 9th waits rather than pay $9
    runs = c.wait_all(ids, TERMINAL, timeout=60)
    n4 = c.nodes()["n4"]["id"]
    assert all(r["status"] == "FINISHED" for r in runs), runs
    assert n4 not in {r["node_id"] for r in runs}
    # no cap: the $9 node is used when the cheap ones are busy
    fillers = c.launch_many([job(tmp_path / f"f{i}", "sleep 100", gpu_type=None, maximum_cost_per_hour=2)
                             for i in range(8)])
    c.wait_all(fillers, ("RUNNING",))
    rich = c.launch(job(tmp_path / "rich", "echo rich", gpu_type=None))
    assert c.wait(rich, TERMINAL)["node_id"] == n4


# ---- gangs -------------------------------------------------------------------------------------------------

GANG_ENV = ('echo "rank=$FEDML_CLIENT_RANK node_rank=$NODE_RANK world=$WORLD_SIZE num=$FEDML_NUM_NODES '
            'master=$MASTER_ADDR:$MASTER_PORT node0=$FEDML_NODE_0_ADDR:$FEDML_NODE_0_PORT '
            'edge=$FEDML_CURRENT_EDGE_ID cvd=$CUDA_VISIBLE_DEVICES"')


def test_gang_job_starts_every_rank_on_its_own_node_with_the_right_env(c: Cluster, tmp_path: Path) -> None:
    r = c.fedml("launch", str(job(tmp_path, GANG_ENV, num_nodes=2)), "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert recs[-1]["status"] == "FINISHED"
    run = c.run(recs[-1]["run_id"])
    ps = sorted(run["placements"], key=lambda p: p["rank"])
    assert [p["rank"] for p in ps] == [0, 1] and run["num_nodes"] == 2
    assert len({p["node_id"] for p in ps}) == 2, ps
    a100 = {c.nodes()[n]["id"] for n in A100_NODES}
    assert {p["node_id"] for p in ps} <= a100 and all(len(p["gpus"]) == 1 for p in ps)
    got: dict[int, dict[str, str]] = {}
    for x in recs:
        if "line" in x:
            got[x["rank"]] = dict(kv.split("=", 1) for kv in x["line"].split())
    assert set(got) == {0, 1}, recs
    ports = set()
    for rank, env in got.items():
        p = ps[rank]
        assert env["rank"] == env["node_rank"] == str(rank)
        assert env["world"] == env["num"] == "2"
        assert env["edge"] == p["node_id"] and env["cvd"] == ",".join(map(str, p["gpus"]))
        assert env["master"] == env["node0"], env
        host, port = env["master"].rsplit(":", 1)
        assert host and int(port) > 0
        ports.add(env["master"])
    assert len(ports) == 1, got  # every rank points at the same rank-0 address and port


def test_logs_tail_of_one_rank_and_a_rank_that_does_not_exist(c: Cluster, tmp_path: Path) -> None:
    """--tail N with --rank R is the last N lines of that rank (not the last N lines, then filtered)."""
    script = 'for i in 1 2 3 4 5; do echo "r$NODE_RANK $i"; done\nif [ "$NODE_RANK" = 0 ]; then seq 1 20; fi'
    r = c.fedml("launch", str(job(tmp_path, script, num_nodes=2)), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout.strip().split("\n")[-1])["run_id"]
    t = c.fedml("logs", run_id, "--rank", "1", "--tail", "2")
    assert t.returncode == 0 and t.stdout == "r1 4\nr1 5\n", (t.stdout, t.stderr)
    bad = c.fedml("logs", run_id, "--rank", "5")
    assert bad.returncode == 2 and "has no rank 5" in bad.stderr, bad.stderr


def test_gang_rank_failing_fails_the_run_and_stops_the_other_ranks(c: Cluster, tmp_path: Path) -> None:
    script = 'if [ "$NODE_RANK" = 1 ]; then sleep 0.5; echo "rank 1 fails"; exit 3; fi\necho "rank 0 waits"\nsleep 100'
    t0 = time.monotonic()
    r = c.fedml("launch", str(job(tmp_path, script, num_nodes=2)), "--json", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert took < 15, f"the gang took {took:.1f} s to fail"
    end = json.loads(r.stdout.splitlines()[-1])
    run = c.run(end["run_id"])
    assert run["status"] == "FAILED" and run["exit_code"] == 3, run
    assert "rank 1" in run["reason"], run["reason"]
    by_rank = {p["rank"]: p for p in run["placements"]}
    assert by_rank[1]["status"] == "FAILED" and by_rank[1]["exit_code"] == 3
    assert by_rank[0]["status"] == "KILLED", by_rank
    assert run_processes(run["id"]) == []


def test_gang_rank_killed_fails_the_run_and_stops_the_other_ranks(c: Cluster, tmp_path: Path) -> None:
    run_id = c.launch(job(tmp_path, 'echo "up $NODE_RANK"\nsleep 100', num_nodes=2))
    run = c.wait(run_id, ("RUNNING",))
    ps = {p["rank"]: p for p in run["placements"]}
    homes = {c.nodes()[n]["id"]: c.node_home(n) for n in A100_NODES}
    rank1 = wait_for("rank 1's processes", lambda: run_processes(run_id, homes[ps[1]["node_id"]]))
    wait_for("rank 0's processes", lambda: run_processes(run_id, homes[ps[0]["node_id"]]))
    for p in rank1:  # the machine of rank 1 kills its job (OOM killer, a crash)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    run = c.wait(run_id, TERMINAL, timeout=15)
    assert run["status"] == "FAILED", run
    assert "rank 1" in run["reason"], run
    assert {p["rank"]: p["status"] for p in run["placements"]} == {0: "KILLED", 1: "FAILED"}
    assert run_processes(run_id) == []


# ---- drain -------------------------------------------------------------------------------------------------

def test_drained_node_gets_no_new_runs_and_its_running_ones_finish(c: Cluster, tmp_path: Path, shared_tmp: Path) -> None:
    release = shared_tmp / "release"
    on_n2 = c.launch(job(tmp_path / "on", f'while [ ! -e "{release}" ]; do sleep 0.1; done\necho finished',
                         labels={"host": "n2"}))
    c.wait(on_n2, ("RUNNING",))
    d = c.fedml("node", "drain", "n2")
    assert d.returncode == 0 and "draining" in d.stderr, d.stderr
    n2 = c.nodes()["n2"]
    assert n2["draining"] and n2["state"] == "ONLINE"
    assert "DRAINING" in c.fedml("node", "list").stdout
    pinned = c.launch(job(tmp_path / "pinned", "echo pinned", labels={"host": "n2"}))
    ids = c.launch_many([job(tmp_path / f"j{i}", "sleep 0.5", gpus=1) for i in range(6)])
    runs = c.wait_all(ids, TERMINAL, timeout=40)
    assert all(r["status"] == "FINISHED" for r in runs), runs
    assert n2["id"] not in {r["node_id"] for r in runs}
    p = c.run(pinned)
    assert p["status"] == "QUEUED" and "draining" in p["reason"], p
    release.touch()
    done = c.wait(on_n2, TERMINAL)
    assert done["status"] == "FINISHED" and done["node_id"] == n2["id"], done
    assert c.run(pinned)["status"] == "QUEUED"
    u = c.fedml("node", "drain", "n2", "--undo")
    assert u.returncode == 0, u.stderr
    assert not c.nodes()["n2"]["draining"]
    assert c.wait(pinned, TERMINAL)["status"] == "FINISHED"
    assert c.fedml("node", "drain", "nope").returncode == 4


# ---- priority ----------------------------------------------------------------------------------------------

def test_higher_priority_job_starts_first_when_capacity_frees(c: Cluster, tmp_path: Path) -> None:
    fillers = [c.launch(job(tmp_path / f"f{i}", "sleep 100", gpus=2)) for i in range(3)]
    c.wait_all(fillers, ("RUNNING",))
    low = c.launch(job(tmp_path / "low", "sleep 100", gpus=2, priority=0))
    high = c.launch(job(tmp_path / "high", "sleep 100", gpus=2, priority=10))
    c.after_a_pass(tmp_path / "p1")
    assert c.run(low)["status"] == c.run(high)["status"] == "QUEUED"
    c.stop(fillers[0])
    h = c.wait(high, ("RUNNING",))
    c.after_a_pass(tmp_path / "p2")
    assert c.run(low)["status"] == "QUEUED", "the low-priority job took capacity freed for one job"
    c.stop(fillers[1])
    lo = c.wait(low, ("RUNNING",))
    assert h["started_at"] < lo["started_at"]


# ---- security ----------------------------------------------------------------------------------------------

def test_keys_scopes_and_ownership(c: Cluster, tmp_path: Path) -> None:
    keys = {}
    for who in ("alice", "bob"):
        r = c.fedml("scheduler", "key", "create", who)
        assert r.returncode == 0, r.stderr
        keys[who] = r.stdout.strip()
        c.secrets.add(keys[who])
    listed = c.json("scheduler", "key", "list")
    assert {"alice", "bob", "ops"} <= {k["name"] for k in listed}
    assert all("secret" not in k and "hash" not in k for k in listed)
    assert not any(s in json.dumps(listed) for s in c.secrets)

    # alice logs in (stored client credentials, mode 0600); bob uses the environment
    alice_home = tmp_path / "alice"
    r = Fedml(alice_home)("login", keys["alice"], "--server", c.url)
    assert r.returncode == 0 and "alice" in r.stderr, r.stderr
    creds = alice_home / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    alice = Fedml(alice_home)
    ra = alice("launch", str(job(tmp_path / "a", "echo alice", gpus=0, gpu_type=None)), "--detach")
    assert ra.returncode == 0, ra.stderr
    a_run = ra.stdout.strip()
    b_run = c.launch(job(tmp_path / "b", "echo bob", gpus=0, gpu_type=None), key=keys["bob"])
    c.wait_all([a_run, b_run], TERMINAL)

    mine = json.loads(alice("run", "list", "--json").stdout)
    assert [r["id"] for r in mine] == [a_run]
    assert all(r["owner"] == "alice" for r in mine)
    everyone = {r["id"] for r in c.json("run", "list")}
    assert {a_run, b_run} <= everyone
    s = alice("run", "status", b_run)
    assert s.returncode == 4 and "not found" in s.stderr
    assert alice("logs", b_run).returncode == 4
    assert alice("run", "stop", b_run).returncode == 4
    assert alice("run", "status", a_run).returncode == 0
    # admin-only things
    assert alice("node", "drain", "n1").returncode == 3
    assert alice("scheduler", "key", "create", "mallory").returncode == 3
    assert alice("node", "remove", "n1").returncode == 3
    assert not c.nodes()["n1"]["draining"] and "n1" in c.nodes()

    # no token / a wrong token: 401, exit 3
    assert httpx.get(c.url + "/api/v1/runs").status_code == 401
    assert httpx.get(c.url + "/api/v1/nodes", headers={"Authorization": "Bearer fml_u_nope"}).status_code == 401
    nokey = Fedml(tmp_path / "nobody")("run", "list", env={"FEDML_SERVER": c.url})
    assert nokey.returncode == 3 and "not authenticated" in nokey.stderr, nokey.stderr

    # a node token acts only as its own node (n_self: a node none of these runs landed on)
    nodes = c.nodes()
    used = {c.run(a_run)["node_id"], c.run(b_run)["node_id"]}
    n_self, n_other = [n for n in NODES if nodes[n]["id"] not in used][:2]
    node_token = (c.node_home(n_self) / "node_token").read_text().strip()
    c.secrets.add(node_token)
    r = c.fedml("run", "list", key=node_token)
    assert r.returncode == 3, r.stderr
    r = c.fedml("launch", str(job(tmp_path / "n", "echo from a node", gpus=0, gpu_type=None)), key=node_token)
    assert r.returncode == 3, r.stderr
    nh = {"Authorization": f"Bearer {node_token}"}
    api = c.url + "/api/v1"
    other = httpx.post(f"{api}/nodes/{nodes[n_other]['id']}/poll", json={"running": [], "wait": 0}, headers=nh)
    assert other.status_code == 403, other.text
    own = httpx.post(f"{api}/nodes/{nodes[n_self]['id']}/poll", json={"running": [], "wait": 0}, headers=nh)
    assert own.status_code == 200, own.text
    assert httpx.get(f"{api}/runs/{b_run}", headers=nh).status_code in (403, 404)
    fake = httpx.post(f"{api}/runs/{b_run}/logs", headers=nh,
                      json={"rank": 0, "attempt": 1, "first_seq": 99, "lines": [[time.time(), "stdout", "forged"]]})
    assert fake.status_code == 403, fake.text
    forged = httpx.post(f"{api}/runs/{b_run}/status", params={"node_id": nodes[n_other]["id"]}, headers=nh,
                        json={"status": "FAILED", "exit_code": 9})
    assert forged.status_code == 403, forged.text
    assert httpx.delete(f"{api}/nodes/{nodes[n_other]['id']}", headers=nh).status_code == 403
    assert httpx.post(f"{api}/nodes/{nodes[n_self]['id']}/poll", json={"running": [], "wait": 0},
                      headers={"Authorization": f"Bearer {keys['alice']}"}).status_code == 403
    assert c.run(b_run)["status"] == "FINISHED" and [x["line"] for x in c.logs(b_run)] == ["bob"]
    assert set(c.nodes()) == set(NODES)

    # a revoked key is refused from then on
    rv = c.fedml("scheduler", "key", "revoke", "alice")
    assert rv.returncode == 0, rv.stderr
    r = alice("run", "list")
    assert r.returncode == 3 and "not authenticated" in r.stderr, r.stderr
    assert c.fedml("run", "list", key=keys["bob"]).returncode == 0
    revoked = [k for k in c.json("scheduler", "key", "list") if k["name"] == "alice"]
    assert revoked and all(k["revoked_at"] for k in revoked)


# ---- heartbeats, LOST, reconciliation --------------------------------------------------------------------------

def _kill_agent(c: Cluster, name: str) -> float:
    os.kill(c.agent_pid(name), signal.SIGKILL)
    return time.monotonic()


def _wait_offline(c: Cluster, name: str, since: float) -> float:
    def offline() -> bool:
        nodes = {n["name"]: n for n in c.json("node", "list")}  # through the CLI, as a user would look
        return nodes[name]["state"] == "OFFLINE"
    wait_for(f"{name} to be OFFLINE", offline, timeout=15, every=0.2)
    return time.monotonic() - since


class Timeline:
    """Which attempts of a run have a live process, sampled with psutil at 10 Hz (FEDML_ATTEMPT of each process
    carrying the run's id): [(monotonic time, attempt), ...]."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.samples = run_id, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for p in run_processes(self.run_id):
                try:
                    self.samples.append((now, int(p.environ().get("FEDML_ATTEMPT", "0"))))
                except (psutil.Error, ValueError):
                    continue

    def stop(self) -> dict[int, tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        spans: dict[int, tuple[float, float]] = {}
        for t, a in self.samples:
            lo, hi = spans.get(a, (t, t))
            spans[a] = (min(lo, t), max(hi, t))
        return spans


def _fenced_job(tmp_path: Path, shared_tmp: Path, n: int) -> Path:
    """Prints n numbered lines, 10 a second, each also appended to a file of its attempt (what it printed)."""
    script = (f'for i in $(seq 1 {n}); do echo "a$FEDML_ATTEMPT line $i"; '
              f'echo "a$FEDML_ATTEMPT line $i" >> "{shared_tmp}/printed.$FEDML_ATTEMPT"; sleep 0.1; done')
    return job(tmp_path, script, gpu_type="T4", labels={"pool": "kill"}, retry={"max_attempts": 2, "on": ["lost"]})


def _printed(shared_tmp: Path, attempt: int) -> list[str]:
    f = shared_tmp / f"printed.{attempt}"
    return f.read_text().splitlines() if f.exists() else []


def _logged(c: Cluster, run_id: str) -> dict[int, list[str]]:
    r = c.fedml("logs", run_id, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[int, list[str]] = {}
    for x in (json.loads(ln) for ln in r.stdout.split("\n") if ln.strip()):
        if "line" in x and x.get("stream") != "fedml":
            out.setdefault(x["attempt"], []).append(x["line"])
    return out


def _wait_kept(c: Cluster, run_id: str, printed: list[str], attempt: int, node: str, what: str) -> list[str]:
    """Wait until every line `attempt` printed is logged under it, in order; returns them. The job echoes a line,
    then appends it to its record: a fence's SIGKILL landing between the two leaves one line printed and logged
    that the record lacks (never the reverse), so that line is accepted too."""
    def kept() -> bool:
        got = _logged(c, run_id).get(attempt, [])
        return got in (printed, [*printed, f"a{attempt} line {len(printed) + 1}"])
    try:
        wait_for(what, kept, timeout=20)
    except pytest.fail.Exception:
        got = _logged(c, run_id).get(attempt, [])
        agent_log = (c.node_home(node) / "agent.log").read_text(errors="replace").splitlines()[-30:]
        pytest.fail(f"{what}: logged {len(got)} lines of attempt {attempt} (last {got[-2:]}), "
                    f"it printed {len(printed)} (last {printed[-2:]}); {node}'s agent log ends:\n" +
                    "\n".join(agent_log))
    return _logged(c, run_id)[attempt]


def test_agent_sigkill_fences_attempt_one_before_attempt_two_starts(c: Cluster, tmp_path: Path,
                                                                    shared_tmp: Path) -> None:
    """The agent is SIGKILLed and stays dead: its lease guard kills attempt 1 before the scheduler writes the node
    off and starts attempt 2 elsewhere (the two never run at once). When the machine comes back, what attempt 1
    printed before it was fenced is shipped and kept under attempt 1."""
    run_id = c.launch(_fenced_job(tmp_path, shared_tmp, 100))
    timeline = Timeline(run_id)
    first = c.wait(run_id, ("RUNNING",))
    victim = c.node_name(first["node_id"])
    survivor = ({"n5", "n6"} - {victim}).pop()
    wait_for("attempt 1 to print", lambda: len(_printed(shared_tmp, 1)) >= 10)
    t0 = _kill_agent(c, victim)
    took = _wait_offline(c, victim, t0)
    assert took < 3 * HEARTBEAT + 3, f"{victim} went OFFLINE {took:.1f} s after its agent died"
    second = wait_for("attempt 2 to run on the other node",
                      lambda: (r if (r := c.run(run_id))["attempt"] == 2 and r["status"] == "RUNNING" else None),
                      timeout=15)
    assert c.node_name(second["node_id"]) == survivor, second
    assert not run_processes(run_id, c.node_home(victim)), "attempt 1 still runs on the written-off node"
    done = c.wait(run_id, TERMINAL, timeout=60)
    spans = timeline.stop()
    assert done["status"] == "FINISHED" and done["attempt"] == 2, done
    assert spans[1][1] < spans[2][0], f"attempts overlapped: {spans}"
    printed1 = _printed(shared_tmp, 1)
    assert 10 <= len(printed1) < 100, "attempt 1 was not fenced"
    logged = _logged(c, run_id)
    assert logged[2] == _printed(shared_tmp, 2) and len(logged[2]) == 100
    assert logged[1] == printed1[:len(logged[1])]  # what was shipped before the agent died, in order
    assert [a["attempt"] for a in done["attempts"]] == [1] and victim in str(done["attempts"][0])
    marker = [x for x in (json.loads(ln) for ln in c.fedml("logs", run_id, "--json").stdout.split("\n") if ln)
              if x.get("stream") == "fedml"]
    assert marker and f"attempt 2 on node {survivor}" in marker[0]["line"], marker
    # the machine comes back: the rest of attempt 1's lines are shipped, and nothing of it runs again
    r = c.login_node(victim)
    assert r.returncode == 0, r.stderr
    kept = _wait_kept(c, run_id, printed1, 1, victim, "attempt 1's remaining lines")
    print(f"fencing (SIGKILL): attempt 1 last seen {spans[2][0] - spans[1][1]:.2f} s before attempt 2 first seen; "
          f"attempt 1 lines kept {len(kept)}/{len(printed1)} (after the node came back)")
    wait_for("the old node to settle attempt 1 (its run directory removed)",
             lambda: not list((c.node_home(victim) / "runs").glob(run_id + "*")), timeout=15)
    assert c.run(run_id)["status"] == "FINISHED"


def test_agent_sigstop_past_the_offline_timeout_never_runs_two_attempts_at_once(c: Cluster, tmp_path: Path,
                                                                                 shared_tmp: Path) -> None:
    """SIGSTOP the agent (a long GC pause, a frozen VM) past the offline timeout: the guard fences attempt 1 when
    the lease runs out, attempt 2 starts elsewhere only after; SIGCONT: the old agent ships attempt 1's last
    lines (kept, marked attempt 1) and does not rewrite the run's outcome."""
    run_id = c.launch(_fenced_job(tmp_path, shared_tmp, 100))
    timeline = Timeline(run_id)
    first = c.wait(run_id, ("RUNNING",))
    victim = c.node_name(first["node_id"])
    pid = c.agent_pid(victim)
    wait_for("attempt 1 to print", lambda: len(_printed(shared_tmp, 1)) >= 10)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("attempt 2 to run", lambda: (r := c.run(run_id))["attempt"] == 2 and r["status"] == "RUNNING",
                 timeout=20)
        time.sleep(1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    done = c.wait(run_id, TERMINAL, timeout=60)
    spans = timeline.stop()
    assert done["status"] == "FINISHED" and done["attempt"] == 2, done
    assert spans[1][1] < spans[2][0], f"attempts overlapped: {spans}"
    printed1 = _printed(shared_tmp, 1)
    assert 10 <= len(printed1) < 100, "attempt 1 was not fenced"
    _wait_kept(c, run_id, printed1, 1, victim, "every line attempt 1 printed")
    logged = _logged(c, run_id)
    assert logged[2] == _printed(shared_tmp, 2) and len(logged[2]) == 100
    wait_for(f"{victim} to be ONLINE", lambda: c.nodes()[victim]["state"] == "ONLINE", timeout=10)
    assert c.run(run_id)["status"] == "FINISHED"
    print(f"fencing (SIGSTOP): attempt 1 last seen {spans[2][0] - spans[1][1]:.2f} s before attempt 2 first seen "
          f"(overlap 0 s); attempt 1 lines kept {len(logged[1])}/{len(printed1)}, attempt 2 {len(logged[2])}/100")


def test_agent_sigkill_without_retry_fails_the_run_naming_the_node(c: Cluster, tmp_path: Path) -> None:
    run_id = c.launch(job(tmp_path, "echo up\nsleep 100", gpu_type="T4", labels={"host": "n6"}))
    c.wait(run_id, ("RUNNING",))
    orphan = wait_for("the job's processes", lambda: run_processes(run_id, c.node_home("n6")))
    t0 = _kill_agent(c, "n6")
    run = c.wait(run_id, TERMINAL, timeout=15)
    took = time.monotonic() - t0
    assert run["status"] == "FAILED", run
    assert not any(alive(p) for p in orphan), "the run is FAILED while its job still runs (it was not fenced)"
    assert "n6" in run["reason"] and "offline" in run["reason"], run["reason"]
    assert took < 3 * HEARTBEAT + 3, f"FAILED {took:.1f} s after the agent died"
    assert run["attempt"] == 1
    s = c.fedml("run", "status", run_id)
    assert s.returncode == 0 and "offline" in " ".join(s.stdout.split())
    assert c.nodes()["n6"]["state"] == "OFFLINE"
    r = c.login_node("n6")
    assert r.returncode == 0, r.stderr
    wait_for("n6 to be ONLINE", lambda: c.nodes()["n6"]["state"] == "ONLINE", timeout=10)
    wait_for("the orphan to be killed", lambda: not any(alive(p) for p in orphan), timeout=15)
    assert c.run(run_id)["status"] == "FAILED"  # the reconciliation's report does not rewrite history
    ok = c.launch(job(tmp_path / "after", "echo back", gpu_type="T4", labels={"host": "n6"}))
    assert c.wait(ok, TERMINAL)["status"] == "FINISHED"


def test_scheduler_sigkill_and_restart_mid_run_loses_nothing(c: Cluster, tmp_path: Path) -> None:
    n = 80
    run_id = c.launch(job(tmp_path, f'for i in $(seq 1 {n}); do echo "n $i"; sleep 0.1; done', gpus=1))
    c.wait(run_id, ("RUNNING",))
    time.sleep(1.0)
    assert c.head is not None
    c.head.kill()
    c.head.wait(timeout=10)
    c.http = None
    time.sleep(0.5)
    c.start_head()
    assert "Admin API key" not in c.head_log.read_text().split("listening on")[-1]  # not a new one
    f = c.fedml("logs", "-f", run_id, timeout=60)
    assert f.returncode == 0, f.stderr
    assert f.stdout.splitlines() == [f"n {i}" for i in range(1, n + 1)]
    run = c.run(run_id)
    assert run["status"] == "FINISHED" and run["attempt"] == 1, run
    wait_for("every node back ONLINE", lambda: all(x["state"] == "ONLINE" for x in c.nodes().values()), timeout=15)


def test_no_secret_in_logs_argv_or_store(c: Cluster) -> None:
    # its own user key and join token (it once counted on other tests having made some: alone it failed)
    r = c.fedml("scheduler", "key", "create", "carol")
    t = c.fedml("scheduler", "token", "create", "--node")
    assert r.returncode == 0 and t.returncode == 0, (r.stderr, t.stderr)
    c.secrets |= {r.stdout.strip(), t.stdout.strip()}
    for name in NODES:
        c.secrets.add((c.node_home(name) / "node_token").read_text().strip())
    assert len(c.secrets) >= 4 + len(NODES)
    head_log = c.head_log.read_text()
    # the banner went to a file, not a terminal: it says where the key is, never the key
    assert head_log.count("Admin API key saved to") == 1
    texts = {"head.log": head_log}
    for name in NODES:
        texts[f"{name}/agent.log"] = (c.node_home(name) / "agent.log").read_text()
    for db in (c.head_home / "local").glob("scheduler.db*"):
        texts[db.name] = db.read_bytes().decode("latin-1")
    for name in NODES:
        p = psutil.Process(c.agent_pid(name))
        texts[f"{name} agent argv"] = " ".join(p.cmdline())
    for where, text in texts.items():
        for s in c.secrets:
            assert s not in text, f"a secret ({s[:8]}…) appears in {where}"


# ---- clusters (FedML's `fedml cluster ...`, `fedml launch -c`) ------------------------------------------------

def test_a_named_cluster_takes_the_runs_launched_on_it_and_stops_as_a_whole(c: Cluster, tmp_path: Path) -> None:
    """`fedml cluster create pair n1 n2` (admin): `fedml launch -c pair` runs only there, whatever is free
    elsewhere; `cluster list/status/exists`; `cluster stop` drains both and stops their runs; `start` undrains;
    `kill` dissolves it. FedML's `-g GROUP` asks for nodes labelled group=GROUP (none here: refused)."""
    r = c.fedml("cluster", "create", "pair", "n1", "n2", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(n["name"] for n in json.loads(r.stdout)["nodes"]) == ["n1", "n2"]
    on_pair = []
    for i in range(5):
        r = c.fedml("launch", str(job(tmp_path / f"on{i}", "sleep 30", gpu_type=None)), "-c", "pair", "--detach")
        assert r.returncode == 0, r.stderr
        on_pair.append(r.stdout.strip())
    placed = c.wait_all(on_pair[:4], ("RUNNING",), timeout=30)
    pair_ids = {c.nodes()[n]["id"] for n in ("n1", "n2")}
    assert {r["node_id"] for r in placed} == pair_ids  # the pair's 4 GPUs
    assert c.run(on_pair[4])["status"] == "QUEUED"  # n3 and n4 are free, but not in the cluster
    listed = c.json("cluster", "list")
    assert [(x["name"], x["status"], x["active_runs"], x["gpus"]) for x in listed] == [("pair", "RUNNING", 4, 4)]
    assert c.fedml("cluster", "exists", "pair").returncode == 0
    assert c.fedml("cluster", "exists", "nope").returncode == 4
    sdk = ("import json, fedml; found = fedml.api.cluster_list(); print(json.dumps([[(x.cluster_name, x.status, "
           "len(x.devices)) for x in found.cluster_list], fedml.api.cluster_exists('pair'), "
           "fedml.api.cluster_status('nope')[0]]))")
    p = subprocess.run([sys.executable, "-c", sdk], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env=Fedml(c.base / "client").env({"FEDML_SERVER": c.url, "FEDML_API_KEY": c.admin}))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [[["pair", "RUNNING", 2]], True, None]
    r = c.fedml("launch", str(job(tmp_path / "nope", "echo", gpu_type=None)), "-c", "nope")
    assert r.returncode == 2 and "no cluster nope" in r.stderr
    r = c.fedml("launch", str(job(tmp_path / "grp", "echo", gpu_type=None)), "-g", "gpu-team")
    assert r.returncode == 2 and "group" in r.stderr, r.stderr
    r = c.fedml("cluster", "stop", "pair")
    assert r.returncode == 0, r.stderr
    ended = c.wait_all(on_pair, TERMINAL, timeout=30)
    assert {r["status"] for r in ended} == {"KILLED"}
    assert all(c.nodes()[n]["draining"] for n in ("n1", "n2"))
    assert c.json("cluster", "status", "pair")[0]["status"] == "STOPPED"
    assert c.fedml("cluster", "start", "pair").returncode == 0
    assert not any(c.nodes()[n]["draining"] for n in ("n1", "n2"))
    assert c.fedml("cluster", "kill", "pair").returncode == 0
    assert c.json("cluster", "list") == [] and c.fedml("cluster", "exists", "pair").returncode == 4


def test_autostop_drains_an_idle_cluster_and_stops_its_agents(tmp_path: Path) -> None:
    """`fedml cluster autostop NAME -t MIN --stop-agents`: once the node has had no run for MIN minutes it is
    drained and its agent (a real `fedml login --node` process) exits; `fedml login --node` on it brings it
    back, taking runs after `fedml cluster start`."""
    from .cluster import start_cluster

    gen = start_cluster(tmp_path, ("idle",), torch=False, heartbeat=0.5)
    c = next(gen)
    try:
        def agents() -> list[psutil.Process]:
            return [p for p in our_processes(tmp_path / "agents") if "agents.agent" in cmdline(p)]

        assert agents(), "no agent process to watch"
        assert c.fedml("cluster", "create", "lab", "idle").returncode == 0
        r = c.fedml("cluster", "autostop", "lab", "-t", "0.02", "--stop-agents")  # 1.2 s
        assert r.returncode == 0 and "its agent exits" in r.stderr, r.stderr
        wait_for("the idle node's agent to exit", lambda: not agents(), timeout=30)
        node = c.json("node", "list")[0]
        assert node["draining"] and node["stop_agent"]
        r = c.agents("login", c.admin, "--server", c.url, "--node", "--name", "idle", timeout=60)
        assert r.returncode == 0, r.stderr
        assert c.fedml("cluster", "autostop", "lab", "-t", "0").returncode == 0  # off: it stays this time
        assert c.fedml("cluster", "start", "lab").returncode == 0
        r = c.fedml("launch", str(write_job(tmp_path / "j", "echo back")), "-c", "lab")
        assert r.returncode == 0 and r.stdout.strip() == "back", r.stderr
        assert agents()
    finally:
        gen.close()
