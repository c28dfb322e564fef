"""The scheduler's placement and run settlement, in process, over a real SQLite store (no HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scheduler import auth
from scheduler.contract.errors import ApiError as Rejected
from scheduler.contract.errors import status_of
from scheduler.contract.models import (
    ClusterCreate,
    GpuInfo,
    GpuSample,
    Node,
    NodeInfo,
    PollResponse,
    Principal,
    Run,
    RunCreate,
    RunStatus,
    StatusReport,
    attempt_ref,
)
from scheduler.notify import Notifier
from scheduler.placement import Candidate, NoFit, Request, place, sample_limit
from scheduler.service import Scheduler
from scheduler.service.core import GroupCommit
from scheduler.sqlite_store import SQLiteStore
from scheduler.store import AlreadyExists, NotFound

from .conftest import write_open

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def gpus(name: str, n: int) -> list[GpuInfo]:
    return [GpuInfo(index=i, name=name, memory_mb=81920) for i in range(n)]


@pytest.fixture
def sched(tmp_path: Path) -> Scheduler:
    return Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0, rng=random.Random(7))


def admin(s: Scheduler) -> Principal:
    who = auth.verify(s.store, auth.issue(s.store, name="t", scope="admin", owner="admin")[1])
    assert who is not None
    return who


def join(s: Scheduler, name: str, n: int = 2, kind: str = "NVIDIA A100 80GB PCIe", **kw: object) -> str:
    """A shared node: joined by an admin, its agent runs jobs as another user (a root agent)."""
    kw.setdefault("job_user", "fedml-job")
    return s.register_node(NodeInfo(name=name, gpus=gpus(kind, n), **kw), admin(s)).node.id  # type: ignore[arg-type]


def test_tenancy_decides_whose_runs_a_node_takes(sched: Scheduler) -> None:
    alice = auth.verify(sched.store, auth.issue(sched.store, name="alice", scope="user", owner="alice")[1])
    bob = auth.verify(sched.store, auth.issue(sched.store, name="bob", scope="user", owner="bob")[1])
    # a user's own node is private to them, whatever its agent says; an admin-joined agent that cannot isolate
    # jobs (not root) is single-tenant for the admin; a join-token/admin node with a job user is shared
    mine = sched.register_node(NodeInfo(name="mine", job_user="fedml-job", labels={"k": "m"}), alice, peer="127.0.0.9")
    assert mine.node.owner == "alice" and mine.node.address == "127.0.0.9"
    assert sched.register_node(NodeInfo(name="plain", labels={"k": "p"}), admin(sched)).node.owner == "admin"
    assert sched.register_node(NodeInfo(name="shared", job_user="fedml-job"), admin(sched)).node.owner is None
    with pytest.raises(Rejected, match="private to another user"):
        sched.create_run(RunCreate(job={"job": "echo", "labels": {"k": "m"}}), bob)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="private to another user"):
        sched.create_run(RunCreate(job={"job": "echo", "labels": {"k": "p"}}), alice)  # type: ignore[arg-type]
    assert sched.create_run(RunCreate(job={"job": "echo", "labels": {"k": "m"}}), alice).owner == "alice"  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="exists already"):
        sched.register_node(NodeInfo(name="mine"), bob)  # type: ignore[arg-type]


def silence(s: Scheduler, node_id: str, seconds: float = 10.0) -> None:
    """As if the node's last heartbeat was `seconds` ago (and the scheduler has been up longer)."""
    s._started = 0.0
    s.store.heartbeat(node_id, time.time() - seconds)
    if node_id in s._heard:  # (what this scheduler itself heard from its agent, too)
        s._heard[node_id] = time.time() - seconds
    s.store.upsert_node(s.store.get_node(node_id).model_copy(update={"last_seen": time.time() - seconds}))
    s._nodes_changed()  # a write by another process: its "nodes" wake-up is relayed (the node cache looks again)


def submit(s: Scheduler, job: str = "echo hi", **spec: object) -> str:
    return s.create_run(RunCreate(job={"job": job, **spec})).id


def one_running_one_waiting(s: Scheduler) -> tuple[str, str, str]:
    """A node with one GPU, a one-GPU run placed on it and another waiting behind it: (node, placed, waiting)."""
    node = join(s, "a", 1)
    first = submit(s, computing={"minimum_num_gpus": 1})
    assert s.schedule_pass() == 1
    second = submit(s, computing={"minimum_num_gpus": 1})
    assert s.schedule_pass() == 0  # blocked: the one GPU is taken
    return node, first, second


def test_gpus_are_never_shared_and_the_queue_waits_with_a_reason(sched: Scheduler) -> None:
    a, b = join(sched, "a"), join(sched, "b")
    runs = [submit(sched, computing={"minimum_num_gpus": 1, "resource_type": "A100-80G"}) for _ in range(5)]
    assert sched.schedule_pass() == 4
    placed = [sched.get_run(r) for r in runs[:4]]
    pairs = {(r.node_id, g) for r in placed for g in r.gpus}
    assert len(pairs) == 4 and {n for n, _ in pairs} == {a, b}
    waiting = sched.get_run(runs[4])
    assert waiting.status == RunStatus.QUEUED
    assert "no node with 1 free A100-80G GPU" in waiting.reason and "2 nodes have them busy" in waiting.reason
    # one finishes: the waiting run gets exactly the freed GPU, placed in the report's own commit (SQLite)
    done = placed[0]
    sched.report(done.id, StatusReport(status=RunStatus.RUNNING), done.node_id)
    sched.report(done.id, StatusReport(status=RunStatus.FINISHED, exit_code=0), done.node_id)
    now = sched.get_run(runs[4])
    assert now.status == RunStatus.STARTING and (now.node_id, now.gpus) == (done.node_id, done.gpus)
    assert sched.schedule_pass() == 0  # that pass was done


def test_never_fitting_job_is_rejected_with_the_reason(sched: Scheduler) -> None:
    join(sched, "a")
    with pytest.raises(Rejected) as e:
        submit(sched, computing={"minimum_num_gpus": 4, "resource_type": "A100-80G"})
    assert status_of(e.value) == 422 and "fewer than 4 A100-80G" in str(e.value)
    with pytest.raises(Rejected):
        submit(sched, computing={"minimum_num_gpus": 1, "resource_type": "H100"})
    assert sched.store.list_runs() == []


