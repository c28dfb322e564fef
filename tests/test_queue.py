"""The queue's standing: place in line, who is ahead on the same GPUs, estimated starts (scheduler/queueview.py),
and the scheduler's view of it (Scheduler.queue) over a real SQLite store."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from scheduler import auth
from scheduler.contract.models import GpuInfo, NodeInfo, Principal, RunCreate
from scheduler.notify import Notifier
from scheduler.queueview import INF, Entry, Gpu, Quota, stand
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit


def entry(run_id: str, owner: str = "a", shape: str = "s", gpus: int = 1, count: int = 1,
          duration: float | None = 50.0) -> Entry:
    return Entry(run_id, owner, shape, gpus, count, duration, "max_duration" if duration else None)


def test_each_run_starts_when_the_gpus_before_it_free_up() -> None:
    gpus = {"n0": {0: Gpu(100.0)}, "n1": {0: Gpu(200.0)}}
    out = stand([entry("r1"), entry("r2"), entry("r3")], gpus, lambda s: {"n0": [0], "n1": [0]}, now=0.0)
    # r1 takes n0 at 100 until 150; r2 then n0 at 150 (n1 frees at 200); r3 n1 at 200
    assert [s.start_at for s in out] == [100.0, 150.0, 200.0]
    assert [s.position for s in out] == [1, 2, 3]
    assert [(s.ahead_runs, s.ahead_gpus) for s in out] == [(0, 0), (1, 1), (2, 2)]


def test_a_gang_waits_for_all_its_nodes_and_a_free_gpu_means_now() -> None:
    gpus = {"n0": {0: Gpu(0.0), 1: Gpu(0.0)}, "n1": {0: Gpu(30.0), 1: Gpu(90.0)}}
    out = stand([entry("one", gpus=2, count=1), entry("gang", gpus=2, count=2)], gpus,
                lambda s: {"n0": [0, 1], "n1": [0, 1]}, now=0.0)
    assert out[0].start_at == 0.0 and out[0].basis == "free now"
    assert out[1].start_at == 90.0  # n1's second GPU at 90; n0 is free again at 50 (the first took it)


def test_no_basis_names_the_run_in_the_way() -> None:
    gpus = {"n0": {0: Gpu(INF, "run-x (bob) runs with no max_duration")}}
    out = stand([entry("r1"), entry("r2", duration=None), entry("r3")], gpus, lambda s: {"n0": [0]}, now=0.0)
    assert out[0].start_at is None and "run-x (bob)" in (out[0].no_basis or "")
    assert out[2].start_at is None and "run-x (bob)" in (out[2].no_basis or "")
    gpus = {"n0": {0: Gpu(10.0)}}
    out = stand([entry("r1", duration=None), entry("r2")], gpus, lambda s: {"n0": [0]}, now=0.0)
    assert out[0].start_at == 10.0
    assert out[1].start_at is None and "r1 (a) has no max_duration" in (out[1].no_basis or "")


def test_a_run_of_a_team_at_its_quota_starts_when_its_teams_runs_give_enough_back() -> None:
    # Free GPUs everywhere, but team t's quota of 2 is held until 100 and 300; r1 (1 GPU) may start at 100, then
    # holds it until 150; r2 (2 GPUs) needs two of the quota free: at 300 (r1's ended at 150, the other at 300).
    gpus = {"n0": {i: Gpu(0.0) for i in range(4)}}
    quotas = {"t\tany": Quota(2, [100.0, 300.0])}
    e1, e2 = entry("r1"), entry("r2", gpus=2)
    e1.quota = e2.quota = "t\tany"
    other = entry("r3")  # another team's: no quota, free now
    out = stand([e1, e2, other], gpus, lambda s: {"n0": [0, 1, 2, 3]}, now=0.0, quotas=quotas)
    assert [s.start_at for s in out] == [100.0, 300.0, 0.0]
    # a quota held by a run with no expected end: no basis, saying whose
    quotas = {"t\tany": Quota(1, [INF], "run-y (ann) runs with no max_duration")}
    out = stand([e1], {"n0": {0: Gpu(0.0)}}, lambda s: {"n0": [0]}, now=0.0, quotas=quotas)
    assert out[0].start_at is None and "run-y (ann)" in (out[0].no_basis or "")


def test_ahead_counts_only_runs_that_could_use_the_same_nodes() -> None:
    nodes = {"a100": {"n0": [0]}, "t4": {"n1": [0]}, "any": {"n0": [0], "n1": [0]}}
    gpus = {"n0": {0: Gpu(0.0)}, "n1": {0: Gpu(0.0)}}
    out = stand([entry("x", "alice", "a100", gpus=1), entry("y", "bob", "t4", gpus=1),
                 entry("z", "carol", "any", gpus=1)], gpus, nodes.__getitem__, now=0.0)
    assert out[1].ahead_runs == 0  # alice's A100 run is not in bob's way
    assert out[2].ahead_owners == {"alice": [1, 1], "bob": [1, 1]}
    assert stand([entry("w", shape="a100")], {}, {"a100": {}}.__getitem__, now=0.0)[0].no_basis == "no node it may use"


def person(s: Scheduler, name: str, scope: str = "user") -> Principal:
    who = auth.verify(s.store, auth.issue(s.store, name=name, scope=scope, owner=name)[1])
    assert who is not None
    return who


def test_the_scheduler_shows_a_user_their_place_and_who_is_ahead(tmp_path: Path) -> None:
    s = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0, rng=random.Random(7))
    admin, alice, bob = person(s, "root", "admin"), person(s, "alice"), person(s, "bob")
    s.register_node(NodeInfo(name="n0", job_user="fedml-job",
                             gpus=[GpuInfo(index=i, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for i in range(2)]),
                    admin)
    one_gpu = {"computing": {"minimum_num_gpus": 1}}
    busy = [s.create_run(RunCreate(job={"job": "sleep 1", "max_duration": "10m", **one_gpu}), alice) for _ in range(2)]
    assert s.schedule_pass() == 2
    b1 = s.create_run(RunCreate(job={"job": "x", "max_duration": "1h", **one_gpu}), bob)
    a1 = s.create_run(RunCreate(job={"job": "x", **one_gpu}), alice)
    b2 = s.create_run(RunCreate(job={"job": "x", "max_duration": "5m", **one_gpu}), bob)
    s.schedule_pass()
    view = s.queue(admin)
    assert [r["id"] for r in view["runs"]] == [b1.id, a1.id, b2.id] and view["total"] == 3
    first, second, third = view["runs"]
    started = min(r.started_at or r.created_at for r in (s.get_run(b.id) for b in busy))
    assert first["start_at"] == pytest.approx(started + 600, abs=5) and first["basis"]
    assert second["start_at"] == pytest.approx(first["start_at"], abs=5)  # the other busy GPU, at the same time
    # b1 holds one GPU for its hour; alice's run, with no end to go by, holds the other: b2 waits for b1
    assert third["start_at"] == pytest.approx(first["start_at"] + 3600, abs=5)
    assert "no node with 1 free GPU" in first["reason"]
    mine = s.queue(bob)  # a user sees their own rows; the others are counted
    assert [r["id"] for r in mine["runs"]] == [b1.id, b2.id]
    assert mine["runs"][1]["ahead"] == {"runs": 2, "gpus": 2, "owners": [
        {"owner": "alice", "team": None, "runs": 1, "gpus": 1}, {"owner": "bob", "team": None, "runs": 1, "gpus": 1}]}


def reference(entries: list[Entry], gpus: dict[str, dict[int, Gpu]], eligible: Any, now: float) -> list[float | None]:
    """The estimate written plainly (every node looked at for every run), to check the heap-kept one against."""
    out: list[float | None] = []
    for e in entries:
        mine = eligible(e.shape)
        options = []
        for node, idx in mine.items():
            free = sorted((gpus[node][g] for g in idx), key=lambda x: x.free_at)
            if len(free) >= e.gpus:
                options.append((free[e.gpus - 1].free_at, node, free[: e.gpus]))
        if len(options) < e.count:
            out.append(None)
            continue
        options.sort(key=lambda o: (o[0], o[1]))  # (ties: by node, as the heap breaks them)
        chosen = options[: e.count]
        start = max(now, chosen[-1][0])
        out.append(None if start == INF else start)
        end = INF if e.duration is None or start == INF else start + e.duration
        for _, _, got in chosen:
            for g in got:
                g.free_at = end
    return out


def test_the_heap_kept_estimate_agrees_with_looking_at_every_node() -> None:
    rng = random.Random(5)
    for _ in range(200):
        nodes = {f"n{i}": rng.choice([2, 4, 8]) for i in range(rng.randint(1, 12))}
        shapes = {s: {n: list(range(k)) for n, k in nodes.items() if rng.random() < 0.7} for s in "abc"}

        def fresh(nodes: dict[str, int] = nodes) -> dict[str, dict[int, Gpu]]:
            r2 = random.Random(len(nodes))
            return {n: {g: Gpu(r2.choice([0.0, 10.0, 50.0, 300.0])) for g in range(k)} for n, k in nodes.items()}

        entries = [entry(f"r{i}", shape=rng.choice("abc"), gpus=rng.choice([1, 2, 4]), count=rng.choice([1, 1, 2]),
                         duration=rng.choice([5.0, 60.0, 600.0])) for i in range(rng.randint(1, 30))]
        got = [s.start_at for s in stand(entries, fresh(), shapes.__getitem__, now=0.0)]
        assert got == reference(entries, fresh(), shapes.__getitem__, 0.0)
