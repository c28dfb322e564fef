"""The store contract: the same tests over the SQLite store and the Redis store (a real Redis on 127.0.0.1:6379,
database 6, a key prefix of its own per test, wiped afterwards).

`pair` gives two handles on the same data: for SQLite the one store its single scheduler owns, for Redis two
separate stores as two scheduler replicas would hold them. Also here: two Scheduler replicas on one Redis
placing the same queue at once (no run placed twice, no GPU handed to two runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.contract.errors import Conflict
from scheduler.contract.models import (
    ApiKey,
    Endpoint,
    GpuInfo,
    InvalidTransition,
    LogBatch,
    Node,
    Placement,
    Run,
    RunStatus,
    StatusReport,
    SweepPoint,
    Team,
)
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore
from scheduler.store import MISS, AlreadyExists, GpuBusy, NotFound, SeqGap, Stale, Store

from .conftest import needs, write_open

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)

REDIS_URL = "redis://127.0.0.1:6379/6"


def redis_up() -> tuple[bool, str]:
    try:
        import redis
    except ImportError as exc:
        return False, f"the redis package is not installed ({exc})"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        return False, f"no Redis at {REDIS_URL} ({exc})"
    return True, ""


def redis_url() -> str:
    """A private key prefix on the test database (`?prefix=`), so tests never see each other's keys."""
    ok, why = redis_up()
    needs("redis", ok, why)
    return f"{REDIS_URL}?prefix=fedml-test-{secrets.token_hex(4)}:"