def test_gang_is_all_or_nothing_on_distinct_nodes(sched: Scheduler) -> None:
    join(sched, "a", 1), join(sched, "b", 1)
    first = submit(sched, num_nodes=2, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    run = sched.get_run(first)
    assert run.status == RunStatus.STARTING and len({p.node_id for p in run.placements}) == 2
    second = submit(sched, num_nodes=2, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    assert sched.get_run(second).status == RunStatus.QUEUED  # not one rank placed alone
    assert all(not r.placements for r in [sched.get_run(second)])


def test_gang_rank_failure_stops_the_others_then_fails_the_run(sched: Scheduler) -> None:
    join(sched, "a", 1), join(sched, "b", 1)
    rid = submit(sched, num_nodes=2)
    sched.schedule_pass()
    r0, r1 = sched.get_run(rid).placements
    for p in (r0, r1):
        sched.report(rid, StatusReport(status=RunStatus.RUNNING), p.node_id)
    run = sched.report(rid, StatusReport(status=RunStatus.FAILED, exit_code=3, reason="job exited with code 3"),
                       r1.node_id)
    assert run.status == RunStatus.RUNNING and run.stop_requested and "rank 1" in run.reason
    assert sched.poll_once(r0.node_id, [attempt_ref(rid, 1)]).stop == [attempt_ref(rid, 1)]  # the other rank stops
    run = sched.report(rid, StatusReport(status=RunStatus.KILLED, exit_code=143), r0.node_id)
    assert run.status == RunStatus.FAILED and run.exit_code == 3


def test_silent_node_goes_offline_and_its_run_is_retried_elsewhere(sched: Scheduler) -> None:
    a, b = join(sched, "a", 1), join(sched, "b", 1)
    rid = submit(sched, retry={"max_attempts": 2, "on": ["lost"]}, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    first = sched.get_run(rid).node_id
    other = b if first == a else a
    sched.report(rid, StatusReport(status=RunStatus.RUNNING), first)
    silence(sched, first)
    sched.poll_once(other, [])
    assert [n.id for n in sched.check_heartbeats()] == [first]
    run = sched.get_run(rid)  # requeued, and placed at once into the GPU that was freed (in the same commit)
    assert run.attempt == 2 and "went offline" in (run.attempts[-1].reason or "")
    assert run.status == RunStatus.STARTING and run.node_id == other  # the offline node is not used
    # the node comes back still running attempt 1: it is told to stop it
    assert sched.poll_once(first, [attempt_ref(rid, 1)]).stop == [attempt_ref(rid, 1)]
    assert sched.poll_once(other, [attempt_ref(rid, 2)]).stop == []  # the new attempt is left alone


def test_attempt_requeued_onto_the_same_node_is_a_new_attempt(sched: Scheduler) -> None:
    a = join(sched, "a", 1)
    rid = submit(sched, retry={"max_attempts": 2, "on": ["lost"]}, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    sched.report(rid, StatusReport(status=RunStatus.RUNNING, attempt=1), a)
    silence(sched, a)
    sched.check_heartbeats()
    resp = sched.poll_once(a, [attempt_ref(rid, 1)])  # back online, still running attempt 1
    assert resp.stop == [attempt_ref(rid, 1)] and resp.start == []
    sched.schedule_pass()
    resp = sched.poll_once(a, [attempt_ref(rid, 1)])
    assert resp.stop == [attempt_ref(rid, 1)] and [x.run.attempt for x in resp.start] == [2]
    with pytest.raises(Rejected) as e:  # attempt 1's late report cannot settle attempt 2
        sched.report(rid, StatusReport(status=RunStatus.KILLED, attempt=1), a)
    assert status_of(e.value) == 409
    assert sched.get_run(rid).status == RunStatus.STARTING


def test_lost_without_retry_fails(sched: Scheduler) -> None:
    a = join(sched, "a", 1)
    rid = submit(sched)
    sched.schedule_pass()
    sched.remove_node("a", admin(sched))
    run = sched.get_run(rid)
    assert run.status == RunStatus.FAILED and "removed" in run.reason and a not in [n.id for n in sched.store.list_nodes()]


def test_priority_then_fifo_and_the_head_job_is_not_starved(sched: Scheduler) -> None:
    join(sched, "a", 2)
    busy = submit(sched, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    big = submit(sched, computing={"minimum_num_gpus": 2})  # waits for the whole node
    small = submit(sched, computing={"minimum_num_gpus": 1})  # would fit now, but the node is held for `big`
    urgent = submit(sched, computing={"minimum_num_gpus": 2}, priority=5)
    sched.schedule_pass()
    assert [sched.get_run(r).status for r in (big, small, urgent)] == [RunStatus.QUEUED] * 3
    b = sched.get_run(busy)
    sched.report(busy, StatusReport(status=RunStatus.FINISHED, exit_code=0), b.node_id)
    sched.schedule_pass()
    assert sched.get_run(urgent).status == RunStatus.STARTING  # higher priority first
    assert sched.get_run(small).status == RunStatus.QUEUED


def test_the_head_job_holds_only_the_node_it_would_get_and_small_jobs_flow_elsewhere(sched: Scheduler) -> None:
    """It once held every node it could use: 3 nodes with a GPU free each sat idle behind one 2-GPU job."""
    for n in ("a", "b", "c"):
        join(sched, n, 2, labels={"host": n})
    busy = [submit(sched, computing={"minimum_num_gpus": 1}, labels={"host": n}) for n in ("a", "b", "c")]
    sched.schedule_pass()
    assert len({sched.get_run(r).node_id for r in busy}) == 3  # one GPU busy on each node
    big = submit(sched, computing={"minimum_num_gpus": 2})
    smalls = [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(3)]
    assert sched.schedule_pass() == 2
    got = [sched.get_run(r) for r in smalls]
    assert [r.status for r in got] == [RunStatus.STARTING, RunStatus.STARTING, RunStatus.QUEUED], got
    held = {sched.find_node(n).id for n in "abc"} - {r.node_id for r in got[:2]}
    assert len(held) == 1  # the one node held for `big`, with its GPU left free
    assert "1 node is held for a job ahead in the queue; 2 nodes have them busy" in (got[2].reason or ""), got[2].reason
    owner = next(r for r in busy if sched.get_run(r).node_id in held)
    sched.report(owner, StatusReport(status=RunStatus.FINISHED, exit_code=0), next(iter(held)))
    sched.schedule_pass()
    assert sched.get_run(big).status == RunStatus.STARTING and sched.get_run(big).node_id in held


def test_no_starvation_under_a_stream_of_small_jobs(sched: Scheduler) -> None:
    """However small jobs keep coming and finishing, the 4-GPU head job starts once the GPUs it holds free up."""
    rng = random.Random(3)
    for n in ("a", "b", "c", "d"):
        join(sched, n, 4)
    running = [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(16)]
    sched.schedule_pass()
    big = submit(sched, computing={"minimum_num_gpus": 4})
    for step in range(200):  # noqa: B007 - reported after the loop
        running = [r for r in running if sched.get_run(r).status in (RunStatus.STARTING, RunStatus.RUNNING)]
        if running:  # one random small job ends, two more arrive
            done = running.pop(rng.randrange(len(running)))
            sched.report(done, StatusReport(status=RunStatus.FINISHED, exit_code=0), sched.get_run(done).node_id)
        running += [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(2)]
        sched.schedule_pass()
        if sched.get_run(big).status == RunStatus.STARTING:
            break
    assert sched.get_run(big).status == RunStatus.STARTING, "the head job starved"
    print(f"no starvation: the 4-GPU head job started after {step + 1} small jobs ended ({2 * (step + 1)} arrived)")


def test_drained_node_gets_no_new_runs(sched: Scheduler) -> None:
    join(sched, "a", 1), join(sched, "b", 1)
    sched.set_draining("a", True, admin(sched))
    rids = [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(2)]
    sched.schedule_pass()
    nodes = {sched.get_run(r).node_id for r in rids}
    assert nodes == {sched.find_node("b").id, None}


def test_price_cap_and_labels_filter_nodes(sched: Scheduler) -> None:
    join(sched, "cheap", 1, price_per_gpu_hour=1.0, labels={"zone": "a"})
    join(sched, "dear", 1, price_per_gpu_hour=9.0, labels={"zone": "b"})
    r1 = submit(sched, computing={"minimum_num_gpus": 1, "maximum_cost_per_hour": "$2"})
    sched.schedule_pass()
    assert sched.get_run(r1).node_id == sched.find_node("cheap").id
    r2 = submit(sched, computing={"minimum_num_gpus": 1}, labels={"zone": "b"})
    sched.schedule_pass()
    assert sched.get_run(r2).node_id == sched.find_node("dear").id


def test_a_node_that_changes_is_judged_again_not_by_what_it_was(sched: Scheduler) -> None:
    """A pass keeps each node's candidate between passes: a node that changes (here its labels) is judged anew, so
    a run that could not use it before can now."""
    join(sched, "a", 1, labels={"zone": "x"})
    b = join(sched, "b", 1)
    first = submit(sched, computing={"minimum_num_gpus": 1}, labels={"zone": "x"})
    sched.schedule_pass()
    assert sched.get_run(first).node_id == sched.find_node("a").id
    second = submit(sched, computing={"minimum_num_gpus": 1}, labels={"zone": "x"})
    sched.schedule_pass()  # b has a free GPU but lacks the label
    assert sched.get_run(second).status == RunStatus.QUEUED
    node = sched.store.get_node(b)
    assert node is not None
    sched.store.upsert_node(node.model_copy(update={"labels": {"zone": "x"}}))
    sched._nodes_changed()
    sched.schedule_pass()
    assert sched.get_run(second).node_id == b


def test_a_pass_asks_the_store_only_for_heartbeats_it_has_not_just_heard(sched: Scheduler) -> None:
    """A node whose agent this scheduler heard (a poll, a report) within half the heartbeat timeout is online
    without reading its heartbeat from the store (a round trip on Redis per freed slot); one heard longer ago
    is read, and a node the store has OFFLINE stays offline whatever was heard."""
    a, b = join(sched, "a", 2), join(sched, "b", 2)
    asked: list[list[str]] = []
    store_beats = sched.store.heartbeats

    def heartbeats(ids: list[str] | None = None) -> dict[str, float]:
        asked.append(sorted(ids) if ids is not None else ["(all)"])
        return store_beats(ids)

    sched.store.heartbeats = heartbeats  # type: ignore[method-assign]
    del sched._heard[b]  # b joined through another replica: not heard here
    sched.poll_once(a, [])  # a is heard now
    first = submit(sched, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    assert asked[-1] == [b] and sched.get_run(first).status == RunStatus.STARTING
    sched._heard[a] = time.time() - sched.heartbeat_timeout  # heard too long ago: read again
    second = submit(sched, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    assert asked[-1] == sorted([a, b]) and sched.get_run(second).status == RunStatus.STARTING
    for n in (a, b):
        node = sched.store.get_node(n)
        assert node is not None
        sched.store.upsert_node(node.model_copy(update={"state": "OFFLINE"}))
        sched._heard[n] = time.time()
    sched._nodes_changed()
    third = submit(sched, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    assert sched.get_run(third).status == RunStatus.QUEUED


def test_placement_looks_at_a_bounded_sample_of_nodes() -> None:
    from scheduler.contract.models import Node

    now = time.time()
    cands = [Candidate(node=Node(id=f"n{i}", name=f"n{i}", gpus=gpus("A100", 8), last_seen=now),
                       free=gpus("A100", 8), now=now, heartbeat_timeout=30) for i in range(10_000)]
    req = Request(gpus=1)
    assert sample_limit(req, 10_000) == 2  # power of two choices for a batch job
    assert sample_limit(Request(gpus=1, service=True), 10_000) == 14  # log2 n for a service
    assert sample_limit(Request(gpus=1, count=3), 10_000) == 4
    calls = 0
    import scheduler.placement as pl

    orig = pl.PIPELINE[:]
    def counting(r: Request, c: Candidate) -> None:
        nonlocal calls
        calls += 1
    pl.PIPELINE.insert(0, counting)  # type: ignore[arg-type]
    try:
        t = time.perf_counter()
        out = place(req, cands, rng=random.Random(1))
        elapsed = time.perf_counter() - t
    finally:
        pl.PIPELINE[:] = orig
    assert not isinstance(out, NoFit) and len(out) == 1
    assert calls == 2 and elapsed < 0.5


def pass_visiting(sched: Scheduler) -> tuple[int, list[Candidate]]:
    """A scheduling pass: (how many runs it placed, the candidates placement's walk ran its filters on, as they
    were then)."""
    import scheduler.placement as pl

    visited: list[Candidate] = []

    def counting(r: Request, c: Candidate) -> None:
        visited.append(dataclasses.replace(c, free=list(c.free)))  # (as it was then)

    pl.PIPELINE.insert(0, counting)  # type: ignore[arg-type]
    try:
        return sched.schedule_pass(), visited
    finally:
        pl.PIPELINE.remove(counting)  # type: ignore[arg-type]


def test_a_pass_walks_only_the_nodes_with_the_gpu_type_asked_for(sched: Scheduler) -> None:
    """Cands.kind: a placement's random walk visits the nodes that have GPUs of the type asked for, not the
    others (whose every filter ran to say no): with 2 A100 nodes among 30 H100 ones, placing A100 runs until both
    are full, and the one that then finds no room, never looks at an H100 node; a node whose GPUs change is of
    its new kind from the next pass."""
    a100 = {join(sched, f"a{i}", 2) for i in range(2)}
    h100 = {join(sched, f"h{i}", 2, kind="NVIDIA H100 80GB HBM3") for i in range(30)}
    for n in a100 | h100:
        sched.poll_once(n, [])
    runs = [submit(sched, computing={"minimum_num_gpus": 1, "resource_type": "A100-80G"}) for _ in range(5)]
    placed, visited = pass_visiting(sched)
    assert placed == 4 and visited and {c.node.id for c in visited} <= a100
    assert {r.node_id for r in map(sched.store.get_run, runs[:4])} == a100  # (both full)
    waiting = sched.store.get_run(runs[4])
    assert waiting.status == RunStatus.QUEUED and waiting.reason == "no node with 1 free A100-80G GPU"
    h = submit(sched, computing={"minimum_num_gpus": 1, "resource_type": "H100"})  # another kind: its own walk
    assert sched.schedule_pass() == 1 and sched.store.get_run(h).node_id in h100
    changed = next(n for n in sorted(h100) if n != sched.store.get_run(h).node_id)  # its GPUs are A100s now
    node = sched.store.get_node(changed)
    sched.store.upsert_node(node.model_copy(update={"gpus": gpus("NVIDIA A100 80GB PCIe", 2)}))
    sched._nodes_changed()
    assert sched.schedule_pass() == 1 and sched.store.get_run(runs[4]).node_id == changed


def test_a_pass_that_uses_up_a_gpu_kind_does_not_walk_its_filled_nodes(sched: Scheduler) -> None:
    """_Pass.took: the nodes a pass fills stay in its list of nodes with a free GPU until they are half of it,
    or half of its nodes of the GPU kind being placed. With A100 nodes a third of the cluster, a pass that fills
    every A100 (the others staying free) once walked ever more filled A100 nodes per placement; now a placement
    visits a bounded number of them."""
    a100 = {join(sched, f"a{i}", 1) for i in range(60)}
    others = {join(sched, f"h{i}", 1, kind="NVIDIA H100 80GB HBM3") for i in range(120)}
    for n in a100 | others:
        sched.poll_once(n, [])
    for _ in range(60):
        submit(sched, computing={"minimum_num_gpus": 1, "resource_type": "A100-80G"})
    placed, visited = pass_visiting(sched)
    full = [c.node.id for c in visited if not c.free]
    # (347 without the rebuild by kind: the last placements walked every filled A100 node)
    assert placed == 60 and set(full) <= a100 and len(full) <= 2 * 60, len(full)


def test_user_keys_see_only_their_runs_and_node_keys_only_their_node(sched: Scheduler) -> None:
    a = join(sched, "a", 1)
    b = join(sched, "b", 1)
    alice = auth.verify(sched.store, auth.issue(sched.store, name="alice", scope="user", owner="alice")[1])
    bob = auth.verify(sched.store, auth.issue(sched.store, name="bob", scope="user", owner="bob")[1])
    ra = sched.create_run(RunCreate(job={"job": "echo a"}), alice).id  # type: ignore[arg-type]
    rb = sched.create_run(RunCreate(job={"job": "echo b"}), bob).id  # type: ignore[arg-type]
    assert [r.id for r in sched.list_runs(alice, None, 100)] == [ra]  # type: ignore[arg-type]
    with pytest.raises(Rejected) as e:
        sched.get_run(rb, alice)  # type: ignore[arg-type]
    assert status_of(e.value) == 404
    node_key = [k for k in sched.store.list_keys() if k.scope == "node" and k.owner == a][0]
    node_a = Principal(scope="node", owner=a, key_id=node_key.id)
    with pytest.raises(Rejected) as e:
        sched.poll_once(b, [], node_a)
    assert status_of(e.value) == 403
    with pytest.raises(Rejected):
        sched.list_runs(node_a, None, 10)
    assert auth.verify(sched.store, "fml_u_wrong") is None
    assert all(len(k.hash) == 64 for k in sched.store.list_keys())  # stored as digests only


def test_heartbeats_stay_in_memory_and_only_state_changes_are_written(sched: Scheduler) -> None:
    a = join(sched, "a", 1)
    writes: list[str] = []

    def counted(s: Scheduler) -> Scheduler:
        orig = s.store.touch_node
        s.store.touch_node = lambda nid, ts: (writes.append(nid), orig(nid, ts))[1]  # type: ignore[method-assign]
        return s

    counted(sched)
    for _ in range(50):
        sched.poll_once(a, [])
    assert writes == []  # its registration, just written ONLINE, was its agent heard from
    assert sched.poll_now(a, []) is not None  # (answered on the event loop: nothing to write)
    sched.store.close()
    sched = counted(Scheduler(SQLiteStore(sched.store.path), Notifier(), heartbeat_interval=1.0))  # restarted
    for _ in range(50):
        sched.poll_once(a, [])
    assert writes == [a]  # the first heartbeat since the start only
    silence(sched, a)
    sched.check_heartbeats()
    assert sched.store.get_node(a).state == "OFFLINE"
    sched.poll_once(a, [])
    assert sched.store.get_node(a).state == "ONLINE" and writes == [a, a]


def test_a_node_marked_offline_while_it_registers_again_stays_marked_until_it_polls(sched: Scheduler) -> None:
    """A sweep racing a node's coming back (its key): where the sweep's OFFLINE lands after the registration's
    write, the registration does not record a heartbeat over the mark, so the node's next poll persists ONLINE
    again rather than heartbeating forever as a node the store says is OFFLINE."""
    a = join(sched, "a", 1)
    key = [k for k in sched.store.list_keys() if k.scope == "node" and k.owner == a][0]
    node_key = Principal(scope="node", owner=a, key_id=key.id)
    orig = sched.store.upsert_node

    def then_swept(node: Any) -> None:
        orig(node)
        orig(node.model_copy(update={"state": "OFFLINE"}))  # the sweep's write, from the doc it read before
        sched.store.heartbeat(node.id, 0.0)

    sched.store.upsert_node = then_swept  # type: ignore[method-assign]
    sched.register_node(NodeInfo(name="a", gpus=gpus("NVIDIA A100 80GB PCIe", 1), job_user="fedml-job"), node_key)
    sched.store.upsert_node = orig  # type: ignore[method-assign]
    assert sched.store.get_node(a).state == "OFFLINE" and sched.store.heartbeats()[a] == 0.0
    assert sched.poll_now(a, []) is None  # a write: in a thread
    sched.poll_once(a, [])
    assert sched.store.get_node(a).state == "ONLINE"


def test_a_poll_is_answered_on_the_loop_only_where_it_writes_and_waits_for_nothing(sched: Scheduler) -> None:
    """poll_now (what the event loop calls before handing a poll to a thread) answers as poll_once would, from
    the store's last commit without waiting for a thread that is writing, and declines, having recorded nothing,
    every poll that must write: the first heartbeat, one back from OFFLINE, a rank to settle, a GPU sample that
    changes the node."""
    a = join(sched, "a", 2)
    beats = sched.store.heartbeats
    restarted = Scheduler(SQLiteStore(sched.store.path), Notifier(), heartbeat_interval=1.0)
    restarted.nodes()
    assert restarted.poll_now(a, []) is None and a not in restarted.store.heartbeats()  # its first since a start
    restarted.store.close()
    before = beats()[a]  # its registration, just written: its agent heard from
    sched.nodes()  # (the node cache read again, as the pass that a registration kicks does)
    got = sched.poll_now(a, [])
    assert got is not None and got.start == [] and got.stop == [] and beats()[a] > before

    rid = submit(sched, **{"computing": {"minimum_num_gpus": 1}})
    sched.schedule_pass()
    ref = attempt_ref(rid, 1)
    got = sched.poll_now(a, ["run-gone@1"])  # an assignment to start, and something to stop
    assert got is not None and [s.run.id for s in got.start] == [rid] and got.stop == ["run-gone@1"]
    assert got == sched.poll_once(a, ["run-gone@1"])
    sched.report(rid, StatusReport(status=RunStatus.RUNNING, attempt=1), a)
    assert sched.poll_now(a, [ref]) == PollResponse(heartbeat_interval=1.0, lease=sched.lease)

    quiet = [GpuSample(index=0, util=50), GpuSample(index=1, util=0)]
    sched._nodes_changed()  # (a node written: the node cache is read again before it answers anything)
    assert sched.poll_now(a, [ref], gpus=quiet) is None  # the node's GPUs used outside runs: not known here
    sched.nodes()
    assert sched.poll_now(a, [ref], gpus=quiet) is not None  # known from the node cache: none, as sampled
    _, kept = sched.gpu_samples()[a]
    assert kept == quiet and not gc.is_tracked(sched._samples[a][1])  # (kept as JSON: nothing for the collector)
    outside = [GpuSample(index=0, util=50), GpuSample(index=1, util=90, pids=[4242], outside=[4242])]
    at = beats()[a]
    assert sched.poll_now(a, [ref], gpus=outside) is None and beats()[a] == at  # written on the node: a thread
    assert sched.poll_now(a, []) is None and beats()[a] == at  # its RUNNING rank is missing: poll_once judges it

    with write_open(sched.store, lambda: sched.store.update_run(rid, stop_requested=True)):
        got = sched.poll_now(a, [ref])  # not waiting for it: the last commit, where the run is not stopped
        assert got is not None and got.stop == [] and beats()[a] > at
    assert sched.poll_now(a, [ref]).stop == [ref]  # committed now
    sched.store.update_run(rid, stop_requested=False)

    silence(sched, a)
    sched.check_heartbeats()
    assert sched.store.get_node(a).state == "OFFLINE"
    assert sched.poll_now(a, [ref]) is None and beats()[a] == 0.0  # back from OFFLINE: written in a thread
    sched.poll_once(a, [ref])
    assert sched.store.get_node(a).state == "ONLINE"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_poll_awaited_on_the_loop_answers_as_one_in_a_thread(kind: str, tmp_path: Path) -> None:
    """poll_soon (what the poll route awaits before handing a poll to a thread): over SQLite poll_now; over
    Redis, which has no snapshot, the poll's reads awaited on the event loop (Store.poll_reads). It answers as
    poll_once would, and declines where the poll writes (the first heartbeat and one back from OFFLINE, left
    unrecorded; a rank to settle)."""
    if kind == "sqlite":
        store: Any = SQLiteStore(tmp_path / "s.db")
    else:
        from scheduler.redis_store import RedisStore

        from .test_store_contract import redis_url
        store = RedisStore(redis_url())
    sched = Scheduler(store, Notifier(), heartbeat_interval=1.0, rng=random.Random(7))

    async def body() -> None:
        a = join(sched, "a", 2)
        beats = sched.store.heartbeats
        before = beats()[a]  # its registration, just written: its agent heard from
        sched.nodes()  # (the node cache read again, as the pass that a registration kicks does)
        got = await sched.poll_soon(a, [])
        assert got is not None and got.start == [] and got.stop == [] and beats()[a] > before
        rid = submit(sched, **{"computing": {"minimum_num_gpus": 1}})
        sched.schedule_pass()
        ref = attempt_ref(rid, 1)
        got = await sched.poll_soon(a, ["run-gone@1"])  # an assignment to start, and something to stop
        assert got is not None and [s.run.id for s in got.start] == [rid] and got.stop == ["run-gone@1"]
        assert got == sched.poll_once(a, ["run-gone@1"])
        sched.report(rid, StatusReport(status=RunStatus.RUNNING, attempt=1), a)
        assert await sched.poll_soon(a, [ref]) == PollResponse(heartbeat_interval=1.0, lease=sched.lease)
        assert await sched.poll_soon(a, []) is None  # its RUNNING rank is missing: poll_once judges it
        sched.store.update_run(rid, stop_requested=True)
        got = await sched.poll_soon(a, [ref])
        assert got is not None and got.stop == [ref]
        silence(sched, a)
        sched.check_heartbeats()
        assert sched.store.get_node(a).state == "OFFLINE"
        assert await sched.poll_soon(a, [ref]) is None and beats()[a] == 0.0  # back from OFFLINE: a thread writes
        sched.poll_once(a, [ref])
        assert sched.store.get_node(a).state == "ONLINE"

    try:
        asyncio.run(body())
    finally:
        if kind == "redis":
            store.wipe()
        store.close()


def test_a_registration_that_loses_the_race_for_its_name_leaves_no_key(sched: Scheduler) -> None:
    """The name check passed, then another registration took the name: the node's key and the node are one
    transaction (SQLite), so the refused registration leaves no key behind."""
    join(sched, "taken", 1)
    keys = len(sched.store.list_keys())
    sched.store.node_by_name = lambda name: None  # type: ignore[method-assign]  # (the check ran before the other's write)
    with pytest.raises(Rejected, match="exists already"):
        join(sched, "taken", 1)
    assert len(sched.store.list_keys()) == keys + 1  # the admin key join() made; no node key


def test_concurrent_writes_share_one_commit_and_fail_alone(tmp_path: Path) -> None:
    """GroupCommit.write: writes queued while another holds the writer's turn are done together in one
    transaction (one durable commit), each learns its own outcome, and one refused (a name taken) is undone
    alone; every write is committed when its caller returns."""
    store = SQLiteStore(tmp_path / "s.db")
    group = GroupCommit()
    batches = []
    real_batch = store.batch
    store.batch = lambda: (batches.append(1), real_batch())[1]  # type: ignore[method-assign]
    inside, go = threading.Event(), threading.Event()

    def first() -> Node:
        inside.set()
        assert go.wait(30)
        return store.upsert_node(Node(id="node-0", name="n0"))

    outcome: dict[str, object] = {}

    def call(key: str, work: Callable[[], object]) -> None:
        try:
            outcome[key] = group.write(store, work)
        except Exception as exc:
            outcome[key] = exc

    threads = [threading.Thread(target=call, args=("0", first))]
    threads[0].start()
    assert inside.wait(30)
    for i in range(1, 9):  # queued behind the first: written together, by one of them
        node = Node(id=f"node-{i}", name="n0" if i == 5 else f"n{i}")  # node-5 takes n0's name: refused alone
        threads.append(threading.Thread(target=call, args=(str(i), lambda n=node: store.upsert_node(n))))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while len(group._work) < 8 and time.monotonic() < deadline:  # (all queued before the first commits)
        time.sleep(0.01)
    go.set()
    for t in threads:
        t.join(30)
    assert isinstance(outcome["5"], AlreadyExists)
    assert all(isinstance(outcome[str(i)], Node) for i in range(9) if i != 5)
    assert len(batches) == 2  # the first alone, then the eight queued behind it in one transaction
    again = SQLiteStore(tmp_path / "s.db")  # what a restart reads: every acknowledged write, not the refused one
    assert sorted(n.id for n in again.list_nodes()) == sorted(f"node-{i}" for i in range(9) if i != 5)


def test_polls_after_a_restart_list_the_nodes_once_not_each(sched: Scheduler) -> None:
    """A restarted scheduler's node cache is cold: the polls that find one of them listing the nodes answer
    without listing them too (64 at once listing 10,000 nodes held a Redis scheduler to 108 first heartbeats a
    second), and the agent that is to stop is told so at a poll after the list came."""
    ids = [join(sched, f"n{i}", 1) for i in range(6)]
    sched.store.upsert_node(sched.store.get_node(ids[5]).model_copy(update={"stop_agent": True}))
    fresh = Scheduler(sched.store, Notifier(), heartbeat_interval=1.0, rng=random.Random(7))
    inside, go, calls = threading.Event(), threading.Event(), []
    listed = fresh.store.list_nodes

    def slow_list() -> list[Node]:
        calls.append(threading.current_thread().name)
        inside.set()
        assert go.wait(30)
        return listed()

    fresh.store.list_nodes = slow_list  # type: ignore[method-assign]
    answers: list[PollResponse] = []
    first = threading.Thread(target=lambda: answers.append(fresh.poll_once(ids[0], [])), name="first")
    first.start()
    assert inside.wait(30)
    for nid in ids[1:]:  # meanwhile: answered at once, no list of their own, nobody told to stop yet (n5 either)
        assert fresh.poll_once(nid, []).shutdown is None
    assert calls == ["first"]
    go.set()
    first.join(30)
    assert not first.is_alive() and answers and answers[0].shutdown is None and calls == ["first"]
    assert fresh.poll_once(ids[5], []).shutdown is not None
    assert fresh.poll_once(ids[4], []).shutdown is None and calls == ["first"]


def test_federation_outcome_is_the_servers_and_clients_may_drop_out(sched: Scheduler) -> None:
    nodes = [join(sched, f"f{i}", 0) for i in range(4)]
    rid = submit(sched, job_type="federate", server_job="python3 server.py",
                 federate={"clients": 3, "rounds": 5, "min_clients": 2})
    sched.schedule_pass()
    run = sched.get_run(rid)
    assert len(run.placements) == 4 and {p.node_id for p in run.placements} == set(nodes)
    server, c1, c2, c3 = run.placements
    for p in run.placements:
        sched.report(rid, StatusReport(status=RunStatus.RUNNING), p.node_id)
    run = sched.report(rid, StatusReport(status=RunStatus.FAILED, exit_code=137, reason="killed"), c2.node_id)
    assert run.status == RunStatus.RUNNING and not run.stop_requested  # a client dropping out is tolerated
    run = sched.report(rid, StatusReport(status=RunStatus.FINISHED, exit_code=0), server.node_id)
    assert run.stop_requested and "server finished" in run.reason
    assert sched.poll_once(c1.node_id, [attempt_ref(rid, 1)]).stop == [attempt_ref(rid, 1)]
    sched.report(rid, StatusReport(status=RunStatus.FINISHED, exit_code=0), c1.node_id)
    run = sched.report(rid, StatusReport(status=RunStatus.KILLED, exit_code=143), c3.node_id)
    assert run.status == RunStatus.FINISHED and run.exit_code == 0


def test_federation_fails_when_its_server_fails(sched: Scheduler) -> None:
    for i in range(3):
        join(sched, f"f{i}", 0)
    rid = submit(sched, job_type="federate", federate={"clients": 2})
    sched.schedule_pass()
    server, c1, c2 = sched.get_run(rid).placements
    run = sched.report(rid, StatusReport(status=RunStatus.FAILED, exit_code=2, reason="too few clients"),
                       server.node_id)
    assert run.stop_requested
    sched.report(rid, StatusReport(status=RunStatus.KILLED), c1.node_id)
    run = sched.report(rid, StatusReport(status=RunStatus.KILLED), c2.node_id)
    assert run.status == RunStatus.FAILED and run.exit_code == 2 and "too few clients" in run.reason


def test_a_submission_into_a_busy_cluster_reads_no_runs(sched: Scheduler) -> None:
    join(sched, "a", 2)
    for _ in range(2):
        submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 2  # the cluster is full
    listed: list[object] = []
    real = sched.store.list_runs
    sched.store.list_runs = lambda **kw: listed.append(kw) or real(**kw)  # type: ignore[method-assign]
    waiting = submit(sched, computing={"minimum_num_gpus": 2})  # could run once the GPUs are free: accepted
    assert sched.get_run(waiting).status == RunStatus.QUEUED and listed == []
    with pytest.raises(Rejected, match="cannot ever run here"):  # more than any node has: refused, still no read
        submit(sched, computing={"minimum_num_gpus": 3})
    assert listed == []


def test_a_pass_that_placed_nothing_is_not_repeated_until_something_changes(sched: Scheduler) -> None:
    a, first, second = one_running_one_waiting(sched)
    reads: list[object] = []
    real = sched.store.list_runs
    sched.store.list_runs = lambda **kw: reads.append(kw) or real(**kw)  # type: ignore[method-assign]
    assert sched.schedule_pass() == 0 and reads == []  # nothing happened since: the queue is not read again
    # capacity freed: the pass runs with the report, in its commit (SQLite), and is not repeated after it
    sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), a)
    assert sched.get_run(second).status == RunStatus.STARTING and sched.schedule_pass() == 0
    third = submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 0  # blocked again
    join(sched, "b", 1)  # a node joins: a kick
    assert sched.schedule_pass() == 1 and sched.get_run(third).status == RunStatus.STARTING
    synced: list[object] = []
    feed = sched.store.runs_changed_since
    sched.store.runs_changed_since = lambda *a, **kw: synced.append(a) or feed(*a, **kw)  # type: ignore[method-assign]
    assert sched.schedule_pass() == 0 and synced == []  # a pass that placed is not repeated for nothing either
    submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 0 and synced != []  # (a kick: it is)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_report_that_frees_a_slot_places_into_it_in_the_same_call(kind: str, tmp_path: Path) -> None:
    """The report that frees a GPU runs the pass that gives it to the next run (SQLite: in the report's commit;
    Redis: its write, the pass lock and the change feed in one round trip, the placement and the lock's release
    in a second). No pass is left to run after it, and none is repeated for nothing."""
    if kind == "sqlite":
        store: Any = SQLiteStore(tmp_path / "s.db")
    else:
        from scheduler.redis_store import RedisStore

        from .test_store_contract import redis_url
        store = RedisStore(redis_url())
    sched = Scheduler(store, Notifier(), heartbeat_interval=10.0, rng=random.Random(7))
    try:
        a, first, second = one_running_one_waiting(sched)
        sched.report(first, StatusReport(status=RunStatus.RUNNING, attempt=1), a)
        trips: list[str] = []
        if kind == "redis":
            import redis.connection

            real_send = redis.connection.Connection.send_packed_command

            def send(c: Any, command: Any, *x: Any, **kw: Any) -> Any:  # (one a round trip, whoever packed it)
                trips.append(bytes(command[0][:40]).decode(errors="replace"))
                return real_send(c, command, *x, **kw)

            redis.connection.Connection.send_packed_command = send  # type: ignore[method-assign]
        try:
            sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=1), a)
            placed = sched.store.get_run(second)
            assert placed is not None and placed.status == RunStatus.STARTING
            trips_of_report = len(trips) - 1  # (the read just above)
            assert sched.schedule_pass() == 0
        finally:
            if kind == "redis":
                redis.connection.Connection.send_packed_command = real_send  # type: ignore[method-assign]
        if kind == "redis":
            assert trips_of_report == 2 and len(trips) == 3, trips  # (and the pass after: nothing to read)
    finally:
        if kind == "redis":
            store.wipe()
        store.close()


def test_the_book_takes_its_own_writes_as_written_and_reads_what_others_write_after_them(sched: Scheduler) -> None:
    """What this scheduler writes (a submission, a placement, the report that frees a slot) is applied to the book
    as the store's write returned it, and the change feed leaves it out; what another writer (a replica) writes,
    also over one of its own writes, is read from the feed."""
    a, first, second = one_running_one_waiting(sched)
    fed: list[str] = []
    feed = sched.store.runs_changed_since
    sched.store.runs_changed_since = lambda *x, **kw: (  # type: ignore[method-assign]
        lambda got: fed.extend(r.id for r in got[1]) or got)(feed(*x, **kw))
    sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), a)  # frees the GPU, places second
    assert sched.get_run(second).status == RunStatus.STARTING and fed == []  # neither was read back
    third = submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 0 and fed == []  # (blocked: the book knows it without reading it)
    other = sched.store.create_run(Run(id="run-by-a-replica", name="x", job={"job": "x"}))
    sched.kick()
    assert sched.schedule_pass() == 0 and fed == [other.id]  # (held back: `third` holds the node)
    # Another writer ends `second` behind this scheduler's back: its own write of it is no longer the last one.
    sched.store.transition(second, RunStatus.KILLED, reason="stopped by another replica")
    sched.kick()
    assert sched.schedule_pass() == 2 and fed[-1:] == [second]  # read, and its GPU given to the next run
    assert sched.get_run(third).status == sched.get_run(other.id).status == RunStatus.STARTING


def test_the_stored_reason_changes_with_its_meaning_not_with_the_counts(sched: Scheduler) -> None:
    join(sched, "a", 1)
    busy = [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(1)]
    assert sched.schedule_pass() == 1
    waiting = submit(sched, computing={"minimum_num_gpus": 1})
    sched.schedule_pass()
    assert sched.store.get_run(waiting).reason == "no node with 1 free GPU"  # stored: no volatile counts
    assert sched.get_run(waiting).reason == "no node with 1 free GPU (1 node has them busy)"  # shown: counted
    join(sched, "b", 1)
    filler = submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 1 and sched.get_run(waiting).status == RunStatus.STARTING  # FIFO
    assert sched.get_run(filler).status == RunStatus.QUEUED
    writes: list[object] = []
    real = sched.store.update_run
    sched.store.update_run = lambda run_id, **kw: writes.append(kw) or real(run_id, **kw)  # type: ignore[method-assign]
    later = submit(sched, computing={"minimum_num_gpus": 1})  # its shape waits: it is stored with the reason
    assert sched.store.get_run(later).reason == "no node with 1 free GPU"
    sched.schedule_pass()
    assert [w for w in writes if "reason" in w] == []  # so no pass writes it
    join(sched, "c", 0)  # the counts change (a node without GPUs): nothing is rewritten
    sched.schedule_pass()
    assert [w for w in writes if "reason" in w] == []
    shown = sched.get_run(later).reason or ""
    assert shown.startswith("no node with 1 free GPU (") and "1 node has fewer than 1 GPUs" in shown, shown
    del busy


def test_the_book_follows_every_write_and_places_what_a_fresh_look_would(tmp_path: Path) -> None:
    """The pass reads the queue and the held GPUs from its in-memory book, kept up to date by the store's change
    feed. Random events (submissions of several shapes and priorities, stops, ends, lost ranks), some made by a
    second scheduler on the same store (a replica: its writes reach the first only through the feed): after each
    pass the book must hold exactly the store's queue and claims, and no GPU is ever held twice."""
    from scheduler.service.core import ACTIVE

    store = SQLiteStore(tmp_path / "s.db")
    wakeups = Notifier()  # a shared store relays wake-ups between replicas; here they share one notifier
    one = Scheduler(store, wakeups, heartbeat_interval=3600.0, rng=random.Random(1))
    other = Scheduler(store, wakeups, heartbeat_interval=3600.0, rng=random.Random(2))
    nodes = [join(one, f"n{i}", 4) for i in range(3)]
    rng = random.Random(11)
    shapes = [{"minimum_num_gpus": 1}, {"minimum_num_gpus": 2}, {"minimum_num_gpus": 4}, {"minimum_num_gpus": 0,
              "device_type": "CPU"}]
    for step in range(300):
        actor = one if rng.random() < 0.7 else other
        roll = rng.random()
        if roll < 0.45:
            submit(actor, computing=rng.choice(shapes), priority=rng.choice([0, 0, 5]))
        elif roll < 0.6:
            queued = store.list_runs(status=[RunStatus.QUEUED], limit=1000)
            if queued:
                actor.stop_run(rng.choice(queued).id)
        else:
            active = store.list_runs(status=list(ACTIVE), limit=1000)
            if active:
                run = rng.choice(active)
                p = rng.choice(run.placements)
                status = rng.choice([RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED, RunStatus.LOST])
                actor._rank_update(run.id, p.node_id, status, 0 if status == RunStatus.FINISHED else 1, "test")
        if rng.random() < 0.2:
            other.schedule_pass()  # the replica places too (the first one sees it only through the feed)
        one.schedule_pass()  # may be skipped (nothing it could place changed): then the book is read next time
        book = one._sync_book()  # what every pass that runs does first
        queued = {r.id for r in store.list_runs(status=[RunStatus.QUEUED], limit=10_000)}
        assert set(book.queued) == queued, f"step {step}: the book's queue is not the store's"
        held: dict[str, dict[int, str]] = {}
        for r in store.list_runs(status=list(ACTIVE), limit=10_000):
            for p in r.placements:
                if not p.done:
                    for g in p.gpus:
                        assert g not in held.setdefault(p.node_id, {}), f"GPU {g} of {p.node_id} held twice"
                        held[p.node_id][g] = r.id
        assert {n: g for n, g in book.held.items() if g} == {n: g for n, g in held.items() if g}, f"step {step}"
        # Whatever the book says, a fresh look agrees that nothing more fits right now: a new scheduler on the
        # same store places nothing (it may differ only in which of equal runs it would take).
        if step % 25 == 0:
            fresh = Scheduler(store, Notifier(), heartbeat_interval=3600.0, rng=random.Random(3))
            assert fresh.schedule_pass() == 0, f"step {step}: the book missed room a fresh look found"
    assert len(nodes) == 3 and one._book is not None and one._book.seq == store.runs_seq()


def test_with_no_node_at_all_the_queue_says_none_has_joined(sched: Scheduler) -> None:
    run = submit(sched, computing={"minimum_num_gpus": 1})
    assert sched.schedule_pass() == 0
    assert (sched.get_run(run).reason or "").startswith("no nodes have joined yet")
    join(sched, "a", 1)
    assert sched.schedule_pass() == 1


def test_a_pass_that_fails_midway_leaves_no_run_behind(sched: Scheduler) -> None:
    """A store error in the middle of a pass (a full disk) rolls back its open writes; the book, which had
    applied them, is dropped and read again, so the next pass places every run (none stays queued unseen)."""
    join(sched, "a", 4)
    runs = [submit(sched, computing={"minimum_num_gpus": 1}) for _ in range(3)]
    store = sched.store
    assert isinstance(store, SQLiteStore)

    def failing(db: object, placed: list[Run]) -> None:  # (the placements' rows are written: then the disk is full)
        assert [r.status for r in store.list_runs(status=[RunStatus.STARTING])] == [RunStatus.STARTING] * 3
        raise OSError(28, "No space left on device")
    store._index_many = failing  # type: ignore[method-assign]
    with pytest.raises(OSError):
        sched.schedule_pass()
    del store._index_many
    assert {sched.get_run(r).status for r in runs} == {RunStatus.QUEUED}  # the placements were rolled back
    sched.kick()
    assert sched.schedule_pass() == 3
    held = [g for r in runs for g in sched.get_run(r).placements[0].gpus]
    assert sorted(held) == [0, 1, 2]


def test_concurrent_submissions_share_commits_and_each_is_stored_before_it_returns(sched: Scheduler) -> None:
    """Group commit (service/core.py GroupCommit): 32 threads submit at once; every run a call returned is in the
    store, and the runs were written in fewer store calls than runs (the store is counted, not replaced)."""
    import threading

    store = sched.store
    groups: list[int] = []
    write = store.create_each

    def counted(runs: list) -> list:  # type: ignore[type-arg]
        groups.append(len(runs))
        time.sleep(0.005)  # a commit that takes time: submitters arriving meanwhile wait for the next one
        return write(runs)

    store.create_each = counted  # type: ignore[method-assign]
    made: list[str] = []
    start = threading.Barrier(32)

    def submitter() -> None:
        start.wait()
        for _ in range(5):
            run = sched.create_run(RunCreate(job={"job": "echo"}))  # type: ignore[arg-type]
            assert store.get_run(run.id) is not None  # committed before it was returned
            made.append(run.id)

    threads = [threading.Thread(target=submitter) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(set(made)) == 160 == sum(groups)
    assert len(groups) < 160 and max(groups) > 1


def test_a_failed_group_commit_acknowledges_none_of_its_runs(sched: Scheduler) -> None:
    def broken(runs: list) -> list:  # type: ignore[type-arg]
        raise OSError("disk full")

    sched.store.create_each = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        sched.create_run(RunCreate(job={"job": "echo"}))  # type: ignore[arg-type]
    assert sched.store.list_runs() == []


def test_settling_the_heap_frees_cycles_dropped_since_the_last_time() -> None:
    """settle_heap (service/core.py) freezes what is alive after a big node list is loaded; a reference cycle
    dropped afterwards is not leaked: the next call unfreezes and collects it."""
    import gc
    import weakref

    from scheduler.service.core import settle_heap

    class Box:
        pass

    try:
        a, b = Box(), Box()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        settle_heap()  # the cycle is alive here: frozen with everything else
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: a collection alone does not see it
        settle_heap()
        assert gone() is None
    finally:
        gc.unfreeze()


class CountingStore(SQLiteStore):
    """Counts full node lists (the cache should list once, then follow the change feed)."""

    lists = 0

    def list_nodes(self):  # type: ignore[no-untyped-def]
        self.lists += 1
        return super().list_nodes()


def test_the_node_cache_follows_joins_changes_and_removals_by_another_replica_without_listing_again(
        tmp_path: Path) -> None:
    """Another process (a second replica: its own connection to the database) joins, drains, renames and removes
    nodes; this scheduler's cache and candidates follow from the change feed alone, node objects that did not
    change stay the same objects, and placement sees each change."""
    store = CountingStore(tmp_path / "s.db")
    s = Scheduler(store, Notifier(), heartbeat_interval=1.0, rng=random.Random(7))
    other = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0)
    a, b = join(other, "a", 1), join(other, "b", 1)
    first = submit(s, computing={"minimum_num_gpus": 1})
    assert s.schedule_pass() == 1 and store.lists == 1
    done = s.get_run(first)
    s.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), done.node_id)  # every GPU free again
    before = {n.id: n for n in s.nodes()}
    c = join(other, "c", 1)
    other.store.upsert_node(other.store.get_node(a).model_copy(update={"draining": True}))
    s._nodes_changed()  # (the "nodes" wake-up another replica's write relays)
    now = {n.id: n for n in s.nodes()}
    assert sorted(now) == sorted([a, b, c]) and now[b] is before[b] and now[a] is not before[a]
    assert now[a].draining and [n.name for n in s.nodes()] == ["a", "b", "c"]
    runs = [submit(s, computing={"minimum_num_gpus": 1}) for _ in range(3)]
    assert s.schedule_pass() == 2  # a free GPU on b and on c; none taken on the drained node
    placed = [r for r in (s.get_run(x) for x in runs) if r.status == RunStatus.STARTING]
    assert sorted(r.node_id for r in placed) == sorted([b, c])
    other.store.delete_node(c)
    other.store.upsert_node(other.store.get_node(b).model_copy(update={"name": "b2"}))
    s._nodes_changed()
    assert [n.name for n in s.nodes()] == ["a", "b2"]
    d = join(other, "d", 2)
    s._nodes_changed()
    assert s.schedule_pass() == 1  # the queued run goes to the node that joined (b2 is busy, a drained)
    assert [s.get_run(r).node_id for r in runs if s.get_run(r).node_id not in (b, c)] == [d]
    assert s._cands is not None and sorted(s._cands.by_id) == sorted([a, b, d])  # c's candidate is gone
    assert store.lists == 1, "the cache listed every node again instead of following the feed"


