"""Load: many concurrent launches against 2 scheduler replicas on Redis behind one address, 20 agents.

Every run must be accepted exactly once and finish exactly once (a marker line per execution in a shared
file), with its whole log. Size: FEDML_LOAD_RUNS (default 1,000) from FEDML_LOAD_CLIENTS (50) clients;
.ci/run sets a smaller count to bound CI time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fedml_cli.pack import pack
from scheduler.contract.transport import httpx

from .replicas import Replicas

pytestmark = [pytest.mark.load, pytest.mark.timeout(900)]

RUNS = int(os.environ.get("FEDML_LOAD_RUNS", "1000"))
CLIENTS = int(os.environ.get("FEDML_LOAD_CLIENTS", "50"))
AGENTS = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Replicas]:
    c = Replicas(tmp_path / "c", n=2, heartbeat=2.0)
    try:
        c.start()
        for i in range(AGENTS):
            c.start_agent(f"a{i:02d}", gpus="T4:2")
        c.wait_nodes([f"a{i:02d}" for i in range(AGENTS)], timeout=120)
        yield c
    finally:
        c.close()


def test_concurrent_launches_on_two_replicas_each_run_once(cluster: Replicas, tmp_path: Path, shared_tmp: Path) -> None:
    c = cluster
    markers = shared_tmp / "ran.txt"  # the jobs (fedml-job under a root agent) append to it
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data.txt").write_text("from the workspace\n")
    packed = pack(ws)
    with open(packed.path, "rb") as f:
        r = c.call("PUT", f"/blobs/{packed.sha256}", content=f.read())
    assert r.status_code == 201, r.text
    job = {"workspace": "ws", "computing": {"minimum_num_gpus": 1, "resource_type": "T4"},
           "job": f'echo "$FEDML_CURRENT_RUN_ID $CUDA_VISIBLE_DEVICES" >> {markers}\n'
                  'cat data.txt\necho "done $FEDML_CURRENT_RUN_ID"\n'}

    t0 = time.monotonic()
    answers = launch_all(c.server, lambda k: c.admin,
                         lambda k, i: {"job": job, "name": f"c{k}-{i}", "workspace_sha": packed.sha256})
    accepted = time.monotonic() - t0
    refused = [a for a in answers if a[0] != 201]
    assert not refused, refused[:5]
    ids = [a[1] for a in answers]
    assert len(ids) == RUNS and len(set(ids)) == RUNS

    runs = c.wait_terminal(ids, timeout=max(120, RUNS * 0.5))
    finished = time.monotonic() - t0
    bad = {i: (r["status"], r["reason"]) for i, r in runs.items() if r["status"] != "FINISHED" or r["attempt"] != 1}
    assert not bad, list(bad.items())[:5]
    listed = [r for r in c.call("GET", "/runs", params={"limit": 100_000}).json() if r["name"].startswith("c")]
    assert len(listed) == RUNS  # accepted once: no run the clients were not told about

    ran = collections.Counter(line.split()[0] for line in markers.read_text().splitlines())
    assert set(ran) == set(ids), (len(ran), len(ids))
    twice = [i for i, k in ran.items() if k != 1]
    assert not twice, twice[:5]
    held_once(runs)
    assert len({r["node_id"] for r in runs.values()}) == AGENTS  # every agent got work
    for i in ids:
        lines = [x["line"] for x in c.logs(i)]
        assert lines == ["from the workspace", f"done {i}"], (i, lines)
    print(f"\n{RUNS} launches from {CLIENTS} clients accepted in {accepted:.1f} s "
          f"({RUNS / accepted:.0f}/s); all finished after {finished:.1f} s on {AGENTS} agents, 2 replicas")


def test_concurrent_launches_of_two_teams_never_take_either_past_its_quota(cluster: Replicas) -> None:
    """Issue 18: RUNS launches at once from two teams (quotas 7 and 9 of the 40 GPUs) through both replicas. The
    store's count of each team's held GPUs, read atomically while the runs come and go, never passes the quota,
    reaches it (the quota binds), and is 0 again when all have ended; every run ends FINISHED, each GPU held by one
    run at a time."""
    c = cluster
    quotas = {"red": 7, "blue": 9}
    keys = {}
    for team, cap in quotas.items():
        assert c.call("POST", "/teams", json={"name": team}).status_code == 201
        assert c.call("PUT", f"/teams/{team}/quota", json={"gpus": {"any": cap}}).status_code == 200
        r = c.call("POST", "/keys", params={"name": f"{team}-user", "team": team})
        assert r.status_code == 201, r.text
        keys[team] = r.json()["secret"]
    job = {"computing": {"minimum_num_gpus": 1}, "job": "sleep 1"}

    url, prefix = c.url.split("?prefix=")
    held = redis.Redis.from_url(url)
    seen = {t: 0 for t in quotas}
    stop = False

    def watch() -> None:  # the store's own count, read in one step while launches and runs go on
        while not stop:
            for team in quotas:
                n = int(held.hget(f"{prefix}quotaheld", f"{team}\tany") or 0)
                assert n <= quotas[team], (team, n)
                seen[team] = max(seen[team], n)
            time.sleep(0.02)

    errors: list[BaseException] = []
    watcher = threading.Thread(target=lambda: _catch(watch, errors), daemon=True)
    watcher.start()
    try:
        answers = launch_all(c.server, lambda k: keys["red" if k % 2 else "blue"],
                             lambda k, i: {"job": job, "name": f"q{k}-{i}"})
        refused = [a for a in answers if a[0] != 201]
        assert not refused, refused[:5]
        ids = [a[1] for a in answers]
        runs = c.wait_terminal(ids, timeout=max(180, RUNS * 1.0))
    finally:
        stop = True
        watcher.join(timeout=5)
    assert not errors, errors
    assert seen == quotas, seen  # each team's quota bound, and was never passed
    assert all(r["status"] == "FINISHED" for r in runs.values()), {r["status"] for r in runs.values()}
    assert {t: int(held.hget(f"{prefix}quotaheld", f"{t}\tany") or 0) for t in quotas} == {"red": 0, "blue": 0}
    held_once(runs)


def _catch(fn: object, errors: list[BaseException]) -> None:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:  # (reported by the test's thread)
        errors.append(exc)


def launch_all(server: str, key_of: Callable[[int], str], body_of: Callable[[int, int], dict[str, object]]
               ) -> list[tuple[int, str]]:
    """RUNS launches at once from CLIENTS clients (client k with key_of(k), its i-th body body_of(k, i)): each
    (status, the run's id or the refusal)."""

    async def client(k: int, n: int) -> list[tuple[int, str]]:
        out = []
        async with httpx.AsyncClient(base_url=server + "/api/v1", timeout=60,
                                     headers={"Authorization": f"Bearer {key_of(k)}"}) as http:
            for i in range(n):
                r = await http.post("/runs", json=body_of(k, i))
                out.append((r.status_code, r.json()["id"] if r.status_code == 201 else r.text))
        return out

    async def all_clients() -> list[tuple[int, str]]:
        shares = [RUNS // CLIENTS + (1 if k < RUNS % CLIENTS else 0) for k in range(CLIENTS)]
        parts = await asyncio.gather(*(client(k, n) for k, n in enumerate(shares)))
        return [x for part in parts for x in part]

    return asyncio.run(all_clients())


def held_once(runs: dict[str, dict[str, object]]) -> None:
    """No GPU held by two runs at once: each (node, GPU)'s runs do not overlap in time."""
    by_gpu: dict[tuple[object, object], list[tuple[float, float]]] = collections.defaultdict(list)
    for r in runs.values():
        by_gpu[(r["node_id"], r["gpus"][0])].append((r["started_at"], r["ended_at"]))  # type: ignore[index]
    for spans in by_gpu.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
