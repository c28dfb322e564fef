"""Scale: draining a queue behind a full cluster costs the same per freed slot whatever the queue's length
(issue 14). The real Scheduler over a real store (SQLite file; Redis too), in process.

N nodes x 1 GPU all busy, Q runs queued behind them; slots are freed one at a time (a rank's FINISHED report) and
each is followed by its pass. What is counted is what the scheduler reads from the store per freed slot (run
documents parsed from lists and the change feed): a design that re-reads the queue or the active runs per pass
reads Q + N per slot and fails here at once, however fast the machine. The time per slot is printed, and must
not grow with Q either (a loose bound: CI machines are noisy).
Size: FEDML_SCALE_NODES (2,000) and FEDML_SCALE_QUEUED (2,000).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scheduler.contract.models import GpuInfo, Node, Run, RunStatus, StatusReport
from scheduler.notify import Notifier
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore
from scheduler.store import Store

from .conftest import needs
from .test_store_contract import redis_up, redis_url

pytestmark = [pytest.mark.load, pytest.mark.timeout(600)]

NODES = int(os.environ.get("FEDML_SCALE_NODES", "2000"))
QUEUED = int(os.environ.get("FEDML_SCALE_QUEUED", "2000"))
DRAIN = 200
JOB = {"job": "echo hi", "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G"}}


def counting(store: Store) -> list[int]:
    """Count the run documents the store hands the scheduler (list_runs and the change feed)."""
    read = [0]
    lists: Callable[..., list[Run]] = store.list_runs
    feed: Callable[..., tuple[int, list[Run]]] = store.runs_changed_since

    def list_runs(**kw: Any) -> list[Run]:
        out = lists(**kw)
        read[0] += len(out)
        return out

    def changed(seq: int, limit: int = 100_000, **kw: Any) -> tuple[int, list[Run]]:
        got = feed(seq, limit, **kw)
        read[0] += len(got[1])
        return got
    store.list_runs = list_runs  # type: ignore[method-assign]
    store.runs_changed_since = changed  # type: ignore[method-assign]
    return read


def drain(store: Store, queued: int) -> tuple[float, float]:
    """(run documents read per freed slot, median ms per freed slot: report + pass)."""
    sched = Scheduler(store, Notifier(), heartbeat_interval=3600.0, rng=random.Random(1))
    now = time.time()
    with store.batch():
        for i in range(NODES):
            store.upsert_node(Node(id=f"node-{i:05d}", name=f"n{i}", last_seen=now,
                                   gpus=[GpuInfo(index=0, name="NVIDIA A100 80GB PCIe", memory_mb=81920)]))
            store.create_run(Run(id=f"run-a{i:06d}", name="busy", job=JOB, created_at=now + i * 1e-6))
    for i in range(NODES):
        store.heartbeat(f"node-{i:05d}", now)
    while sched.schedule_pass():
        pass
    with store.batch():
        for j in range(queued):
            store.create_run(Run(id=f"run-q{j:06d}", name="waiting", job=JOB, created_at=now + 1 + j * 1e-6))
    sched.kick()
    assert sched.schedule_pass() == 0  # full: the first blocked pass (it writes the queue's reason)
    active = store.list_runs(status=[RunStatus.STARTING], limit=NODES + 1)
    random.Random(3).shuffle(active)
    read = counting(store)
    times = []
    for r in active[:DRAIN]:
        before = sched.tally.snapshot()[0]["placements"]
        t = time.perf_counter()
        # (SQLite: the report places into the slot it frees, in its own commit; Redis: the pass after it)
        sched.report(r.id, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=r.attempt),
                     r.placements[0].node_id)
        sched.schedule_pass()
        times.append(time.perf_counter() - t)
        assert sched.tally.snapshot()[0]["placements"] - before == 1, "a freed slot did not place the next run"
    per_slot = read[0] / DRAIN
    left = store.list_runs(status=[RunStatus.QUEUED], limit=queued + 1)
    assert len(left) == queued - DRAIN
    # FIFO: what was placed is the head of the queue
    placed = {r.id for r in store.list_runs(status=[RunStatus.STARTING], limit=NODES + 1)}
    assert all(f"run-q{j:06d}" in placed for j in range(DRAIN))
    return per_slot, statistics.median(times) * 1e3


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_freed_slot_costs_the_same_whatever_the_queue(kind: str, tmp_path: Path) -> None:
    results = {}
    for queued in (DRAIN, QUEUED):
        if kind == "sqlite":
            store: Store = SQLiteStore(tmp_path / f"q{queued}.db")
        else:
            up, why = redis_up()
            needs("Redis", up, why)
            from scheduler.redis_store import RedisStore

            store = RedisStore(redis_url(), prefix=f"scale-{os.getpid()}-{queued}:")
        try:
            results[queued] = drain(store, queued)
        finally:
            if kind == "redis":
                store.wipe()  # type: ignore[attr-defined]
            store.close()
    (small_reads, small_ms), (big_reads, big_ms) = results[DRAIN], results[QUEUED]
    print(f"\n{kind}: {NODES} nodes busy; per freed slot: {small_reads:.1f} runs read, {small_ms:.2f} ms with "
          f"{DRAIN} queued; {big_reads:.1f} runs read, {big_ms:.2f} ms with {QUEUED} queued")
    # The scheduler's own writes are applied as written, not read back from the change feed: on SQLite the report
    # and the placement (one transaction), on Redis the placement (the report is written outside the pass and
    # read back: one document).
    assert big_reads <= 1, f"{big_reads:.1f} runs read per freed slot with {QUEUED} queued: the pass re-reads"
    assert big_reads <= small_reads + 1
    assert big_ms < max(4 * small_ms, small_ms + 20), "a freed slot costs more with a longer queue"