def test_runs_wait_for_the_runs_they_come_after(sched: Scheduler) -> None:
    """--after RUN (must finish) and RUN:any (any ending): a run waits, QUEUED with the reason, until those end;
    then it is placed, or fails when one that had to finish did not."""
    node = join(sched, "a", 8)

    def after(*deps: str) -> str:
        return sched.create_run(RunCreate(job={"job": "echo hi"}, after=list(deps))).id

    def end(run_id: str, status: RunStatus) -> None:
        sched.report(run_id, StatusReport(status=RunStatus.RUNNING), node)
        sched.report(run_id, StatusReport(status=status, exit_code=0 if status == RunStatus.FINISHED else 1), node)

    first, doomed, killed = submit(sched), submit(sched), submit(sched)
    assert sched.schedule_pass() == 3
    ok, anyway, on_doomed, on_doomed_any, on_killed_any = (after(first), after(first + ":any"), after(doomed),
                                                           after(f"{doomed}:any"), after(f"{killed}:any"))
    chained = after(ok)  # waits for a run that itself waits
    assert sched.get_run(ok).reason == f"waiting for {first} to end"
    assert sched.schedule_pass() == 0
    assert all(sched.get_run(r).status == RunStatus.QUEUED for r in (ok, anyway, on_doomed, chained))
    end(first, RunStatus.FINISHED)
    assert sched.schedule_pass() == 2  # ok and anyway; chained waits for ok
    assert sched.get_run(ok).status == sched.get_run(anyway).status == RunStatus.STARTING
    assert sched.get_run(chained).status == RunStatus.QUEUED
    end(doomed, RunStatus.FAILED)
    sched.stop_run(killed)
    end(killed, RunStatus.KILLED)  # (its agent's report: killed)
    assert sched.schedule_pass() == 2  # on_doomed_any and on_killed_any
    failed = sched.get_run(on_doomed)
    assert failed.status == RunStatus.FAILED and f"{doomed} ended FAILED" in failed.reason and ":any" in failed.reason
    assert sched.get_run(on_doomed_any).status == sched.get_run(on_killed_any).status == RunStatus.STARTING
    end(ok, RunStatus.FINISHED)
    assert sched.schedule_pass() == 1 and sched.get_run(chained).status == RunStatus.STARTING