@pytest.fixture(params=["sqlite", "redis"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "contract.db")
        yield s, s
        s.close()
        return
    from scheduler.redis_store import RedisStore

    url = redis_url()
    a, b = RedisStore(url), RedisStore(url)
    try:
        yield a, b
    finally:
        a.wipe()
        assert not list(a.r.scan_iter(match=a.k.p + "*")), "keys left behind"
        a.close()
        b.close()


@pytest.fixture
def store(pair: tuple[Store, Store]) -> Store:
    return pair[0]


def mk_run(i: int = 0, *, owner: str = "alice", gpus: int = 1, created: float | None = None) -> Run:
    job = {"job": "echo hi", "computing": {"minimum_num_gpus": gpus}}
    return Run(id=f"run-{i:04d}{secrets.token_hex(2)}", name=f"r{i}", job=job, owner=owner,
               created_at=created if created is not None else time.time() + i * 1e-3)


def node(i: int, gpus: int = 2) -> Node:
    return Node(id=f"node-{i}", name=f"n{i}", gpus=[GpuInfo(index=g, name="A100-80G") for g in range(gpus)])


def start_on(store: Store, run: Run, node_id: str, gpus: list[int]) -> Run:
    return store.transition(run.id, RunStatus.STARTING, placements=[Placement(rank=0, node_id=node_id, gpus=gpus)])


# ---- runs --------------------------------------------------------------------------------------------------

def test_a_created_run_reads_back_the_same_from_either_handle(pair: tuple[Store, Store]) -> None:
    a, b = pair
    run = mk_run(1)
    a.create_run(run)
    got = b.get_run(run.id)
    assert got is not None and got.model_dump() == run.model_dump()
    assert b.get_run("run-missing") is None
    with pytest.raises(AlreadyExists):  # the same error from every store
        a.create_run(run)


def test_a_batch_of_runs_is_created_whole_or_not_at_all(pair: tuple[Store, Store]) -> None:
    a, b = pair
    first = [mk_run(i) for i in range(5)]
    a.create_runs(first)
    assert {r.id for r in b.list_runs()} == {r.id for r in first}
    clash = [mk_run(10), first[2], mk_run(11)]  # one id is taken: none of the three is written
    with pytest.raises(AlreadyExists):
        b.create_runs(clash)
    assert {r.id for r in a.list_runs()} == {r.id for r in first}
    seq, runs = a.runs_changed_since(0)
    assert {r.id for r in runs} == {r.id for r in first}  # in the change feed like any create


def test_a_sweeps_runs_are_found_by_its_id(pair: tuple[Store, Store]) -> None:
    """Store.sweep_runs: the runs written with a sweep id, oldest first, from either handle; a batch refused
    leaves none in the sweep."""
    a, b = pair
    runs = [mk_run(i).model_copy(update={"sweep": SweepPoint(id="sweep-1", index=i, size=3, point={"x": i})})
            for i in range(3)]
    a.create_runs(runs[::-1])
    a.create_run(mk_run(7))
    assert [r.id for r in b.sweep_runs("sweep-1")] == [r.id for r in runs]
    assert b.sweep_runs("sweep-2") == []
    clash = [mk_run(9).model_copy(update={"sweep": SweepPoint(id="sweep-2", index=0, size=2)}), runs[0]]
    with pytest.raises(AlreadyExists):
        b.create_runs(clash)
    assert a.sweep_runs("sweep-2") == []


def test_runs_created_each_on_its_own_in_one_commit(pair: tuple[Store, Store]) -> None:
    """Group commit's write (Store.create_each): a run id taken refuses that run only."""
    a, b = pair
    taken = a.create_run(mk_run(1))
    runs = [mk_run(2), taken.model_copy(update={"name": "again"}), mk_run(3)]
    seq = b.runs_seq()
    got = a.create_each(runs)
    assert got[0] is None and isinstance(got[1], AlreadyExists) and got[2] is None
    assert (b.get_run(taken.id) or mk_run()).name == taken.name  # not overwritten
    assert {r.id for r in b.runs_changed_since(seq)[1]} == {runs[0].id, runs[2].id}
    assert a.create_each([]) == []


def test_endpoint_runs_are_the_unsettled_runs_that_serve_one(pair: tuple[Store, Store]) -> None:
    a, b = pair
    ep = Endpoint(name="e1", replicas=1, min_replicas=1, max_replicas=1)
    plain = a.create_run(mk_run(1))
    # user content that looks like the field must not hide (or forge) an endpoint
    crafted = mk_run(2).model_copy(update={"env": {"endpoint": "null"}})
    crafted.job = crafted.job.model_copy(update={"serving_args": {"endpoint": None, "node_id": "x"}})
    served = a.create_run(crafted.model_copy(update={"endpoint": ep}))
    fake = a.create_run(mk_run(3).model_copy(update={"env": {"x": '"endpoint":{"name":"e9"}'}}))
    ended = a.create_run(mk_run(4).model_copy(update={"endpoint": ep.model_copy(update={"name": "e2"})}))
    a.transition(ended.id, RunStatus.KILLED)
    assert [r.id for r in b.endpoint_runs()] == [served.id]
    assert {plain.id, fake.id} <= {r.id for r in b.list_runs()}
    later = a.update_run(plain.id, endpoint=ep.model_copy(update={"name": "e3"}))  # (a quiet write on SQLite)
    assert [r.id for r in b.endpoint_runs()] == [served.id, later.id]  # (newest first)
    a.transition(later.id, RunStatus.KILLED)
    assert [r.id for r in b.endpoint_runs()] == [served.id]
    from scheduler.redis_store import RedisStore

    if isinstance(b, SQLiteStore):  # a database written before the endpoint_runs table existed: filled on open
        b._db.executescript("DROP TABLE endpoint_runs; UPDATE meta SET v=0 WHERE k='endpoints';")
        b = SQLiteStore(b.path)
        try:
            assert [r.id for r in b.endpoint_runs()] == [served.id]
            a.transition(served.id, RunStatus.KILLED)
            assert b.endpoint_runs() == []
        finally:
            b.close()
    if isinstance(b, RedisStore):  # a database written before the endpoints set existed: indexed on first look
        b.r.delete(b.k.endpoints, b.k.endpoints_built)
        b = RedisStore(b.url, prefix=b.k.p)  # (a scheduler started on it)
        try:
            assert [r.id for r in b.endpoint_runs()] == [served.id]
            a.transition(served.id, RunStatus.KILLED)
            assert b.endpoint_runs() == [] and b.r.scard(b.k.endpoints) == 0
        finally:
            b.close()


def test_list_runs_filters_by_status_owner_and_node_newest_first(store: Store) -> None:
    base = time.time()
    runs = [store.create_run(mk_run(i, owner="alice" if i % 2 else "bob", created=base + i)) for i in range(6)]
    start_on(store, runs[1], "node-a", [0])
    start_on(store, runs[2], "node-b", [0])
    assert [r.id for r in store.list_runs()] == [r.id for r in reversed(runs)]
    assert [r.id for r in store.list_runs(limit=2)] == [runs[5].id, runs[4].id]
    queued = store.list_runs(status=[RunStatus.QUEUED])
    assert [r.id for r in queued] == [runs[i].id for i in (5, 4, 3, 0)]
    both = store.list_runs(status=[RunStatus.QUEUED, RunStatus.STARTING], limit=3)
    assert [r.id for r in both] == [runs[i].id for i in (5, 4, 3)]
    assert [r.id for r in store.list_runs(owner="alice")] == [runs[i].id for i in (5, 3, 1)]
    assert [r.id for r in store.list_runs(owner="alice", status=[RunStatus.QUEUED], limit=1)] == [runs[5].id]
    assert [r.id for r in store.list_runs(node_id="node-a")] == [runs[1].id]
    assert store.list_runs(node_id="node-a", status=[RunStatus.QUEUED]) == []
    assert store.list_runs(owner="carol") == []
    assert store.count_runs() == {"QUEUED": 4, "STARTING": 2}
    assert store.count_runs("alice") == {"QUEUED": 2, "STARTING": 1} and store.count_runs("carol") == {}


def test_list_runs_pages_on_after_a_cursor_with_ties_kept_apart(store: Store) -> None:
    base = time.time()
    # three created at one instant: the id orders them, and no page boundary loses or repeats one
    runs = [store.create_run(mk_run(i, owner="alice" if i % 2 else "bob", created=base + min(i, 3)))
            for i in range(7)]
    newest_first = sorted(runs, key=lambda r: (r.created_at, r.id), reverse=True)
    for kw in ({}, {"status": [RunStatus.QUEUED]}, {"owner": "alice"}, {"owner": "alice", "status": [RunStatus.QUEUED]}):
        want = [r.id for r in newest_first if kw.get("owner") in (None, r.owner)]
        seen: list[str] = []
        cursor = None
        while True:
            page = store.list_runs(limit=2, before=cursor, **kw)  # type: ignore[arg-type]
            if not page:
                break
            seen += [r.id for r in page]
            cursor = (page[-1].created_at, page[-1].id)
        assert seen == want, kw


def test_transition_is_a_compare_and_set_on_the_state_machine(store: Store) -> None:
    run = store.create_run(mk_run())
    with pytest.raises(InvalidTransition):
        store.transition(run.id, RunStatus.RUNNING)  # QUEUED cannot become RUNNING directly
    with pytest.raises(NotFound):
        store.transition("run-nope", RunStatus.KILLED)
    started = start_on(store, run, "node-a", [1])
    assert started.status == RunStatus.STARTING and started.node_id == "node-a" and started.gpus == [1]
    running = store.transition(run.id, RunStatus.RUNNING)
    assert running.started_at is not None and running.ended_at is None
    done = store.transition(run.id, RunStatus.FINISHED, exit_code=0)
    assert done.ended_at is not None and done.exit_code == 0
    with pytest.raises(InvalidTransition):
        store.transition(run.id, RunStatus.KILLED)
    got = store.get_run(run.id)
    assert got is not None and got.status == RunStatus.FINISHED and got.exit_code == 0


def test_modify_decides_on_the_run_as_another_writer_left_it(pair: tuple[Store, Store]) -> None:
    """Store.modify: `change` judges the run as stored. A copy this handle remembers from before another
    handle's write is never the one written over, nor the one that refuses or skips the change."""
    a, b = pair
    run = a.create_run(mk_run(1))
    seen: list[str | None] = []

    def change(r: Run) -> Run | None:
        seen.append(r.reason)
        return r.changed(reason=f"{r.reason} then a")

    assert a.get_run(run.id) is not None  # (a remembers this copy)
    b.update_run(run.id, reason="b", stop_requested=True)
    before, after = a.modify(run.id, change)
    assert seen[-1] == "b" and before.reason == "b" and after.reason == "b then a"
    stored = b.get_run(run.id)
    assert stored is not None and stored.reason == "b then a" and stored.stop_requested

    # nothing to write, judged on a stale copy, is judged again on the stored run
    assert a.get_run(run.id) is not None
    b.update_run(run.id, reason="c")
    before, after = a.modify(run.id, lambda r: None if r.reason == "b then a" else r.changed(reason="a again"))
    assert after is not before and after.reason == "a again"
    before, after = a.modify(run.id, lambda r: None)
    assert after is before and before.reason == "a again"

    # a refusal judged on a stale copy is judged again: the stored run is QUEUED, not STARTING
    start_on(a, run, "node-0", [0])
    b.transition(run.id, RunStatus.QUEUED, placements=[])  # (requeued by the other handle)

    def placed_again(r: Run) -> Run:
        if r.status != RunStatus.QUEUED:
            raise Conflict(f"{r.status.value}")
        return r.changed(RunStatus.STARTING, placements=[Placement(rank=0, node_id="node-0", gpus=[1])])

    _, after = a.modify(run.id, placed_again)
    assert after.status == RunStatus.STARTING and after.gpus == [1]
    with pytest.raises(Conflict):
        a.modify(run.id, placed_again)
    with pytest.raises(GpuBusy):  # a claim another run holds: refused at the write, nothing written
        other = a.create_run(mk_run(2))
        a.modify(other.id, lambda r: r.changed(RunStatus.STARTING,
                                                placements=[Placement(rank=0, node_id="node-0", gpus=[1])]))
    assert (got := b.get_run(other.id)) is not None and got.status == RunStatus.QUEUED


def test_update_run_changes_fields_but_not_status(store: Store) -> None:
    run = store.create_run(mk_run())
    store.update_run(run.id, reason="waiting", stop_requested=True)
    got = store.get_run(run.id)
    assert got is not None and got.reason == "waiting" and got.stop_requested and got.status == RunStatus.QUEUED
    with pytest.raises(NotFound):
        store.update_run("run-nope", reason="x")


def test_a_run_leaves_the_node_index_when_it_ends(store: Store) -> None:
    run = store.create_run(mk_run())
    start_on(store, run, "node-a", [0])
    assert [r.id for r in store.list_runs(node_id="node-a")] == [run.id]
    store.transition(run.id, RunStatus.KILLED)
    assert store.list_runs(node_id="node-a") == []


def test_the_change_feed_lists_each_run_written_since_once_as_it_is_now(pair: tuple[Store, Store]) -> None:
    """What the scheduler's in-memory queue and GPU book follow (scheduler/service/book.py), also across
    replicas: every write moves the counter; a run written twice is listed once, by its last write."""
    a, b = pair
    start = b.runs_seq()
    one, two = a.create_run(mk_run(1)), a.create_run(mk_run(2))
    seq, runs = b.runs_changed_since(start)
    assert [r.id for r in runs] == [one.id, two.id] and seq == b.runs_seq() > start
    start_on(a, one, "node-a", [0])
    a.update_run(one.id, reason="placed")
    seq2, runs = b.runs_changed_since(seq)
    assert [(r.id, r.status, r.reason) for r in runs] == [(one.id, RunStatus.STARTING, "placed")]
    assert b.runs_changed_since(seq2) == (seq2, [])
    a.update_run(two.id, reason="no room")  # what placement does not read moves nothing
    assert b.runs_changed_since(seq2) == (seq2, []) and b.get_run(two.id).reason == "no room"  # type: ignore[union-attr]
    seq3, runs = b.runs_changed_since(start, limit=1)  # read in pages: the counter says where the page ended
    assert [r.id for r in runs] == [two.id] and start < seq3 < seq2


def test_the_change_feed_leaves_out_a_write_the_reader_applied_already(pair: tuple[Store, Store]) -> None:
    """A write returns its run with the change counter it took (Run._version); given that as `known`, the feed
    leaves the run out until it is written again, by anyone, and its counter still passes it."""
    a, b = pair
    start = b.runs_seq()
    one, two = a.create_run(mk_run(1)), a.create_run(mk_run(2))
    assert one._version is not None and two._version is not None and start < one._version < two._version
    placed = start_on(a, one, "node-a", [0])
    assert placed._version is not None and placed._version > two._version
    assert placed.changed(reason="x")._version is None  # a copy being changed is not written yet
    assert (one.version, placed.version, placed.changed(reason="x").version) == (one._version, placed._version, None)
    known = {one.id: placed._version}
    seq, runs = b.runs_changed_since(start, known=known)
    assert [r.id for r in runs] == [two.id] and seq == b.runs_seq()
    stale = b.runs_changed_since(start, known={one.id: one._version})[1]  # (an older write of it: listed)
    assert [(r.id, r.status) for r in stale] == [(two.id, RunStatus.QUEUED), (one.id, RunStatus.STARTING)]
    quiet = a.update_run(one.id, reason="placed")  # a quiet write takes no counter: the feed does not list it
    assert quiet._version is None and b.runs_changed_since(seq, known=known) == (seq, [])
    b.update_run(one.id, reason="by the other replica", stop_requested=True)  # written again: listed
    seq2, runs = b.runs_changed_since(seq, known=known)
    assert [(r.id, r.stop_requested) for r in runs] == [(one.id, True)] and seq2 > seq
    assert a.runs_changed_since(seq2, known=known) == (seq2, [])


def test_a_sqlite_write_that_cannot_begin_leaves_the_store_usable(tmp_path: Path) -> None:
    """Another process holding the database's write lock past the busy timeout (an admin's sqlite3 shell, a
    backup) makes BEGIN fail. The store's own lock must not stay held by the thread that tried: every other
    request thread would then wait on it for ever, and the scheduler would hang."""
    import sqlite3

    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s._db.execute("PRAGMA busy_timeout=50")  # (30 s in service)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            s.create_run(mk_run(1))
    finally:
        other.execute("ROLLBACK")
        other.close()
    done: list[Run] = []
    t = threading.Thread(target=lambda: done.append(s.create_run(mk_run(2))), daemon=True)
    t.start()
    t.join(timeout=10)
    assert done, "another thread's write waited on the store's lock: the failed BEGIN kept it"
    assert [r.id for r in s.list_runs()] == [done[0].id]
    s.close()


def test_a_version_2_sqlite_database_gains_the_change_counter(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)  # as version 2 left it: no seq column
    db.executescript("DROP INDEX runs_seq; ALTER TABLE runs DROP COLUMN seq; PRAGMA user_version=2;")
    db.close()
    s = SQLiteStore(path)
    run = s.create_run(mk_run(1))
    assert s.runs_changed_since(0)[1][0].id == run.id
    s.close()
    db = sqlite3.connect(path)  # a migration that added the column and died before it wrote the version
    db.execute("PRAGMA user_version=2")
    db.close()
    s = SQLiteStore(path)
    assert [r.id for r in s.runs_changed_since(0)[1]] == [run.id]
    s.close()


def test_a_version_3_sqlite_database_keeps_its_log_lines_as_chunks(tmp_path: Path) -> None:
    """Schema 3 stored a row per log line (table logs); opening it stores them as chunks, every field kept."""
    import sqlite3

    path = tmp_path / "old.db"
    s = SQLiteStore(path)
    run = s.create_run(mk_run(1))
    s.close()
    old = [(0, 1, 0, 0, 1.5, "stdout", "a"), (1, 1, 0, 1, 1.6, "stderr", "b\nc"), (2, 1, 1, 0, 1.7, "stdout", "r1"),
           (3, 1, 0, 2, 1.8, "stdout", ""), (4, 2, 0, 0, 2.0, "fedml", "attempt 2"), (6, 2, 0, 2, 2.1, "stdout", "é")]
    db = sqlite3.connect(path)
    db.executescript(  # as schema 3 had them: nodes without seq, triggers that only count
        "DROP TRIGGER nodes_ins; DROP TRIGGER nodes_upd; DROP TRIGGER nodes_del; DROP INDEX nodes_seq; "
        "DROP TABLE node_gone; ALTER TABLE nodes DROP COLUMN seq; "
        "CREATE TRIGGER nodes_ins AFTER INSERT ON nodes BEGIN UPDATE meta SET v = v + 1 WHERE k = 'nodes'; END; "
        "CREATE TRIGGER nodes_upd AFTER UPDATE ON nodes BEGIN UPDATE meta SET v = v + 1 WHERE k = 'nodes'; END; "
        "CREATE TRIGGER nodes_del AFTER DELETE ON nodes BEGIN UPDATE meta SET v = v + 1 WHERE k = 'nodes'; END; "
        "INSERT INTO nodes (id, name, doc) VALUES ('node-1', 'n1', '" + node(1).model_dump_json() + "');")
    db.executescript("DROP TABLE log_chunks; PRAGMA user_version=3; CREATE TABLE logs (run_id TEXT NOT NULL, "
                     "pos INTEGER NOT NULL, attempt INTEGER NOT NULL, rank INTEGER NOT NULL, seq INTEGER NOT NULL, "
                     "ts REAL NOT NULL, stream TEXT NOT NULL, line TEXT NOT NULL, PRIMARY KEY (run_id, pos)) "
                     "WITHOUT ROWID;")
    db.executemany("INSERT INTO logs (run_id, pos, attempt, rank, seq, ts, stream, line) VALUES (?,?,?,?,?,?,?,?)",
                   [(run.id, *r) for r in old])
    db.execute("INSERT INTO log_seq (run_id, attempt, rank, next_seq) VALUES (?, 2, 0, 3)", (run.id,))
    db.commit()
    db.close()
    s = SQLiteStore(path)
    try:
        assert [tuple(r) for r in s.read_logs(run.id)] == [(p, rk, sq, ts, st, ln, a) for p, a, rk, sq, ts, st, ln in old]
        assert [r.line for r in s.read_logs(run.id, after=1, rank=0)] == ["", "attempt 2", "é"]
        assert s.get_run(run.id).log_count == 7  # type: ignore[union-attr]
        s.append_logs(run.id, 2, 0, 3, [(3.0, "stdout", "new")])
        assert [(r.pos, r.line) for r in s.read_logs(run.id, after=5)] == [(6, "é"), (7, "new")]
        v = s.nodes_version()  # the nodes' change feed works on the old nodes table
        assert [n.id for n in s.list_nodes()] == ["node-1"]
        s.upsert_node(node(1).model_copy(update={"draining": True}))
        s.upsert_node(node(2))
        v2, changed, gone = s.nodes_since(v) or (0, [], set())
        assert sorted(n.id for n in changed) == ["node-1", "node-2"] and gone == set() and v2 == v + 2
        s.delete_node("node-1")
        assert s.nodes_since(v2) == (v2 + 1, [], {"node-1"})
    finally:
        s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='logs'").fetchone()[0] == 0
    db.close()


def test_log_reads_of_one_attempt_include_its_late_lines(store: Store) -> None:
    """An attempt's lines, also those its node sent after the next attempt had begun (docs: an earlier attempt's
    lines are kept under it), and with a rank filter too."""
    run = store.create_run(mk_run())
    store.append_logs(run.id, 1, 0, 0, [(1.0, "stdout", "a1 r0 0"), (1.0, "stdout", "a1 r0 1")])
    store.append_logs(run.id, 1, 1, 0, [(1.0, "stdout", "a1 r1 0")])
    store.append_logs(run.id, 2, 0, 0, [(2.0, "stdout", "a2 r0 0")])
    store.append_logs(run.id, 1, 0, 2, [(1.5, "stdout", "a1 r0 2 (late)")])
    store.append_logs(run.id, 2, 1, 0, [(2.0, "stdout", "a2 r1 0")])
    lines = lambda **kw: [r.line for r in store.read_logs(run.id, -1, 100, **kw)]  # noqa: E731
    assert lines(attempt=1) == ["a1 r0 0", "a1 r0 1", "a1 r1 0", "a1 r0 2 (late)"]
    assert lines(attempt=2) == ["a2 r0 0", "a2 r1 0"]
    assert lines(attempt=1, rank=0) == ["a1 r0 0", "a1 r0 1", "a1 r0 2 (late)"]
    assert [r.line for r in store.read_logs(run.id, 1, 1, attempt=1)] == ["a1 r1 0"]  # a window after pos 1
    _, nd = store.read_logs_ndjson(run.id, -1, 100, 1, attempt=2)
    assert [json.loads(x)["line"] for x in nd.splitlines()] == ["a2 r1 0"]
    _, text = store.read_logs_text(run.id, -1, 100, None, attempt=2)
    assert text.decode().splitlines() == ["3\t0\to\ta2 r0 0", "5\t1\to\ta2 r1 0"]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_log_reads_from_any_position_across_batches_ranks_and_streams(kind: str, tmp_path: Path) -> None:
    """Every (after, limit, rank) window of a log of batches that mix streams, hold newlines and empty lines,
    and are longer than a stored chunk, gives exactly the matching lines in every form."""
    if kind == "sqlite":
        s: Store = SQLiteStore(tmp_path / "window.db")
    else:
        from scheduler.redis_store import RedisStore

        s = RedisStore(redis_url())
    try:
        run = s.create_run(mk_run())
        want: list[tuple[int, int, int, str, str]] = []  # pos, rank, seq, stream, line
        seqs = [0, 0]
        big = 7001 if kind == "sqlite" else 30  # longer than SQLite's chunk (5,000 lines); Redis keeps a line each
        sizes = [(0, 3, "stdout"), (1, big, "stdout"), (0, 4, "mixed"), (1, 2, "stderr"), (0, 5, "newline")]
        for rank, n, kind_ in sizes:
            lines = []
            for i in range(n):
                stream = ("stdout", "stderr", "fedml")[i % 3] if kind_ == "mixed" else (
                    "stdout" if kind_ == "newline" else kind_)
                text = f"r{rank} {seqs[rank] + i}" + ("\nmore" if kind_ == "newline" and i == 2 else "")
                text = "" if i == 1 and kind_ == "stdout" else text
                lines.append((1000.0 + i / 8, stream, text))
            s.append_logs(run.id, 1, rank, seqs[rank], lines)
            for i, (_, stream, text) in enumerate(lines):
                want.append((len(want), rank, seqs[rank] + i, stream, text))
            seqs[rank] += n
        for rank in (None, 0, 1):
            mine = [w for w in want if rank is None or w[1] == rank]
            ends = [sum(n for _, n, _ in sizes[:i]) for i in range(len(sizes) + 1)]  # where batches start
            for after in sorted({-1, 3 + big // 2, *(e + d for e in ends for d in (-2, -1, 0))}):
                for limit in (1, 3, 5000, 100_000):
                    exp = [w for w in mine if w[0] > after][:limit]
                    got = s.read_logs(run.id, after, limit, rank)
                    assert [(r.pos, r.rank, r.seq, r.stream, r.line) for r in got] == exp, (rank, after, limit)
                    last, text = s.read_logs_text(run.id, after, limit, rank)
                    assert last == (exp[-1][0] if exp else after)
                    assert text.decode() == "".join(
                        f"{p}\t{rk}\t{ {'stderr': 'e', 'fedml': 'f'}.get(st, 'o')}\t{ln.replace(chr(10), ' ')}\n"
                        for p, rk, _, st, ln in exp)
                    last, nd = s.read_logs_ndjson(run.id, after, limit, rank)
                    assert [(d["pos"], d["line"], d["stream"]) for d in map(json.loads, nd.splitlines())] == [
                        (p, ln, st) for p, _, _, st, ln in exp]
            for n in (0, 1, 4, 5, big - 1, big + 4, big + 100):
                after = s.tail_after(run.id, n, rank)
                assert [r.pos for r in s.read_logs(run.id, after, 100_000, rank)] == [w[0] for w in mine[-n:]] if n \
                    else after == mine[-1][0]
        assert s.log_counts([run.id]) == {run.id: len(want)}
    finally:
        if kind == "redis":
            s.wipe()  # type: ignore[attr-defined]
        s.close()


def test_concurrent_transitions_of_one_run_let_exactly_one_win(pair: tuple[Store, Store]) -> None:
    a, b = pair
    run = a.create_run(mk_run())
    wins: list[str] = []
    losses: list[str] = []
    gate = threading.Barrier(8)

    def go(i: int) -> None:
        s = (a, b)[i % 2]
        gate.wait()
        try:
            start_on(s, run, f"node-{i}", [0])
            wins.append(f"node-{i}")
        except InvalidTransition:
            losses.append(f"node-{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7, (wins, losses)
    got = b.get_run(run.id)
    assert got is not None and got.node_id == wins[0]


# ---- GPUs --------------------------------------------------------------------------------------------------

def test_a_gpu_held_by_an_unfinished_run_cannot_be_placed_again(store: Store) -> None:
    first, second = store.create_run(mk_run(1)), store.create_run(mk_run(2))
    start_on(store, first, "node-a", [0, 1])
    with pytest.raises(GpuBusy) as busy:
        start_on(store, second, "node-a", [1])
    assert (busy.value.node_id, busy.value.gpu, busy.value.holder) == ("node-a", 1, first.id)
    got = store.get_run(second.id)
    assert got is not None and got.status == RunStatus.QUEUED and got.placements == []  # nothing written
    start_on(store, second, "node-b", [1])  # another node's GPU 1 is free
    store.transition(first.id, RunStatus.RUNNING)
    store.transition(first.id, RunStatus.FINISHED)
    third = store.create_run(mk_run(3))
    start_on(store, third, "node-a", [0, 1])  # freed when the run ended


def test_an_sqlite_database_older_than_its_gpu_claims_table_gains_every_claim(tmp_path: Path) -> None:
    """The claims table is built on open from the unfinished runs of a database written before it existed."""
    import sqlite3

    path = tmp_path / "old.db"
    s = SQLiteStore(path)
    held, ended = s.create_run(mk_run(1)), s.create_run(mk_run(2))
    start_on(s, held, "node-a", [0, 1])
    start_on(s, ended, "node-b", [0])
    s.transition(ended.id, RunStatus.RUNNING)
    s.transition(ended.id, RunStatus.FINISHED)
    s.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE gpu_claims; DELETE FROM meta WHERE k='claims';")
    db.close()
    s = SQLiteStore(path)
    try:
        other = s.create_run(mk_run(3))
        with pytest.raises(GpuBusy) as busy:
            start_on(s, other, "node-a", [1])
        assert busy.value.holder == held.id
        start_on(s, other, "node-b", [0])  # the finished run's GPU is free
    finally:
        s.close()


def test_a_lost_rank_frees_its_gpus(store: Store) -> None:
    run = store.create_run(mk_run(1))
    start_on(store, run, "node-a", [0])
    lost = Placement(rank=0, node_id="node-a", gpus=[0], status=RunStatus.LOST)
    store.transition(run.id, RunStatus.LOST, placements=[lost])
    other = store.create_run(mk_run(2))
    start_on(store, other, "node-a", [0])
    store.transition(run.id, RunStatus.QUEUED, placements=[], attempt=2)  # requeued: needs another GPU now
    with pytest.raises(GpuBusy):
        start_on(store, run, "node-a", [0])


def test_racing_placements_never_share_a_gpu(pair: tuple[Store, Store]) -> None:
    a, b = pair
    runs = [a.create_run(mk_run(i)) for i in range(12)]
    placed: list[tuple[str, int]] = []
    gate = threading.Barrier(len(runs))

    def go(i: int) -> None:
        s = (a, b)[i % 2]
        gate.wait()
        try:
            start_on(s, runs[i], "node-a", [i % 3])  # 12 runs, 3 GPUs
            placed.append((runs[i].id, i % 3))
        except GpuBusy:
            pass

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(g for _, g in placed) == [0, 1, 2], placed
    starting = b.list_runs(status=[RunStatus.STARTING])
    assert sorted((r.id, r.gpus[0]) for r in starting) == sorted(placed)


def test_transitions_sent_together_are_each_a_compare_and_set(pair: tuple[Store, Store]) -> None:
    """Store.sends(): what a pass's placements go through. Each transition is judged alone; whatever send() says
    is what the store holds: a run it reports failed got nothing of its transition, a run it reports written
    over a newer copy is as reported, every other run as transition() returned it; no GPU is held twice."""
    a, b = pair
    runs = [a.create_run(mk_run(i)) for i in range(4)]
    tx = contextlib.ExitStack()
    if isinstance(a, SQLiteStore):  # (a pass's transaction: sends are held back until send() within it; the
        tx.enter_context(a.batch())  # writes between are the pass's own, in the same transaction)
    sends = a.sends()
    made: dict[str, Run] = {}
    early: dict[str, Exception] = {}  # errors known before the write (a store that writes at once)

    def place(run: Run, gpu: int) -> None:
        try:
            made[run.id] = sends.transition(run.id, RunStatus.STARTING,
                                            placements=[Placement(rank=0, node_id="node-a", gpus=[gpu])])
        except (GpuBusy, InvalidTransition) as exc:
            early[run.id] = exc

    place(runs[0], 0)
    place(runs[1], 1)
    b.update_run(runs[1].id, reason="another writer got in between")  # (a conflict where writes are deferred)
    place(runs[2], 0)  # GPU 0 is the first run's
    place(runs[3], 2)
    b.transition(runs[3].id, RunStatus.KILLED)  # stopped meanwhile (before its placement, where deferred)
    if not isinstance(a, SQLiteStore):
        a.r.script_flush()  # type: ignore[attr-defined]  # (a restarted server: the calls are sent again, once loaded)
    failed = sends.send()
    assert not sends.send()  # (nothing left to send)
    tx.close()
    outcome = {**early, **failed}
    assert runs[0].id not in outcome
    assert isinstance(outcome[runs[2].id], GpuBusy) and outcome[runs[2].id].holder == runs[0].id
    for run in runs[:3]:  # (the fourth: below)
        stored = b.get_run(run.id)
        assert stored is not None
        said = outcome.get(run.id, made.get(run.id))
        if isinstance(said, Exception):  # nothing of the placement written
            assert stored.placements == [] and stored.status == RunStatus.QUEUED, stored
        else:
            assert said is not None and (stored.status, stored.placements) == (said.status, said.placements)
    # (the second run: placed either way; the fourth: placed then stopped, or its placement refused)
    second = b.get_run(runs[1].id)
    assert second is not None and second.status == RunStatus.STARTING
    fourth = b.get_run(runs[3].id)
    assert fourth is not None and fourth.status == RunStatus.KILLED and not fourth.gpu_claims()
    assert isinstance(failed[runs[1].id], Run) and failed[runs[1].id].status == RunStatus.STARTING
    assert failed[runs[1].id].reason == "another writer got in between"  # (placed over it: nothing lost)
    assert isinstance(failed[runs[3].id], InvalidTransition) and not early
    held = [(r.placements[0].node_id, g) for r in b.list_runs(status=[RunStatus.STARTING]) for g in r.gpus]
    assert sorted(held) == [("node-a", 0), ("node-a", 1)]
    c, later = a.create_run(mk_run(9)), a.sends()  # GPU 2 is free: the fourth run holds nothing
    assert later.transition(c.id, RunStatus.STARTING, placements=[Placement(rank=0, node_id="node-a", gpus=[2])]
                            ).status == RunStatus.STARTING and later.send() == {}
    if isinstance(a, SQLiteStore):  # (outside a transaction nothing holds the run between read and write)
        assert b.get_run(c.id).status == RunStatus.STARTING  # type: ignore[union-attr]  # written at once


def test_sqlite_placements_held_back_are_never_committed_unsent(tmp_path: Path) -> None:
    """SQLite's sends hold a pass's placements back until send() in the pass's transaction: a transaction that
    would commit without sending them commits nothing (a run the pass took as placed is not left queued
    unseen); one undone by a savepoint drops its placements alone."""
    s = SQLiteStore(tmp_path / "held.db")
    try:
        first, second = s.create_run(mk_run(1)), s.create_run(mk_run(2))
        on_a = [Placement(rank=0, node_id="node-a", gpus=[0])]
        sends = s.sends()
        with pytest.raises(RuntimeError, match="not sent"), s.batch():
            s.update_run(second.id, reason="written in the same transaction")
            sends.transition(first.id, RunStatus.STARTING, placements=on_a)
        with pytest.raises(RuntimeError, match="has ended"):
            sends.send()  # (judged in a transaction that is undone: never written in another)
        assert [(r.status, r.reason) for r in (s.get_run(first.id), s.get_run(second.id))] == \
            [(RunStatus.QUEUED, None), (RunStatus.QUEUED, None)]  # type: ignore[union-attr]
        with s.batch():
            s.update_run(second.id, reason="kept")
            with pytest.raises(ValueError), s.savepoint():
                s.sends().transition(first.id, RunStatus.STARTING, placements=on_a)
                raise ValueError("a failed pass")
        assert [(r.status, r.reason) for r in (s.get_run(first.id), s.get_run(second.id))] == \
            [(RunStatus.QUEUED, None), (RunStatus.QUEUED, "kept")]  # type: ignore[union-attr]
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_placement_is_made_over_the_run_as_stored_not_as_created(kind: str, tmp_path: Path) -> None:
    """A store keeps the runs it created, parsed, for their placement (store.Created): only while the stored
    document is still the one it wrote. A run another process changed since is placed over that change; a
    run its creator changed afterwards in memory is placed as it was written."""
    if kind == "sqlite":
        a: Store = SQLiteStore(tmp_path / "kept.db")
        b: Store = SQLiteStore(tmp_path / "kept.db")  # (another process)
    else:
        from scheduler.redis_store import RedisStore

        url = redis_url()
        a, b = RedisStore(url), RedisStore(url)
    try:
        renamed, changed_after, plain = (a.create_run(mk_run(i)) for i in range(3))
        assert len(a._created) == 3  # type: ignore[attr-defined]
        b.update_run(renamed.id, name="renamed by another process")
        changed_after.name = "changed by its creator after the write"
        with a.batch():
            sends = a.sends()
            for gpu, run in enumerate((renamed, changed_after, plain)):
                sends.transition(run.id, RunStatus.STARTING, placements=[Placement(rank=0, node_id="n", gpus=[gpu])])
            failed = sends.send()
        assert set(failed) <= {renamed.id} and all(isinstance(r, Run) for r in failed.values())  # (Redis: redone)
        got = {r.id: r for r in (b.get_run(x.id) for x in (renamed, changed_after, plain)) if r is not None}
        assert {r.status for r in got.values()} == {RunStatus.STARTING}
        assert got[renamed.id].name == "renamed by another process"
        assert got[changed_after.id].name == "r1" and got[plain.id].name == "r2"
        assert len(a._created) == 0  # type: ignore[attr-defined]  # (each taken once)
    finally:
        if kind == "redis":
            a.wipe()  # type: ignore[attr-defined]
        a.close()
        b.close()


def test_runs_kept_for_their_placement_are_bounded_in_number_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.store as store_module
    from scheduler.store import Created

    clock = [100.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(Created, "MAX", 3)
    kept, runs = Created(), [mk_run(i) for i in range(5)]
    for run in runs:
        kept.keep(run, run.model_dump_json())
        clock[0] += 1.0
    assert len(kept) == 3  # (the first three: the queue's order places the oldest first)
    doc = runs[0].model_dump_json()
    runs[0].name = "changed by its creator"
    assert kept.parsed(runs[0].id, doc).name == "r0" and len(kept) == 2  # (a copy, taken once)
    clock[0] = 100.0 + Created.AGE + 1.5  # the second is past AGE, the third not
    kept.prune()
    assert len(kept) == 1 and kept.parsed(runs[2].id, runs[2].model_dump_json()).id == runs[2].id


def test_a_kept_run_is_placed_as_the_same_document_as_its_stored_one_read_back(tmp_path: Path) -> None:
    """store.Created's premise: a run as the scheduler created it and the same run parsed back from the document
    written are placed as the same document, for every FedML example and template (defaults, free keys,
    multi-OS commands, services, sweeps' points...)."""
    from scheduler.contract.errors import Invalid
    from scheduler.contract.models import Principal, RunCreate
    from scheduler.notify import Notifier

    from .conftest import COMPAT, ROOT

    needs("the FedML compatibility corpus", COMPAT.is_dir(), f"{COMPAT} is missing")
    texts = {str(p): p.read_text() for p in sorted(COMPAT.rglob("*.yaml")) + sorted((ROOT / "job_templates").rglob(
        "job.yaml"))}
    texts["swept"] = ("job: python train.py --lr $lr\nsweep: {lr: [0.1, 0.01]}\nenvs: {A: 1, B: true}\n"
                      "labels: {zone: eu}\nmax_duration: 2h\ncomputing: {minimum_num_gpus: 2, resource_type: H100}\n"
                      "retry: {max_attempts: 3, on: [error, lost]}\npreemption: {grace: 10s}\nfree_key: {x: [1, 2]}\n")
    store = SQLiteStore(tmp_path / "same.db")
    sched = Scheduler(store, Notifier(), heartbeat_interval=10.0, rng=random.Random(1))
    who = Principal(scope="user", owner="alice", key_id="k")
    checked = 0
    try:
        for name, text in texts.items():
            with contextlib.suppress(Invalid):  # (a model's config, not a job file; a job stored on FedML's site)
                sched.create_run(RunCreate(job_text=text, job_file=name, env={"E": "1"}), who)
        for run_id, (_, doc, kept) in list(store._created._runs.items()):
            assert doc == store._db.execute("SELECT doc FROM runs WHERE id=?", (run_id,)).fetchone()[0]
            place = {"placements": [Placement(rank=0, node_id="n", gpus=[0])], "reason": None, "master_port": 1}
            as_kept = kept.changed(RunStatus.STARTING, now=5.0, **place).model_dump_json()
            as_read = Run.model_validate_json(doc).changed(RunStatus.STARTING, now=5.0, **place).model_dump_json()
            assert as_kept == as_read, kept.job_file
            checked += 1
        assert checked >= 18, f"only {checked} runs were made of {len(texts)} job files"
    finally:
        store.close()


# ---- logs --------------------------------------------------------------------------------------------------

def lines(n: int, tag: str = "l") -> list[tuple[float, str, str]]:
    return [(1000.0 + i, "stdout" if i % 2 else "stderr", f"{tag}{i} ünïcode \"q\" \\ tab\t") for i in range(n)]


def test_logs_append_in_order_and_drop_resent_lines(pair: tuple[Store, Store]) -> None:
    a, b = pair
    run = a.create_run(mk_run())
    assert a.next_seq(run.id, 1, 0) == 0
    assert a.append_logs(run.id, 1, 0, 0, lines(3)) == 3
    assert b.append_logs(run.id, 1, 0, 1, lines(5)[1:]) == 5  # 1, 2 resent; 3, 4 new
    assert b.append_logs(run.id, 1, 0, 0, lines(2)) == 5  # all resent
    with pytest.raises(SeqGap) as gap:
        a.append_logs(run.id, 1, 0, 7, lines(1))
    assert gap.value.expected == 5
    rows = b.read_logs(run.id)
    assert [(r.pos, r.rank, r.seq, r.line) for r in rows] == [(i, 0, i, lines(5)[i][2]) for i in range(5)]
    assert [(r.ts, r.stream) for r in rows] == [(x[0], x[1]) for x in lines(5)]
    assert [r.pos for r in a.read_logs(run.id, after=2)] == [3, 4]
    assert [r.pos for r in a.read_logs(run.id, after=0, limit=2)] == [1, 2]
    got = a.get_run(run.id)
    assert got is not None and got.log_count == 5
    assert a.next_seq(run.id, 1, 0) == 5 and a.next_seq(run.id, 2, 0) == 0
    assert a.append_logs(run.id, 1, 0, 5, []) == 5


def test_a_batch_as_columns_is_stored_as_the_same_lines_as_rows(store: Store) -> None:
    """What an agent sends (LogBatch: a text per line, a time and a stream for all or per line) is stored line
    for line as append_logs stores rows: across chunk boundaries, resent lines dropped, odd text kept."""
    a, b = store.create_run(mk_run(1)), store.create_run(mk_run(2))
    n = 12_345  # (over two chunks of 5,000)
    texts = [f"l{i}" if i % 97 else f"odd {i}\t\u2028 \"q\" " + ("two\nlines" if i % 2 else "") for i in range(n)]
    streams = ["stdout" if i % 3 else "stderr" for i in range(n)]
    rows = [(1000.0 + i, streams[i], texts[i]) for i in range(n)]

    def cols(first: int, end: int, one: bool = False) -> LogBatch:
        if one:
            return LogBatch(first_seq=first, text=texts[first:end], ts=5.0, stream="stdout")
        return LogBatch(first_seq=first, text=texts[first:end], ts=[r[0] for r in rows[first:end]],
                        stream=streams[first:end])

    assert store.append_logs(a.id, 1, 0, 0, rows[:7000]) == 7000
    assert store.append_logs(a.id, 1, 0, 6000, rows[6000:]) == n  # 1,000 resent
    assert store.append_log_batch(b.id, cols(0, 7000)) == 7000
    assert store.append_log_batch(b.id, cols(6000, n)) == n
    assert store.append_log_batch(b.id, cols(0, 10)) == n  # all resent
    with pytest.raises(SeqGap):
        store.append_log_batch(b.id, cols(n + 1, n + 2))

    def read(run_id: str) -> list[tuple[int, int, float, str, str]]:
        return [(r.pos, r.seq, r.ts, r.stream, r.line) for r in store.read_logs(run_id, limit=2 * n)]

    assert read(a.id) == read(b.id) and len(read(b.id)) == n
    c = store.create_run(mk_run(3))  # one time and one stream for the batch
    assert store.append_log_batch(c.id, cols(0, 6000, one=True)) == 6000
    assert {(r[2], r[3]) for r in read(c.id)} == {(5.0, "stdout")} and [r[4] for r in read(c.id)] == texts[:6000]
    assert store.append_log_batch(c.id, LogBatch(first_seq=6000, text=[], ts=5.0, stream="stdout")) == 6000


def test_logs_as_ndjson_are_the_same_records_as_the_rows(store: Store) -> None:
    """What GET /runs/{id}/logs sends: each store's NDJSON says what LogRow.to_json says, odd text included."""
    run = store.create_run(mk_run())
    odd = ['plain', 'quote " and \\ backslash', "tab\tbell\x07", "é ü 中文 \u2028 emoji 🚀", "", "{\"json\": 1}"]
    store.append_logs(run.id, 1, 0, 0, [(1796473885.492972 + i, "stdout" if i % 2 else "stderr", t)
                                         for i, t in enumerate(odd)])
    store.append_logs(run.id, 1, 1, 0, [(5.5, "stdout", "rank one")])
    last, body = store.read_logs_ndjson(run.id, after=-1, limit=5)
    records = [json.loads(x) for x in body.decode().split("\n") if x]
    assert records == [json.loads(r.to_json()) for r in store.read_logs(run.id, limit=5)] and last == 4
    assert [r["line"] for r in records] == odd[:5] and records[0]["ts"] == 1796473885.492972
    last, body = store.read_logs_ndjson(run.id, after=4, rank=1)
    assert [json.loads(x)["line"] for x in body.decode().split("\n") if x] == ["rank one"] and last == 6
    assert store.read_logs_ndjson(run.id, after=6) == (6, b"")


def test_logs_as_text_records_say_what_the_rows_say(store: Store) -> None:
    """The display form (`fedml logs`): "pos TAB rank TAB o|e|f TAB line" per line, in order, the same lines as
    read_logs; tabs stay in the line (the last field), a newline inside a stored line reads as a space."""
    run = store.create_run(mk_run())
    odd = ["plain", "tab\there", "é ü 中文 \u2028 🚀", "", "two\nlines", "\r\x07"]
    store.append_logs(run.id, 1, 0, 0, [(1.0 + i, ("stdout", "stderr", "fedml", "other")[i % 4], t)
                                         for i, t in enumerate(odd)])
    store.append_logs(run.id, 1, 1, 0, [(9.0, "stdout", "rank one")])
    last, body = store.read_logs_text(run.id, after=-1, limit=100)
    records = [rec.split("\t", 3) for rec in body.decode().split("\n")[:-1]]
    assert last == 6 and body.endswith(b"\n")
    assert records == [[str(r.pos), str(r.rank), {"stderr": "e", "fedml": "f"}.get(r.stream, "o"),
                        r.line.replace("\n", " ")] for r in store.read_logs(run.id, limit=100)]
    assert [r[3] for r in records] == [*odd[:4], "two lines", "\r\x07", "rank one"]
    assert store.read_logs_text(run.id, after=1, limit=2)[0] == 3
    assert store.read_logs_text(run.id, after=-1, rank=1) == (6, b"6\t1\to\trank one\n")
    assert store.read_logs_text(run.id, after=6) == (6, b"")


def test_ranks_and_attempts_have_their_own_sequences(store: Store) -> None:
    run = store.create_run(mk_run())
    store.append_logs(run.id, 1, 0, 0, lines(2, "r0-"))
    store.append_logs(run.id, 1, 1, 0, lines(3, "r1-"))
    store.append_logs(run.id, 2, 0, 0, lines(1, "a2-"))
    rows = store.read_logs(run.id)
    assert [r.pos for r in rows] == list(range(6))
    assert [r.line[:4] for r in store.read_logs(run.id, rank=1)] == ["r1-0", "r1-1", "r1-2"]
    assert [r.pos for r in store.read_logs(run.id, rank=0, after=1, limit=1)] == [5]
    assert store.next_seq(run.id, 1, 1) == 3 and store.next_seq(run.id, 2, 0) == 1


def test_concurrent_appends_keep_every_line_once(pair: tuple[Store, Store]) -> None:
    a, b = pair
    run = a.create_run(mk_run())
    batches = 20

    def ship(rank: int) -> None:
        s = (a, b)[rank % 2]
        seq = 0
        for i in range(batches):
            batch = [(float(i), "stdout", f"rank{rank} line{seq + j}") for j in range(25)]
            assert s.append_logs(run.id, 1, rank, seq, batch) == seq + 25
            if i % 3 == 0:  # an unacknowledged batch resent
                assert s.append_logs(run.id, 1, rank, seq, batch) == seq + 25
            seq += 25

    threads = [threading.Thread(target=ship, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = b.read_logs(run.id, limit=100_000)
    assert [r.pos for r in rows] == list(range(4 * batches * 25))
    for rank in range(4):
        mine = [r.line for r in rows if r.rank == rank]
        assert mine == [f"rank{rank} line{i}" for i in range(batches * 25)]


def test_a_big_batch_is_stored_whole(store: Store) -> None:
    run = store.create_run(mk_run())
    assert store.append_logs(run.id, 1, 0, 0, lines(20_000)) == 20_000
    rows = store.read_logs(run.id, limit=100_000)
    assert len(rows) == 20_000 and rows[-1].line == lines(20_000)[-1][2]


# ---- nodes and keys ----------------------------------------------------------------------------------------

def test_nodes_upsert_list_touch_and_delete(pair: tuple[Store, Store]) -> None:
    a, b = pair
    for i in (3, 1, 2):
        a.upsert_node(node(i))
    assert [n.name for n in b.list_nodes()] == ["n1", "n2", "n3"]
    got = b.get_node("node-2")
    assert got is not None and got.model_dump() == node(2).model_dump() | {"registered_at": got.registered_at,
                                                                          "last_seen": got.last_seen}
    found = b.node_by_name("n3")
    assert found is not None and found.id == "node-3"
    a.upsert_node(node(2).model_copy(update={"state": "OFFLINE", "draining": True}))
    assert [n.state for n in b.list_nodes() if n.id == "node-2"] == ["OFFLINE"]
    touched = b.touch_node("node-2", 1234.5)
    assert touched.state == "ONLINE" and touched.last_seen == 1234.5 and touched.draining
    renamed = node(2).model_copy(update={"name": "n2-new"})
    a.upsert_node(renamed)
    assert b.node_by_name("n2") is None and (b.node_by_name("n2-new") or node(0)).id == "node-2"
    with pytest.raises(AlreadyExists):  # another node's name: refused alike by every store, nothing written
        a.upsert_node(node(3).model_copy(update={"name": "n2-new"}))
    assert (b.node_by_name("n3") or node(0)).id == "node-3"
    a.delete_node("node-1")
    assert b.get_node("node-1") is None and b.node_by_name("n1") is None
    assert [n.name for n in b.list_nodes()] == ["n2-new", "n3"]
    with pytest.raises(NotFound):
        b.touch_node("node-1", 1.0)


def test_every_node_write_moves_the_nodes_version(pair: tuple[Store, Store], tmp_path: Path) -> None:
    """The node cache (SchedulerBase.nodes) re-lists only when this moves: every write by any process must."""
    a, b = pair
    if a is b:  # SQLite: a second connection to the same file, as another process would open it
        b = SQLiteStore(a.path)  # type: ignore[attr-defined]
    try:
        seen = [b.nodes_version()]

        def moved() -> bool:
            seen.append(b.nodes_version())
            return seen[-1] != seen[-2]

        a.upsert_node(node(1))
        assert moved()
        a.upsert_node(node(1).model_copy(update={"draining": True}))
        assert moved()
        a.touch_node("node-1", 99.0)
        assert moved()
        a.heartbeat("node-1", 100.0)  # soft state: not a node write
        a.list_nodes()
        assert not moved()
        with pytest.raises(AlreadyExists):
            a.upsert_node(node(2).model_copy(update={"name": "n1"}))
        assert not moved()  # refused, nothing written
        a.delete_node("node-1")
        assert moved()
    finally:
        if b is not pair[1]:
            b.close()


def test_the_nodes_change_feed_gives_what_moved_since_a_version(pair: tuple[Store, Store]) -> None:
    """nodes_since: a reader at a version gets exactly the nodes written after it (as they are now) and the ids
    removed after it, whoever wrote them; applying that to what it had gives list_nodes()."""
    a, b = pair
    a.upsert_node(node(1))
    a.upsert_node(node(2))
    a.upsert_node(node(3))
    v0 = b.nodes_version()
    had = {n.id: n for n in b.list_nodes()}
    assert b.nodes_since(v0) == (v0, [], set())
    a.upsert_node(node(2).model_copy(update={"draining": True}))
    a.touch_node("node-3", 55.0)
    a.upsert_node(node(4))
    a.delete_node("node-1")
    a.delete_node("node-4")  # added and removed after v0: only its removal matters
    a.heartbeat("node-2", 99.0)  # soft state: not in the feed
    got = b.nodes_since(v0)
    assert got is not None
    v1, changed, gone = got
    assert v1 == b.nodes_version() > v0
    assert sorted(n.id for n in changed) == ["node-2", "node-3"] and gone == {"node-1", "node-4"}
    for n in changed:
        had[n.id] = n
    for i in gone:
        had.pop(i, None)
    assert sorted((n.id, n.model_dump_json()) for n in had.values()) == sorted(
        (n.id, n.model_dump_json()) for n in b.list_nodes())
    assert b.nodes_since(v1) == (v1, [], set())
    a.upsert_node(node(1))  # back under the same id: a write, no longer removed
    v2, changed, gone = b.nodes_since(v1) or (0, [], set())
    assert [n.id for n in changed] == ["node-1"] and gone == set() and v2 > v1
    assert b.nodes_since(v2 + 1000) is None  # a version this store never reached: list them all



def test_redis_sends_go_out_again_on_a_new_connection_when_the_server_dropped_theirs() -> None:
    """Redis: a pass's writes go out raw (RedisStore._pipe, not redis-py's pipeline), on a connection of the
    client's pool. One the server closed since it was last used (a restart, an idle timeout, CLIENT KILL) is
    opened again and the commands are sent on it: the placement lands once, and each reply of the batch, an
    error included, stays its own command's."""
    import redis

    from scheduler.redis_store import RedisStore

    store = RedisStore(redis_url())
    killer = redis.Redis.from_url(store.url)
    try:
        runs = [store.create_run(mk_run(i)) for i in range(2)]
        before = store.r.client_id()  # (the pool's one connection, handed back)
        assert killer.client_kill_filter(_id=before) == 1
        sends = store.sends()
        placed = sends.transition(runs[0].id, RunStatus.STARTING,
                                  placements=[Placement(rank=0, node_id="node-a", gpus=[0])])
        busy = sends.transition(runs[1].id, RunStatus.STARTING,  # (refused by the script: its GPU is taken)
                                placements=[Placement(rank=0, node_id="node-a", gpus=[0])])
        failed = sends.send()
        assert set(failed) == {busy.id} and isinstance(failed[busy.id], GpuBusy), failed
        assert store.r.client_id() != before  # (it did go out on a new connection)
        stored = store.get_run(placed.id)
        assert stored is not None and stored.status == RunStatus.STARTING and stored.attempt == placed.attempt
        got = store._pipe([("INCR", store.k.run(placed.id)), ("PING",)])  # (an error reply, then the next)
        assert isinstance(got[0], redis.exceptions.ResponseError) and got[1] == b"PONG", got
        assert store.get_run(placed.id) == stored
    finally:
        store.wipe()
        store.close()
        killer.close()

@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_key_read_just_before_its_revocation_is_not_used_after_it(kind: str, tmp_path: Path) -> None:
    """The key cache (store.KeyCache): a request that read the key before the revocation and stores it after (a
    race between threads of one process) must not make this process accept the revoked key for the next second."""
    if kind == "sqlite":
        store: Store = SQLiteStore(tmp_path / "keys.db")
    else:
        from scheduler.redis_store import RedisStore

        store = RedisStore(redis_url())
    try:
        key = ApiKey(id="key-1", name="ci", scope="user", owner="ci", hash="a" * 64, prefix="fml_u_x", created_at=1.0)
        store.put_key(key)
        assert (store.key_by_hash("a" * 64) or key).revoked_at is None
        cache = store._keys  # type: ignore[attr-defined]
        seen = cache._seen  # what the racing request saw before it read the key
        store.put_key(key.model_copy(update={"revoked_at": 5.0}))
        cache._cache["a" * 64] = (seen, key)  # ... and stores it after the revocation
        assert store.key_cached("a" * 64) is MISS  # (the event loop's look, without a read: not the stale key)
        got = store.key_by_hash("a" * 64)
        assert got is not None and got.revoked_at == 5.0
        cache._cache["a" * 64] = (seen, key)  # (the same race after the version was read again)
        assert store.key_cached("a" * 64) is MISS
        got = store.key_by_hash("a" * 64)
        assert got is not None and got.revoked_at == 5.0
        cached = store.key_cached("a" * 64)
        assert isinstance(cached, ApiKey) and cached.revoked_at == 5.0
    finally:
        if kind == "redis":
            store.wipe()  # type: ignore[attr-defined]
        store.close()


def test_a_key_revoked_by_another_process_is_refused_within_the_cache_time(tmp_path: Path) -> None:
    """SQLite: a second connection to the file (another process) revokes a key this one has cached: the key
    version moves with the write, and the cache looks at it at least every KeyCache.TTL."""
    a, b = SQLiteStore(tmp_path / "k.db"), SQLiteStore(tmp_path / "k.db")
    try:
        key = ApiKey(id="key-1", name="ci", scope="user", owner="ci", hash="a" * 64, prefix="fml_u_x", created_at=1.0)
        a.put_key(key)
        assert (a.key_by_hash("a" * 64) or key).revoked_at is None
        b.put_key(key.model_copy(update={"revoked_at": 5.0}))
        a._keys._checked -= a._keys.TTL  # (as if the time had passed)
        assert a.key_cached("a" * 64) is MISS  # past the cache time, even a look without a read reads
        assert (a.key_by_hash("a" * 64) or key).revoked_at == 5.0
    finally:
        a.close()
        b.close()


def test_keys_are_found_by_digest_and_revocation_sticks(pair: tuple[Store, Store]) -> None:
    a, b = pair
    k1 = ApiKey(id="key-1", name="ci", scope="user", owner="ci", hash="a" * 64, prefix="fml_u_x", created_at=1.0)
    k2 = ApiKey(id="key-2", name="adm", scope="admin", owner="admin", hash="b" * 64, prefix="fml_a_y", created_at=2.0)
    a.put_key(k2)
    a.put_key(k1)
    assert [k.id for k in b.list_keys()] == ["key-1", "key-2"]
    assert b.key_cached("a" * 64) is MISS  # (not read yet)
    got = b.key_by_hash("a" * 64)
    assert got is not None and got.id == "key-1" and got.revoked_at is None
    assert b.key_cached("a" * 64) == got and b.key_cached("c" * 64) is MISS  # read: the cache answers
    a.put_key(k1.model_copy(update={"revoked_at": 5.0}))
    assert a.key_cached("a" * 64) is MISS  # revoked here: the next look reads
    got = a.key_by_hash("a" * 64)
    assert got is not None and got.revoked_at == 5.0
    # Another replica may answer from its cache of keys for up to a second.
    deadline = time.monotonic() + 1.5
    while (got := b.key_by_hash("a" * 64)) is not None and got.revoked_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got is not None and got.revoked_at == 5.0
    assert b.key_by_hash("c" * 64) is None
    assert len(b.list_keys()) == 2


def test_a_new_key_leaves_the_keys_cached_everywhere_cached(pair: tuple[Store, Store]) -> None:
    """Caches hold only keys found, so a key added cannot make one wrong: adding it moves no version and
    empties no cache (10,000 agents joining emptied every replica's cache per join, and every poll missed it).
    A key that changes still does, on both."""
    a, b = pair
    k1 = ApiKey(id="key-1", name="ci", scope="user", owner="ci", hash="a" * 64, prefix="fml_u_x", created_at=1.0)
    a.put_key(k1)
    assert a.key_by_hash("a" * 64) == b.key_by_hash("a" * 64) == k1  # (cached on both)
    for i in range(2, 5):
        a.put_key(ApiKey(id=f"key-{i}", name=f"node {i}", scope="node", owner=f"node-{i}", hash=str(i) * 64,
                         prefix="fml_n_x", created_at=float(i)))
        for store in (a, b):
            store._keys._checked -= store._keys.TTL  # type: ignore[attr-defined]  # (the version looked at again)
            got = store.key_by_hash(str(i) * 64)
            assert got is not None and got.id == f"key-{i}"  # the new one, read where it is first asked for
            assert store.key_cached("a" * 64) == k1  # and the one cached before still is
    a.put_key(k1.model_copy(update={"revoked_at": 5.0}))
    assert a.key_cached("a" * 64) is MISS
    b._keys._checked -= b._keys.TTL  # type: ignore[attr-defined]
    got = b.key_by_hash("a" * 64)
    assert got is not None and got.revoked_at == 5.0


# ---- what replicas share -----------------------------------------------------------------------------------

def test_heartbeats_return_the_one_before(pair: tuple[Store, Store]) -> None:
    a, b = pair
    assert a.heartbeat("node-1", 10.0) is None
    assert b.heartbeat("node-1", 11.5) == 10.0
    assert a.heartbeat("node-1", 0.0) == 11.5  # marked OFFLINE
    assert not b.heartbeat("node-1", 12.0)
    a.heartbeat("node-2", 3.0)
    assert b.heartbeats() == {"node-1": 12.0, "node-2": 3.0}
    assert b.heartbeats(["node-2", "node-9"]) == {"node-2": 3.0} and b.heartbeats([]) == {}  # only those asked


def test_a_snapshot_reads_the_last_commit_without_waiting(store: Store) -> None:
    """snapshot(): what an event loop reads itself. SQLite: a connection of its own that reads the last commit
    and does not wait for a thread inside a write transaction (nor sees its writes); one reader at a time (a
    second gets None). Redis: none (every read is a round trip). heartbeat_if_seen records only a node heard
    from before and not marked OFFLINE since, on both."""
    assert not store.heartbeat_if_seen("node-h", 5.0) and "node-h" not in store.heartbeats()
    store.heartbeat("node-h", 4.0)
    assert store.heartbeat_if_seen("node-h", 5.0) == 4.0 and store.heartbeats()["node-h"] == 5.0
    store.heartbeat("node-h", 0.0)  # marked OFFLINE
    assert not store.heartbeat_if_seen("node-h", 6.0) and store.heartbeats()["node-h"] == 0.0
    if not isinstance(store, SQLiteStore):
        with store.snapshot() as snap:
            assert snap is None
        return
    store.upsert_node(Node(id="node-a", name="a"))
    mine = start_on(store, store.create_run(mk_run(1)), "node-a", [0])
    with store.snapshot() as snap:
        assert snap is not None
        assert [r.model_dump() for r in snap.node_runs("node-a", [RunStatus.STARTING])] == [mine.model_dump()]
        assert snap.node_runs("node-a", [RunStatus.RUNNING]) == [] and snap.node_runs("node-b", RunStatus) == []
        got = snap.get_node("node-a")
        assert got is not None and got.name == "a" and snap.get_node("node-b") is None
        with store.snapshot() as other:
            assert other is None  # (in use)
    uncommitted = write_open(store, lambda: start_on(store, store.create_run(mk_run(2)), "node-a", [1]))
    with uncommitted, store.snapshot() as snap:
        assert snap is not None and [r.id for r in snap.node_runs("node-a", RunStatus)] == [mine.id]
    with store.snapshot() as snap:
        assert snap is not None and len(snap.node_runs("node-a", RunStatus)) == 2  # committed now


def test_a_registration_records_a_heartbeat_unless_the_node_is_marked_offline(store: Store) -> None:
    assert store.heartbeat_unless_offline("node-r", 5.0) and store.heartbeats()["node-r"] == 5.0  # never heard
    assert store.heartbeat_unless_offline("node-r", 6.0) and store.heartbeats()["node-r"] == 6.0
    store.heartbeat("node-r", 0.0)  # marked OFFLINE: its next poll persists ONLINE, so the mark stays
    assert not store.heartbeat_unless_offline("node-r", 7.0) and store.heartbeats()["node-r"] == 0.0


def test_a_polls_reads_are_awaited_where_there_is_no_snapshot(store: Store) -> None:
    """poll_reads(): what an event loop awaits for a poll where snapshot() has none. Redis: heartbeat_if_seen and
    the node's runs in the given states, over a client of the loop's own. SQLite: none (its snapshot is read)."""
    async def body() -> None:
        got = await store.poll_reads("node-a", 5.0, RunStatus)
        if isinstance(store, SQLiteStore):
            assert got is None
            return
        assert got == (None, []) and "node-a" not in store.heartbeats()  # never heard from: nothing recorded
        mine = start_on(store, store.create_run(mk_run(1)), "node-a", [0])
        start_on(store, store.create_run(mk_run(2)), "node-b", [0])
        store.heartbeat("node-a", 4.0)
        got = await store.poll_reads("node-a", 5.0, [RunStatus.STARTING, RunStatus.RUNNING])
        assert got is not None and got[0] == 4.0 and [r.id for r in got[1]] == [mine.id]
        assert [r.model_dump() for r in got[1]] == [mine.model_dump()] and store.heartbeats()["node-a"] == 5.0
        got = await store.poll_reads("node-a", 6.0, [RunStatus.RUNNING])
        assert got is not None and got == (5.0, [])
        store.heartbeat("node-a", 0.0)  # marked OFFLINE
        got = await store.poll_reads("node-a", 7.0, RunStatus)
        assert got is not None and not got[0] and store.heartbeats()["node-a"] == 0.0

    asyncio.run(body())


def test_a_heartbeat_and_the_nodes_runs_in_one_call(store: Store) -> None:
    """What a poll reads: its heartbeat recorded and the node's runs in the given states (one round trip on
    Redis; it was a hidden prefetch that the next list_runs call happened to use)."""
    mine = store.create_run(mk_run(1))
    start_on(store, mine, "node-a", [0])
    other = store.create_run(mk_run(2))
    start_on(store, other, "node-b", [0])
    ended = store.create_run(mk_run(3))
    start_on(store, ended, "node-a", [1])
    store.transition(ended.id, RunStatus.KILLED)
    before, runs = store.heartbeat_and_runs("node-a", 5.0, [RunStatus.STARTING, RunStatus.RUNNING])
    assert before is None and [r.id for r in runs] == [mine.id]
    before, runs = store.heartbeat_and_runs("node-a", 6.0, [RunStatus.RUNNING])
    assert before == 5.0 and runs == []


def test_a_lock_is_held_by_one_holder_at_a_time(pair: tuple[Store, Store]) -> None:
    a, b = pair
    inside = [0]
    most = [0]
    count = [0]

    def work(s: Store) -> None:
        for _ in range(20):
            with s.lock("contract", ttl=10):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                with s.lock("contract", ttl=10):  # re-entrant in the same thread
                    count[0] += 1
                time.sleep(0.001)
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=((a, b)[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and count[0] == 80


@pytest.mark.parametrize("flush", [False, True])
def test_a_pass_lock_reads_the_feed_as_it_is_taken_and_goes_with_the_last_send(pair: tuple[Store, Store],
                                                                                flush: bool) -> None:
    """Store.pass_lock: the "schedule" lock, held against every other holder for the pass. Where the store reads
    the change feed with it, the answer is runs_changed_since's; where it lets the lock go with the pass's last
    send, the placements are written and the lock is free at once (also after the server lost its scripts)."""
    a, b = pair
    seq = a.runs_seq()
    runs = [a.create_run(mk_run(i)) for i in range(3)]
    known = {runs[0].id: runs[0]._version}  # (applied already: left out)
    shared = not isinstance(a, SQLiteStore)
    taken: list[str] = []

    def other_holder() -> None:
        with b.lock("schedule", ttl=30.0):
            taken.append("b")

    with a.pass_lock(30.0, (seq, lambda: known)) as held:  # (a TTL longer than the waits below)
        fed = held.feed
        assert held.taken and held.sent == {}
        if shared:
            assert fed is not None
            assert fed[0] == runs[-1]._version and sorted(r.id for r in fed[1]) == sorted(r.id for r in runs[1:])
            assert fed == a.runs_changed_since(seq, known=known)
        else:
            assert fed is None  # (read by the pass: no round trip to save)
        t = threading.Thread(target=other_holder)
        t.start()
        sends = a.sends()
        sends.transition(runs[1].id, RunStatus.STARTING, placements=[Placement(rank=0, node_id="node-a", gpus=[0])])
        time.sleep(0.05)
        assert taken == []  # held
        if flush:
            a.r.script_flush() if shared else None  # type: ignore[attr-defined]
        assert sends.send(last=True) == {}
        if shared:  # let go with the send: the other holder gets it before this pass's end
            t.join(timeout=3)
            assert taken == ["b"]
    t.join(timeout=10)
    assert taken == ["b"]
    placed = b.get_run(runs[1].id)
    assert placed is not None and placed.status == RunStatus.STARTING and placed.gpus == [0]
    with b.lock("schedule", ttl=5.0):  # (free)
        pass


def held_elsewhere(store: Store) -> tuple[threading.Thread, threading.Event]:
    """The "schedule" lock taken by another thread through `store`, held until the event returned is set."""
    inside, out = threading.Event(), threading.Event()

    def other_holder() -> None:
        with store.lock("schedule", ttl=5.0):
            inside.set()
            out.wait(5)

    t = threading.Thread(target=other_holder)
    t.start()
    assert inside.wait(5)
    return t, out


def test_a_pass_lock_held_elsewhere_is_waited_for(pair: tuple[Store, Store]) -> None:
    a, b = pair
    t, out = held_elsewhere(b)
    threading.Timer(0.2, out.set).start()
    t0 = time.monotonic()
    with a.pass_lock(5.0, (a.runs_seq(), dict)) as held:
        assert out.is_set() and held.taken and held.feed is None and time.monotonic() - t0 >= 0.15
        sends = a.sends()
        assert sends.send(last=True) == {}  # (nothing to send: the lock goes at the end)
    t.join()
    with b.lock("schedule", ttl=0.5):
        pass


def test_a_pass_lock_sends_first_and_need_not_wait(pair: tuple[Store, Store]) -> None:
    """pass_lock(sends=...): the changes are written whether the lock is free or not, before the feed is read
    (it lists them); with wait=False a lock held elsewhere is not waited for. A change judged on a copy another
    writer made stale is not made again: Stale, nothing written."""
    a, b = pair
    seq = a.runs_seq()
    runs = [a.create_run(mk_run(i)) for i in range(2)]
    for r in runs:
        assert a.get_run(r.id) is not None  # (a remembers these copies)
    b.update_run(runs[1].id, reason="another writer")  # (a's copy of the second is stale now)
    shared = not isinstance(a, SQLiteStore)
    sends = a.sends()
    before, new = sends.modify(runs[0].id, lambda r: r.changed(reason="first"))
    assert before.reason is None and new.reason == "first"
    _, second = sends.modify(runs[1].id, lambda r: r.changed(reason=f"{r.reason} then second"))
    t, out = held_elsewhere(b)
    try:
        with a.pass_lock(5.0, (seq, dict), sends=sends, wait=False) as held:
            assert not held.taken and held.feed is None
            if shared:  # judged on the stale copy: refused, not redone
                assert set(held.sent) == {runs[1].id} and isinstance(held.sent[runs[1].id], Stale)
                assert second.reason == "None then second"
            else:  # (written at once, in its transaction: on the run as stored)
                assert held.sent == {} and second.reason == "another writer then second"
    finally:
        out.set()
        t.join()
    assert (got := b.get_run(runs[0].id)) is not None and got.reason == "first"
    assert (got := b.get_run(runs[1].id)) is not None and got.reason == ("another writer" if shared else second.reason)
    sends = a.sends()
    _, third = sends.modify(runs[0].id, lambda r: r.changed(RunStatus.STARTING, placements=[
        Placement(rank=0, node_id="node-a", gpus=[0])]))
    with a.pass_lock(5.0, (a.runs_seq() - 1, dict), sends=sends, wait=False) as held:
        assert held.taken and held.sent == {}
        if shared:  # the feed read after the write: it lists it
            assert held.feed is not None and [r.id for r in held.feed[1]] == [runs[0].id]
            assert held.feed[1][0].status == RunStatus.STARTING
    with b.lock("schedule", ttl=0.5):  # (let go)
        pass


def test_wake_ups_reach_the_other_replica() -> None:
    from scheduler.redis_store import RedisStore

    url = redis_url()
    a, b = RedisStore(url), RedisStore(url)
    try:
        na, nb = a.notifier(), b.notifier()
        time.sleep(0.2)  # both subscribed
        before = nb.ticket("run:x")
        na.notify("run:x")
        deadline = time.monotonic() + 5
        while nb.ticket("run:x") == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nb.ticket("run:x") == before + 1
        assert na.ticket("run:x") == 1  # woken once locally, not again by its own relay
        time.sleep(0.2)
        assert na.ticket("run:x") == 1
    finally:
        a.wipe()
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_log_retention_keeps_the_newest_lines(kind: str, tmp_path: Path) -> None:
    if kind == "sqlite":
        s: Store = SQLiteStore(tmp_path / "retention.db", log_retention=100)
    else:
        from scheduler.redis_store import RedisStore

        s = RedisStore(redis_url(), log_retention=100)
    try:
        run = s.create_run(mk_run())
        for i in range(10):
            s.append_logs(run.id, 1, 0, i * 100, [(0.0, "stdout", f"line{i * 100 + j}") for j in range(100)])
        rows = s.read_logs(run.id, limit=100_000)
        assert 100 <= len(rows) < 1000  # trimmed (Redis approximately, in whole stream nodes), never the newest
        assert rows[-1].line == "line999" and rows[-1].pos == 999
        assert [r.pos for r in rows] == list(range(1000 - len(rows), 1000))
        got = s.get_run(run.id)
        assert got is not None and got.log_count == 1000
        assert s.next_seq(run.id, 1, 0) == 1000
        assert s.tail_after(run.id, 10) == 989
    finally:
        if kind == "redis":
            s.wipe()  # type: ignore[attr-defined]
        s.close()


# ---- two scheduler replicas placing one queue --------------------------------------------------------------

def _replicas(n: int) -> tuple[list[Scheduler], Callable[[], None]]:
    from scheduler.redis_store import RedisStore

    url = redis_url()
    stores = [RedisStore(url) for _ in range(n)]
    scheds = [Scheduler(s, s.notifier(), heartbeat_interval=10.0, rng=random.Random(i)) for i, s in enumerate(stores)]

    def close() -> None:
        stores[0].wipe()
        for s in stores:
            s.close()
    return scheds, close


def eight_nodes(store: Store, now: float) -> None:
    """8 nodes of 4 GPUs, seen now (32 GPUs for the replicas' races)."""
    for i in range(8):
        store.upsert_node(node(i, gpus=4).model_copy(update={"last_seen": now}))


def test_two_replicas_placing_at_once_never_double_place(monkeypatch: pytest.MonkeyPatch) -> None:
    scheds, close = _replicas(2)
    try:
        store = scheds[0].store
        now = time.time()
        eight_nodes(store, now)
        for i in range(60):  # 60 one-GPU runs for 32 GPUs
            store.create_run(mk_run(i, created=now + i * 1e-3))
        # No pass lock: both replicas place the same queue at the same moment, from the same stale view;
        # only the store's compare-and-set and GPU claims keep them apart.
        for s in scheds:
            monkeypatch.setattr(s.store, "lock", _no_lock)
        gate = threading.Barrier(2)
        placed = [0, 0]

        def go(i: int) -> None:
            gate.wait()
            placed[i] = scheds[i].schedule_pass()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for _ in range(3):  # passes after a conflict pick up what the other replica left
            placed[0] += scheds[0].schedule_pass()
        starting = store.list_runs(status=[RunStatus.STARTING], limit=1000)
        held = [(r.placements[0].node_id, g) for r in starting for g in r.placements[0].gpus]
        assert len(held) == len(set(held)) == 32, sorted(held)
        assert sum(placed) == 32 and len(starting) == 32
        assert len(store.list_runs(status=[RunStatus.QUEUED], limit=1000)) == 28
    finally:
        close()


def test_ranks_reporting_at_once_on_two_replicas_lose_no_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports take no run lock (Store.modify): the two ranks of a gang end at the same moment, each reported to
    another replica, the second written between the first's decision and its write. Neither rank's report is
    lost: the run ends FINISHED with both ranks finished and its GPUs free."""
    from scheduler import redis_store

    scheds, close = _replicas(2)
    try:
        a, b = scheds[0].store, scheds[1].store
        now = time.time()
        for i in range(2):
            a.upsert_node(node(i, gpus=1).model_copy(update={"last_seen": now}))
        job = {"job": "echo hi", "num_nodes": 2, "computing": {"minimum_num_gpus": 1}}
        run = a.create_run(Run(id="run-gang", name="gang", job=job, owner="alice", created_at=now))
        assert scheds[0].schedule_pass() == 1
        placed = b.get_run(run.id)
        assert placed is not None and len(placed.placements) == 2
        for p in placed.placements:
            for s in scheds:  # (both replicas now remember the run as RUNNING on both ranks)
                s.report(run.id, StatusReport(status=RunStatus.RUNNING, attempt=1), p.node_id)
        rank0, rank1 = (p.node_id for p in placed.placements)
        real_changed = redis_store.RedisStore._changed
        cut_in: list[str] = []

        def changed(self: redis_store.RedisStore, *args: Any, **kw: Any) -> Any:
            got = real_changed(self, *args, **kw)
            if self is a and not cut_in:  # the other rank's report lands between this one's decision and write
                cut_in.append(rank1)
                scheds[1].report(run.id, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=1), rank1)
            return got

        monkeypatch.setattr(redis_store.RedisStore, "_changed", changed)
        done = scheds[0].report(run.id, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=1), rank0)
        assert cut_in == [rank1]
        assert done.status == RunStatus.FINISHED, done
        stored = b.get_run(run.id)
        assert stored is not None and stored.status == RunStatus.FINISHED
        assert [p.status for p in stored.placements] == [RunStatus.FINISHED, RunStatus.FINISHED]
        assert stored.gpu_claims() == set()
    finally:
        close()


def test_a_pass_reads_the_documents_it_does_not_remember_many_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued runs whose documents the placing replica does not remember (written by another replica, or
    forgotten: more than DOCS_SEEN, a restart) are read QUEUED_AHEAD at a time in queue order, not one round
    trip per placement."""
    from scheduler.redis_store import RedisStore

    scheds, close = _replicas(2)
    try:
        a, b = scheds[0].store, scheds[1].store
        assert isinstance(a, RedisStore)
        now = time.time()
        runs = [b.create_run(mk_run(i, created=now + i * 1e-3)) for i in range(300)]
        trips: list[int] = []
        real_send = a._send_puts  # (each round trip of PUT_RUN calls: sent at once, or left in flight)
        monkeypatch.setattr(a, "_send_puts", lambda calls, *x: (calls and trips.append(len(calls))) or real_send(calls, *x))
        # No node yet: the book is built (every document remembered), and the reason written into all 300
        # runs, 256 to a round trip.
        assert scheds[0].schedule_pass() == 0
        assert trips == [256, 44]
        reasons = {r.reason for r in b.list_runs(status=[RunStatus.QUEUED], limit=1000)}
        assert len(reasons) == 1 and next(iter(reasons)).startswith("no nodes have joined yet"), reasons
        for i in range(38):  # 304 GPUs
            a.upsert_node(node(i, gpus=8).model_copy(update={"last_seen": now}))
        scheds[0]._nodes_changed()
        a._docs_seen.clear()  # forgotten
        reads: list[str] = []
        real_get, real_ahead = a.r.get, a._queued_docs
        monkeypatch.setattr(a.r, "get", lambda key: reads.append(str(key)) or real_get(key))
        monkeypatch.setattr(a, "_queued_docs", lambda **kw: reads.append("ahead") or real_ahead(**kw))
        assert scheds[0].schedule_pass() == 300
        assert [r for r in reads if "run:" in r] == [] and reads.count("ahead") <= 3, reads
        placed = b.list_runs(status=[RunStatus.STARTING], limit=1000)
        assert sorted(r.id for r in placed) == sorted(r.id for r in runs)
    finally:
        close()



def test_a_pass_goes_on_while_its_last_commit_is_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis: a pass's commit of 256 placements is left in flight (Sends.send's overlap) while the pass makes the
    next; each is counted and announced once its answer is in, none before. A pass that fails with a commit in
    flight lands it (no connection goes back to the pool with answers unread on it); the book is read again and
    the next pass places the rest: every run placed once, no GPU twice."""
    from scheduler import redis_store
    from scheduler.service import placing

    scheds, close = _replicas(1)
    try:
        sched, a = scheds[0], scheds[0].store
        assert isinstance(a, redis_store.RedisStore)
        now = time.time()
        for i in range(40):  # 320 GPUs
            a.upsert_node(node(i, gpus=8).model_copy(update={"last_seen": now}))
        runs = [a.create_run(mk_run(i, created=now + i * 1e-3)) for i in range(300)]
        sched.kick()
        announced: list[str] = []
        sending: list[redis_store._Sends] = []
        real_changed = sched.run_changed

        def changed(run: Run) -> None:
            assert not sending or run.id not in sending[0].in_flight()  # (nothing told before its answer is in)
            announced.append(run.id)
            real_changed(run)
        monkeypatch.setattr(sched, "run_changed", changed)
        flown: list[int] = []
        real_send = redis_store._Sends.send

        def send(self: redis_store._Sends, last: bool = False, **kw: Any) -> dict[str, Run | Exception]:
            sending[:] = [self]
            got = real_send(self, last, **kw)
            flown.append(len(self.in_flight()))
            return got
        monkeypatch.setattr(redis_store._Sends, "send", send)
        real_place, calls = placing.place, [0]

        def place(*x: Any, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == 280:  # (the first 256 sent, in flight)
                raise RuntimeError("the pass fails")
            return real_place(*x, **kw)
        monkeypatch.setattr(placing, "place", place)
        busy = len(a.r.connection_pool._in_use_connections)  # (the relay's subscription holds one)
        with pytest.raises(RuntimeError, match="the pass fails"):
            sched.schedule_pass()
        assert flown == [256]
        assert len(a.r.connection_pool._in_use_connections) == busy  # (the one in flight landed and went back)
        assert a.r.ping() and a.get_run(runs[0].id) is not None  # (the connections answer what they are asked)
        landed = a.list_runs(status=[RunStatus.STARTING], limit=1000)
        assert len(landed) == 256 and not set(announced) & {r.id for r in landed}
        monkeypatch.setattr(placing, "place", real_place)
        flown.clear()
        sched.kick()
        assert sched.schedule_pass() == 300 - 256
        placed = a.list_runs(status=[RunStatus.STARTING], limit=1000)
        assert sorted(r.id for r in placed) == sorted(r.id for r in runs)
        held = [(r.placements[0].node_id, g) for r in placed for g in r.placements[0].gpus]
        assert len(held) == len(set(held)) == 300
        a._docs_seen.clear()  # (a pass of 300 at once: two commits, the first in flight while the second is made)
        for r in placed:
            a.transition(r.id, RunStatus.KILLED)
        more = [a.create_run(mk_run(1000 + i, created=now + 1 + i * 1e-3)) for i in range(300)]
        sched.kick()
        announced.clear()
        assert sched.schedule_pass() == 300 and flown[-2:] == [256, 0]
        assert set(announced) >= {r.id for r in more}
    finally:
        close()

def test_a_placement_refused_when_sent_goes_back_to_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass's placements are written together when it commits (Redis: one pipeline). One that another
    replica's write beat meanwhile (its GPU taken) is not counted nor announced, its run is queued again in the
    book (not held as placed), and a later pass places it."""
    from scheduler import redis_store

    scheds, close = _replicas(2)
    try:
        a, b = scheds[0].store, scheds[1].store
        a.upsert_node(node(0, gpus=2).model_copy(update={"last_seen": time.time()}))
        first = a.create_run(mk_run(1))
        a.create_run(mk_run(2))
        intruder = b.create_run(mk_run(9))
        real = redis_store._Sends.send
        taken: list[int] = []

        def send(self: redis_store._Sends, last: bool = False, **kw: Any) -> dict[str, Run | Exception]:
            if self.pending and not taken:  # the other replica places a run on the first run's GPU, first
                gpu = next(new for _, _, new, *_ in self.pending if new.id == first.id).placements[0].gpus[0]
                b.transition(intruder.id, RunStatus.STARTING, placements=[Placement(rank=0, node_id="node-0",
                                                                                    gpus=[gpu])])
                taken.append(gpu)
            return real(self, last, **kw)

        monkeypatch.setattr(redis_store._Sends, "send", send)
        announced: list[str] = []
        real_changed = scheds[0].run_changed
        monkeypatch.setattr(scheds[0], "run_changed", lambda run: (announced.append(run.id), real_changed(run)))
        assert scheds[0].schedule_pass() == 1  # the second run; the first's GPU was taken
        back = a.get_run(first.id)
        assert back is not None and back.status == RunStatus.QUEUED and back.placements == []
        assert first.id not in announced
        assert scheds[0].schedule_pass() == 0  # the node is full: the first run waits
        b.transition(intruder.id, RunStatus.RUNNING)
        b.transition(intruder.id, RunStatus.FINISHED)
        scheds[0].kick()
        assert scheds[0].schedule_pass() == 1
        placed = a.get_run(first.id)
        assert placed is not None and placed.status == RunStatus.STARTING and placed.gpus == taken
        assert first.id in announced
    finally:
        close()


def test_a_run_placed_in_a_pass_is_written_before_the_pass_stops_it(store: Store) -> None:
    """_Commits.placed_first: a pass that is to preempt a run it placed itself commits first (a store that sends
    a pass's placements at its commits holds the run as still queued until then, and refuses the stop)."""
    from scheduler.service.placing import _Commits

    run = store.create_run(mk_run(1))
    announced: list[str] = []
    with _Commits(store, lambda runs: (announced.extend(r.id for r in runs), runs.clear())) as commits:
        new = commits.sends.transition(run.id, RunStatus.STARTING,
                                       placements=[Placement(rank=0, node_id="node-a", gpus=[0])])
        commits.wrote(new)
        held = store.get_run(run.id)
        assert held is not None and held.status == RunStatus.QUEUED  # (sent at the commit)
        commits.placed_first(["run-other"])
        assert announced == []
        commits.placed_first([run.id])
        assert announced == [run.id]
        stopped = store.transition(run.id, RunStatus.PREEMPTED, stop_requested=True)
        assert stopped.status == RunStatus.PREEMPTED and stopped.gpus == [0]


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def _no_lock(name: str, ttl: float = 30.0) -> _NoLock:
    return _NoLock()


def test_replicas_share_heartbeats_so_neither_marks_a_live_node_offline() -> None:
    scheds, close = _replicas(2)
    try:
        a, b = scheds
        a.heartbeat_timeout = b.heartbeat_timeout = 0.5
        a._started = b._started = 0.0
        a.store.upsert_node(node(1).model_copy(update={"last_seen": time.time()}))
        run = a.store.create_run(mk_run(1))
        a.schedule_pass()
        for _ in range(8):  # the node talks only to replica A; replica B checks heartbeats
            a.poll_once("node-1", [])
            time.sleep(0.1)
            assert b.check_heartbeats() == []
        got = b.store.get_run(run.id)
        assert got is not None and got.status == RunStatus.STARTING
        time.sleep(0.7)  # silent for longer than the timeout
        assert [n.id for n in b.check_heartbeats()] == ["node-1"]
        assert a.check_heartbeats() == []  # already handled by B
        got = a.store.get_run(run.id)
        assert got is not None and got.status == RunStatus.FAILED and "offline" in (got.reason or "")
        a.poll_once("node-1", [])  # back: ONLINE again, written once
        n1 = b.store.get_node("node-1")
        assert n1 is not None and n1.state == "ONLINE"
    finally:
        close()


def test_compacted_nodes_behave_as_parsed_ones() -> None:
    """compact_nodes shares one fields-set object among parsed nodes (and among their GPUs): what they dump,
    copy and assign stays exactly as without it; a node built with only some fields keeps its own set."""
    from scheduler.store import compact_nodes

    raws = [node(i, gpus=3).model_dump_json() for i in range(3)]
    plain = [Node.model_validate_json(r) for r in raws]
    nodes = compact_nodes([Node.model_validate_json(r) for r in raws])
    assert nodes[0].model_fields_set is nodes[1].model_fields_set
    assert nodes[0].gpus[0].model_fields_set is nodes[2].gpus[1].model_fields_set
    for a, b in zip(plain, nodes, strict=True):
        assert a.model_dump(exclude_unset=True) == b.model_dump(exclude_unset=True)
        assert a.model_dump_json() == b.model_dump_json()
    nodes[0].draining = True
    nodes[0].gpus[0].memory_mb = 1
    assert not nodes[1].draining and nodes[1].gpus[0].memory_mb != 1
    assert nodes[1].model_dump(exclude_unset=True) == plain[1].model_dump(exclude_unset=True)
    copy = nodes[2].model_copy(update={"state": "OFFLINE"})
    assert copy.state == "OFFLINE" and nodes[2].state == "ONLINE"
    partial = Node(id="node-p", name="p")
    compact_nodes([partial])
    assert partial.model_fields_set == {"id", "name"} and partial.model_dump(exclude_unset=True) == {"id": "node-p",
                                                                                                      "name": "p"}


def test_each_run_reads_every_run_of_the_statuses_a_page_at_a_time(store: Store) -> None:
    runs = [store.create_run(mk_run(i)) for i in range(7)]
    start_on(store, runs[0], "node-a", [0])
    start_on(store, runs[1], "node-a", [1])
    store.transition(runs[1].id, RunStatus.RUNNING)
    store.transition(runs[2].id, RunStatus.KILLED)
    got = list(store.each_run([RunStatus.QUEUED, RunStatus.RUNNING], page=2))
    assert sorted(r.id for r in got) == sorted([runs[1].id, *(r.id for r in runs[3:])])
    assert {r.id: r.status for r in got}[runs[1].id] == RunStatus.RUNNING
    assert [r.id for r in store.each_run([RunStatus.STARTING], page=1)] == [runs[0].id]


def test_gpu_series_blocks_are_appended_to_read_in_order_and_dropped_after_their_keep(
        pair: tuple[Store, Store]) -> None:
    from scheduler.contract import series as S

    a, b = pair
    now = time.time()
    block = S.block_of(S.FINE, now)
    p1, p2, p3 = (S.pack([(now + i, float(i), 1.0, None, None)]) for i in range(3))
    a.append_series([("gpu:n:0", S.FINE.id, block, p1), ("gpu:n:1", S.FINE.id, block, p3)], now)
    b.append_series([("gpu:n:0", S.FINE.id, block, p2)], now)  # (another replica's flush: appended after)
    a.append_series([("gpu:n:0", S.FINE.id, block - 1, p3)], now)  # an earlier block: read first
    assert b.read_series("gpu:n:0", S.FINE.id, range(block - 1, block + 1)) == p3 + p1 + p2
    assert a.read_series("gpu:n:0", S.FINE.id, range(block, block + 1)) == p1 + p2
    assert a.read_series("gpu:n:0", S.COARSE.id, range(0, 10)) == b""
    assert a.read_series("gpu:n:0", S.FINE.id, range(block, block)) == b""
    old = S.expired_before(S.FINE, now) - 1  # a block past its keep: dropped when the next flush comes (SQLite),
    a.append_series([("gpu:n:2", S.FINE.id, old, p1)], now)  # or expired at once (Redis)
    a.append_series([], now)
    assert b.read_series("gpu:n:2", S.FINE.id, range(old, old + 1)) == b""
    assert b.read_series("gpu:n:1", S.FINE.id, range(block, block + 1)) == p3


def test_teams_are_made_once_listed_by_name_changed_and_removed(pair: tuple[Store, Store]) -> None:
    a, b = pair
    a.put_team(Team(name="vision", shares=2), new=True)
    b.put_team(Team(name="nlp"), new=True)
    with pytest.raises(AlreadyExists):
        b.put_team(Team(name="vision"), new=True)  # (another replica making the same team)
    assert [t.name for t in b.list_teams()] == ["nlp", "vision"]
    assert b.get_team("vision").shares == 2  # type: ignore[union-attr]
    a.put_team(Team(name="vision", shares=5))  # a change
    assert b.get_team("vision").shares == 5  # type: ignore[union-attr]
    b.delete_team("vision")
    assert a.get_team("vision") is None and [t.name for t in a.list_teams()] == ["nlp"]
    with pytest.raises(NotFound):
        a.delete_team("vision")


def test_a_placement_past_its_teams_quota_is_refused_and_ended_runs_give_theirs_back(pair: tuple[Store, Store]) -> None:
    """Store.transition's quota_limit: the GPUs the unfinished runs of one quota key hold are counted by the
    store in the same step as the write (also across replicas), so no placement takes a team past it."""
    from scheduler.store import QuotaFull

    a, b = pair
    key = "ml\tany"
    runs = [f"run-q{i}" for i in range(4)]
    for i, rid in enumerate(runs):
        a.create_run(Run(id=rid, name="q", job={"job": "x"}, created_at=float(i)))

    def place(store: Store, rid: str, gpus: list[int], limit: int = 3) -> Run:
        return store.transition(rid, RunStatus.STARTING, quota_limit=limit, quota_key=key,
                                placements=[Placement(rank=0, node_id="n1", gpus=gpus)])

    place(a, runs[0], [0, 1])
    place(b, runs[1], [2])  # (another replica: 3 of 3)
    with pytest.raises(QuotaFull) as full:
        place(a, runs[2], [3])
    assert (full.value.key, full.value.held, full.value.limit) == (key, 3, 3)
    assert b.get_run(runs[2]).status == RunStatus.QUEUED  # type: ignore[union-attr]  # nothing written
    place(a, runs[2], [3], limit=4)  # a larger quota: room
    a.transition(runs[0], RunStatus.RUNNING)  # (the same GPUs: the count does not move)
    with pytest.raises(QuotaFull):
        place(b, runs[3], [4], limit=4)
    b.transition(runs[0], RunStatus.FINISHED)  # ended: its 2 GPUs are the team's again
    place(a, runs[3], [4, 5], limit=4)
    with pytest.raises(QuotaFull):
        b.transition(runs[3], RunStatus.RUNNING, quota_limit=3)  # (4 held, the limit now 3: refused)
    b.transition(runs[3], RunStatus.RUNNING)  # (no limit given: not checked)
    # A pass's placements sent together (Store.sends, in its transaction on SQLite): each fits alone (4 held of
    # 5), the second not after the first; it is refused at the latest by send(), nothing of it written.
    more = [a.create_run(Run(id=f"run-q{i}", name="q", job={"job": "x"}, created_at=float(i))).id for i in (4, 5)]
    with contextlib.ExitStack() as tx:
        if isinstance(a, SQLiteStore):
            tx.enter_context(a.batch())
        sends, refused = a.sends(), {}
        for rid, gpu in zip(more, (6, 7), strict=True):
            try:
                sends.transition(rid, RunStatus.STARTING, quota_limit=5, quota_key=key,
                                 placements=[Placement(rank=0, node_id="n1", gpus=[gpu])])
            except QuotaFull as exc:
                refused[rid] = exc
        refused.update(sends.send())
    assert list(refused) == [more[1]] and isinstance(refused[more[1]], QuotaFull)
    assert [b.get_run(rid).status for rid in more] == [RunStatus.STARTING, RunStatus.QUEUED]  # type: ignore[union-attr]


def test_a_preempted_run_holds_its_gpus_and_quota_until_it_is_requeued(pair: tuple[Store, Store]) -> None:
    """PREEMPTED (docs/teams.md): the run still holds its GPUs and its quota while its ranks stop; QUEUED again
    (its next attempt) it holds neither, and another run may take them."""
    from scheduler.contract.models import Preemption
    from scheduler.store import QuotaFull

    a, b = pair
    key = "ml\tany"
    victim, other = "run-p0", "run-p1"
    for i, rid in enumerate((victim, other)):
        a.create_run(Run(id=rid, name="p", job={"job": "x"}, created_at=float(i)))
    a.transition(victim, RunStatus.STARTING, quota_limit=1, quota_key=key,
                 placements=[Placement(rank=0, node_id="n1", gpus=[0])])
    a.transition(victim, RunStatus.RUNNING)
    got = b.transition(victim, RunStatus.PREEMPTED, stop_requested=True,
                       preempted=Preemption(by=other, owner="bob", why="priority 1 over 0 in team ml"))
    assert got.preempted is not None and got.preempted.by == other and got.gpu_claims() == {("n1", 0)}
    with pytest.raises(GpuBusy):
        a.transition(other, RunStatus.STARTING, placements=[Placement(rank=0, node_id="n1", gpus=[0])])
    with pytest.raises(QuotaFull):
        a.transition(other, RunStatus.STARTING, quota_limit=1, quota_key=key,
                     placements=[Placement(rank=0, node_id="n1", gpus=[1])])
    with pytest.raises(InvalidTransition):
        b.transition(victim, RunStatus.RUNNING)  # (preempted: only stopping is left to it)
    b.transition(victim, RunStatus.QUEUED, attempt=2, placements=[], preempted=None, stop_requested=False)
    placed = a.transition(other, RunStatus.STARTING, quota_limit=1, quota_key=key,
                          placements=[Placement(rank=0, node_id="n1", gpus=[0])])
    assert placed.gpu_claims() == {("n1", 0)}
    assert [r.id for r in b.list_runs(status=[RunStatus.PREEMPTED], limit=10)] == []


def test_two_replicas_racing_never_take_a_team_past_its_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: with no pass lock, two replicas placing two teams' queues at once from the same stale view keep
    each team within its quota (the store counts and refuses), and every GPU is held once."""
    scheds, close = _replicas(2)
    try:
        store = scheds[0].store
        now = time.time()
        eight_nodes(store, now)
        store.put_team(Team(name="red", quotas={"any": 5}), new=True)
        store.put_team(Team(name="blue", quotas={"any": 7}), new=True)
        for i in range(60):  # 30 one-GPU runs per team, 32 GPUs: the quotas bind
            team = "red" if i % 2 else "blue"
            store.create_run(mk_run(i, created=now + i * 1e-3).model_copy(update={"team": team}))
        for s in scheds:
            monkeypatch.setattr(s.store, "lock", _no_lock)
        gate = threading.Barrier(2)

        def go(i: int) -> None:
            gate.wait()
            for _ in range(3):
                scheds[i].schedule_pass()
                scheds[i].kick()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        starting = store.list_runs(status=[RunStatus.STARTING], limit=1000)
        by_team = {t: sum(len(r.placements[0].gpus) for r in starting if r.team == t) for t in ("red", "blue")}
        assert by_team == {"red": 5, "blue": 7}, by_team
        held = [(r.placements[0].node_id, g) for r in starting for g in r.placements[0].gpus]
        assert len(held) == len(set(held)) == 12
        waiting = store.list_runs(status=[RunStatus.QUEUED], limit=1000)
        assert len(waiting) == 48 and all("holds its quota" in (r.reason or "") for r in waiting), \
            {r.reason for r in waiting}
    finally:
        close()