def test_launching_after_a_run_checks_it(sched: Scheduler) -> None:
    join(sched, "a", 2)
    alice = auth.verify(sched.store, auth.issue(sched.store, name="alice", scope="user", owner="alice")[1])
    bob = auth.verify(sched.store, auth.issue(sched.store, name="bob", scope="user", owner="bob")[1])
    hers = sched.create_run(RunCreate(job={"job": "echo"}), alice).id  # type: ignore[arg-type]
    for bad, why in ((["run-nope"], "no run run-nope"), ([f"{hers}:sometimes"], "expected RUN_ID"),
                     (["a b"], "expected RUN_ID")):
        with pytest.raises(Rejected, match=why):
            sched.create_run(RunCreate(job={"job": "echo"}, after=bad), alice)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="no run"):  # another user's run is not there for bob
        sched.create_run(RunCreate(job={"job": "echo"}, after=[hers]), bob)  # type: ignore[arg-type]
    sched.stop_run(hers)
    with pytest.raises(Rejected, match="ended KILLED") as e:
        sched.create_run(RunCreate(job={"job": "echo"}, after=[hers]), alice)  # type: ignore[arg-type]
    assert status_of(e.value) == 409
    fine = sched.create_run(RunCreate(job={"job": "echo"}, after=[f"{hers}:any"]), alice)  # type: ignore[arg-type]
    assert fine.reason is None and sched.schedule_pass() == 1


def test_a_restarted_scheduler_still_holds_runs_for_their_dependencies(sched: Scheduler) -> None:
    """The book rebuilt from the store (a restart, another replica) knows which runs wait and for what."""
    node = join(sched, "a", 4)
    first = submit(sched)
    assert sched.schedule_pass() == 1
    waiter = sched.create_run(RunCreate(job={"job": "echo"}, after=[first])).id
    again = Scheduler(sched.store, Notifier(), heartbeat_interval=1.0, rng=random.Random(1))
    assert again.schedule_pass() == 0 and again.get_run(waiter).status == RunStatus.QUEUED
    again.report(first, StatusReport(status=RunStatus.RUNNING), node)
    again.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), node)
    assert again.schedule_pass() == 1 and again.get_run(waiter).status == RunStatus.STARTING


def test_a_sweep_is_one_run_per_point_with_its_values(sched: Scheduler) -> None:
    """sweep: {lr: [...], bs: [...]} (and RunCreate.sweep over it, as `--sweep` sends): one run per point, in
    order, each with FEDML_SWEEP_* set, all under one sweep id; the answer is the first point's run."""
    join(sched, "a", 8)
    first = sched.create_run(RunCreate(job={"job": "echo $FEDML_SWEEP_LR", "sweep": {"lr": [0.1, 0.01],
                                                                                     "bs": [32, 64]}},
                                       sweep={"opt": ["adam"]}))
    assert first.sweep is not None and first.sweep.index == 0 and first.sweep.size == 4
    runs = sched.sweep(first.sweep.id)
    assert [r.sweep.point for r in runs] == [  # type: ignore[union-attr]
        {"lr": 0.1, "bs": 32, "opt": "adam"}, {"lr": 0.1, "bs": 64, "opt": "adam"},
        {"lr": 0.01, "bs": 32, "opt": "adam"}, {"lr": 0.01, "bs": 64, "opt": "adam"}]
    assert runs[0].id == first.id and len({r.id for r in runs}) == 4
    assert runs[3].env == {"FEDML_SWEEP_ID": first.sweep.id, "FEDML_SWEEP_INDEX": "3", "FEDML_SWEEP_SIZE": "4",
                           "FEDML_SWEEP_LR": "0.01", "FEDML_SWEEP_BS": "64", "FEDML_SWEEP_OPT": "adam"}
    assert sched.schedule_pass() == 4
    for bad, why in (({"sweep": {"lr": []}}, "at least one value"), ({"sweep": {"x-y": [1]}}, "parameter name"),
                     ({"max_parallel": 2}, "only with a sweep"),
                     ({"sweep": {"a": list(range(40)), "b": list(range(40))}}, "more than 1000"),
                     ({"job_type": "serve", "sweep": {"a": [1]}}, "not swept"),
                     ({"sweep": {"index": [1]}}, "FEDML_SWEEP_INDEX is taken"),
                     ({"sweep": {"lr": [1], "LR": [2]}}, "FEDML_SWEEP_LR is taken")):
        with pytest.raises(Rejected, match=why):
            sched.create_run(RunCreate(job={"job": "echo", **bad}))
    with pytest.raises(Rejected, match="only with a sweep"):
        sched.create_run(RunCreate(job={"job": "echo"}, max_parallel=2))
    with pytest.raises(NotFound):
        sched.sweep("sweep-0000000000000000")


def test_a_sweep_runs_at_most_max_parallel_points_at_once(sched: Scheduler) -> None:
    """max_parallel 2 of 5 points on a node with room for all: two at a time, in order, the next let in as one
    ends (also after a restart: the book rebuilt from the store holds the same points back); a stopped sweep
    stops every point; a retry launches the failed points again under the same sweep."""
    node = join(sched, "a", 8)
    first = sched.create_run(RunCreate(job={"job": "echo", "sweep": {"i": [1, 2, 3, 4, 5]}}, max_parallel=2))
    sid = first.sweep.id  # type: ignore[union-attr]
    assert sched.schedule_pass() == 2
    other = submit(sched)  # another run is not held back by the sweep
    assert sched.schedule_pass() == 1 and sched.get_run(other).status == RunStatus.STARTING

    def states() -> list[str]:
        return [r.status.value for r in sched.sweep(sid)]

    def end(i: int, status: RunStatus = RunStatus.FINISHED) -> None:
        run = sched.sweep(sid)[i]
        sched.report(run.id, StatusReport(status=RunStatus.RUNNING), node)
        sched.report(run.id, StatusReport(status=status, exit_code=0 if status == RunStatus.FINISHED else 1), node)

    assert states() == ["STARTING", "STARTING", "QUEUED", "QUEUED", "QUEUED"]
    assert "room in its sweep" in (sched.sweep(sid)[2].reason or "")
    assert sched.schedule_pass() == 0
    end(0, RunStatus.FAILED)
    assert sched.schedule_pass() == 1 and states() == ["FAILED", "STARTING", "STARTING", "QUEUED", "QUEUED"]
    again = Scheduler(sched.store, Notifier(), heartbeat_interval=1.0, rng=random.Random(1))  # a restart
    assert again.schedule_pass() == 0
    again.report(sched.sweep(sid)[1].id, StatusReport(status=RunStatus.RUNNING), node)
    again.report(sched.sweep(sid)[1].id, StatusReport(status=RunStatus.FINISHED, exit_code=0), node)
    assert again.schedule_pass() == 1 and [r.status.value for r in again.sweep(sid)] == [
        "FAILED", "FINISHED", "STARTING", "STARTING", "QUEUED"]
    stopped = again.stop_sweep(sid)
    assert [r.status.value for r in stopped][4] == "KILLED" and all(r.stop_requested for r in stopped[2:4])
    for r in stopped[2:4]:
        again.report(r.id, StatusReport(status=RunStatus.KILLED, exit_code=-15), node)
    relaunched = again.retry_sweep(sid)
    assert [r.sweep.index for r in relaunched] == [0, 2, 3, 4]  # type: ignore[union-attr]
    assert again.schedule_pass() == 2  # still two at a time
    assert len(again.sweep(sid)) == 9
    assert again.retry_sweep(sid) == []  # nothing has ended badly since


def test_a_cluster_is_a_named_set_of_nodes_runs_ask_for(sched: Scheduler) -> None:
    """`fedml cluster create NAME NODE...` (admin): `launch -c NAME` places only on its nodes; an agent cannot
    put its node in a cluster by labelling it (it would capture the cluster's runs); stopping a cluster drains
    its nodes and stops their runs, kill dissolves it; autostop drains a node idle that long."""
    boss = admin(sched)
    alice = auth.verify(sched.store, auth.issue(sched.store, name="alice", scope="user", owner="alice")[1])
    a, b = join(sched, "a", 2), join(sched, "b", 2)
    sneaky = join(sched, "sneaky", 8, labels={"fedml.cluster/prod": "true"})  # claims membership: ignored
    assert "fedml.cluster/prod" not in sched.store.get_node(sneaky).labels
    with pytest.raises(Rejected, match="admin"):
        sched.create_cluster("prod", ClusterCreate(nodes=["a"]), alice)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="no cluster prod"):
        sched.create_run(RunCreate(job={"job": "echo"}, cluster="prod"), alice)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        sched.create_cluster("prod", ClusterCreate(nodes=["nope"]), boss)
    with pytest.raises(Rejected, match="cluster name"):
        sched.create_cluster("../x", ClusterCreate(nodes=["a"]), boss)
    c = sched.create_cluster("prod", ClusterCreate(nodes=["a", b]), boss)
    assert sorted(n.name for n in c.nodes) == ["a", "b"] and c.gpus == 4
    join(sched, "sneaky2", 8, labels={"fedml.cluster/prod": "true"})  # still not: only an admin adds nodes
    runs = [sched.create_run(RunCreate(job={"job": "echo", "computing": {"minimum_num_gpus": 1}}, cluster="prod"),
                             alice).id for _ in range(5)]  # type: ignore[arg-type]
    assert sched.schedule_pass() == 4  # the cluster's 4 GPUs, none of the 16 elsewhere
    assert {sched.get_run(r).node_id for r in runs[:4]} == {a, b} and sched.get_run(runs[4]).node_id is None
    assert [x.name for x in sched.clusters(alice)] == ["prod"] and sched.cluster("prod", alice).active_runs == 4
    sched.register_node(NodeInfo(name="a", gpus=gpus("NVIDIA A100 80GB PCIe", 2), job_user="fedml-job",
                                 labels={"x": "1"}),
                        auth.verify(sched.store, auth.issue(sched.store, name="n", scope="node", owner=a)[1]))
    assert sched.store.get_node(a).labels.get("fedml.cluster/prod") == "true"  # its agent coming back keeps it
    stopped = sched.stop_cluster("prod", boss)
    assert stopped.draining == 2 and all(sched.get_run(r).stop_requested for r in runs[:4])
    assert sched.get_run(runs[4]).status == RunStatus.KILLED  # queued there: stopped before it started
    sched.start_cluster("prod", boss)
    assert sched.cluster("prod", boss).draining == 0
    sched.autostop_cluster("prod", 1.0, boss)
    for r in runs[:4]:
        run = sched.get_run(r)
        sched.report(r, StatusReport(status=RunStatus.KILLED, exit_code=-15), run.node_id)
    t0 = time.time()
    assert sched.check_autostop(now=t0) == [] and sched.check_autostop(now=t0 + 30) == []
    assert sorted(n.name for n in sched.check_autostop(now=t0 + 61)) == ["a", "b"]
    assert sched.cluster("prod", boss).draining == 2
    assert sched.poll_once(a, []).shutdown is None  # drained, but its agent was not asked to exit
    sched.start_cluster("prod", boss)
    sched.autostop_cluster("prod", 1.0, boss, stop_agents=True)
    busy = sched.create_run(RunCreate(job={"job": "echo", "computing": {"minimum_num_gpus": 1}}, cluster="prod"),
                            alice)  # type: ignore[arg-type]
    assert sched.schedule_pass() == 1
    busy_node = sched.get_run(busy.id).node_id
    idle_node = b if busy_node == a else a
    t1 = time.time()
    sched.check_autostop(now=t1)
    assert [n.id for n in sched.check_autostop(now=t1 + 61)] == [idle_node]  # the busy one stays
    assert sched.poll_once(idle_node, []).shutdown and "autostop" in sched.poll_once(idle_node, []).shutdown
    assert sched.poll_once(idle_node, ["run-x:1"]).shutdown is None  # it still runs something: not yet
    assert sched.poll_once(busy_node, []).shutdown is None
    node_key = auth.verify(sched.store, auth.issue(sched.store, name="n2", scope="node", owner=idle_node)[1])
    sched.register_node(NodeInfo(name="x", gpus=gpus("NVIDIA A100 80GB PCIe", 2), job_user="fedml-job"), node_key)
    assert sched.poll_once(idle_node, []).shutdown is None  # started again by hand: it stays
    sched.stop_cluster("prod", boss, kill=True)
    assert sched.clusters(boss) == [] and "fedml.cluster/prod" not in sched.store.get_node(a).labels


def test_a_freed_slot_is_placed_in_the_reports_own_commit(sched: Scheduler) -> None:
    """SQLite: the report that frees a GPU and the placement into it are one durable commit, not two."""
    a, first, second = one_running_one_waiting(sched)
    sql: list[str] = []
    sched.store._db.set_trace_callback(sql.append)  # type: ignore[attr-defined]
    sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), a)
    sched.store._db.set_trace_callback(None)  # type: ignore[attr-defined]
    assert sql.count("COMMIT") == 1, sql
    assert sched.store.get_run(first).status == RunStatus.FINISHED
    assert sched.store.get_run(second).status == RunStatus.STARTING


def test_a_pass_that_fails_after_a_report_undoes_itself_alone(sched: Scheduler) -> None:
    a, first, second = one_running_one_waiting(sched)
    store = sched.store
    assert isinstance(store, SQLiteStore)

    def broken(db: object, placed: list[Run]) -> None:  # the placement's row written, then the pass fails
        assert store.get_run(second).status == RunStatus.STARTING  # (the savepoint undoes it)
        raise RuntimeError("a bug in the pass")

    store._index_many = broken  # type: ignore[method-assign]
    sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), a)  # no error: the report stays
    del store._index_many
    assert sched.store.get_run(first).status == RunStatus.FINISHED
    assert sched.store.get_run(second).status == RunStatus.QUEUED  # the failed pass's write was undone
    assert sched.schedule_pass() == 1 and sched.store.get_run(second).status == RunStatus.STARTING  # (it kicked)


def test_the_node_cache_merges_changes_like_a_fresh_sorted_list_and_keeps_positions() -> None:
    """merge_nodes against sorting every node again, over random writes: in-place changes (the fast path: the
    same positions), joins, renames and removals; every node not written stays the same object."""
    from scheduler.contract.models import Node
    from scheduler.service.core import merge_nodes

    rng = random.Random(11)
    nodes = sorted((Node(id=f"id{i}", name=f"n{rng.randrange(10**6):06d}") for i in range(200)), key=lambda n: n.name)
    pos = {n.id: i for i, n in enumerate(nodes)}
    for step in range(300):
        alive = {n.id: n for n in nodes}
        kind = rng.choice(["touch", "touch", "touch", "join", "rename", "remove"])
        ids = rng.sample(sorted(alive), 3)
        if kind == "touch":
            changed, gone = [alive[i].model_copy(update={"draining": not alive[i].draining}) for i in ids], set()
        elif kind == "join":
            changed, gone = [Node(id=f"new{step}", name=f"n{rng.randrange(10**6):06d}")], set()
        elif kind == "rename":
            changed, gone = [alive[ids[0]].model_copy(update={"name": f"n{rng.randrange(10**6):06d}"})], set()
        else:
            changed, gone = [], {ids[0]}
        out, out_pos = merge_nodes(nodes, changed, gone, pos)
        want = {**{i: n for i, n in alive.items() if i not in gone}, **{n.id: n for n in changed}}
        assert [n.id for n in out] == [n.id for n in sorted(want.values(), key=lambda n: (n.name, n.id))] or \
            [n.name for n in out] == sorted(n.name for n in want.values())
        assert all(out[i] is n for n, i in ((n, out_pos[n.id]) for n in out)) and len(out_pos) == len(out)
        assert all(n is want[n.id] for n in out) and out is not nodes
        if kind == "touch":
            assert out_pos is pos  # (in place: the same positions)
        nodes, pos = out, out_pos


def test_a_cached_node_reads_as_its_node_is_read_only_and_fits_the_small_object_allocator(sched: Scheduler) -> None:
    """The node cache holds CachedNode (Node's fields in slots): the same values as the stored node, a model_copy
    and a model_dump that are the Node's, no assignment, and small enough (at most 512 bytes) for Python's
    small-object allocator, which a pydantic Node's 24-field dict is not (bench/memory.py: ~250 MiB at 100,000
    nodes)."""
    import sys

    from scheduler.contract.models import GpuInfo, Node
    from scheduler.service.core import CachedNode

    a = join(sched, "a", 2)
    cached = next(n for n in sched.nodes() if n.id == a)
    stored = sched.store.get_node(a)
    assert isinstance(cached, CachedNode) and stored is not None
    assert cached.node() == stored and cached.model_dump() == stored.model_dump()
    assert cached.node().__pydantic_fields_set__ == set(Node.model_fields)
    copy = cached.model_copy(update={"draining": True})
    assert isinstance(copy, Node) and copy.draining and not cached.draining and copy.gpus == stored.gpus
    with pytest.raises(AttributeError, match="read-only"):
        cached.draining = True  # type: ignore[misc]
    assert CachedNode.of(cached) is cached
    big = Node(id="x", name="x", gpus=[GpuInfo(index=i, name="A100", memory_mb=1) for i in range(8)],
               labels={"k": "v"}, teams=["t"], enforced_labels={"e": "1"}, owner="u")
    assert sys.getsizeof(CachedNode.of(big)) <= 512
    assert CachedNode.of(big).node() == big


def test_an_agent_told_to_stop_is_known_from_the_node_changes(sched: Scheduler) -> None:
    a, b = join(sched, "a", 1), join(sched, "b", 1)
    assert sched.agents_to_stop() == frozenset()
    node = sched.store.get_node(a)
    assert node is not None
    sched.store.upsert_node(node.model_copy(update={"stop_agent": True}))
    sched._nodes_changed()
    assert sched.agents_to_stop() == {a}
    sched.store.upsert_node(node.model_copy(update={"stop_agent": False}))
    sched._nodes_changed()
    assert sched.agents_to_stop() == frozenset() and b not in sched.agents_to_stop()
