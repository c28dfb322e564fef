"""Preemption and fair share (issue 18), in process over the real Scheduler and stores.

1. Preemption latency: NODES nodes x 8 GPUs, every GPU busy with one-GPU runs of 50 teams, QUEUED more runs
   waiting behind them. A run of priority 100 is launched in one team: the time from its launch to its victim
   being PREEMPTED (the pass that chooses), and from the victim's stop report to the run placed (the report and
   the pass after it), summed: the latency without the victim's grace. ROUNDS launches, median and worst.

2. Fairness over a simulated day: 64 GPUs (8 nodes x 8) shared by 4 teams with shares 1, 1, 2, 4; 1,000 jobs
   (250 per team) of 1, 2 or 4 GPUs and 20 min to 4 h, on a clock the simulation moves (a day in seconds). One
   team sends all its jobs in the first hour, the others spread over the day. The fairness error: over the GPU-
   seconds used while every team had work waiting, max over teams of |its part - its share's part| / its share's
   part. Fair share against first come, first served (the same jobs, no teams), in the same run.

    .venv/bin/python bench/preemption.py [--nodes 1250] [--queued 10000] [--rounds 20] [--store sqlite,redis]
                                         [--jobs 1000] [--days 3]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler import auth  # noqa: E402
from scheduler.contract.models import (  # noqa: E402
    GpuInfo,
    Node,
    NodeInfo,
    Placement,
    Principal,
    Run,
    RunCreate,
    RunStatus,
    StatusReport,
    Team,
    TeamCreate,
)
from scheduler.notify import Notifier  # noqa: E402
from scheduler.service import Scheduler  # noqa: E402
from scheduler.sqlite_store import SQLiteStore  # noqa: E402
from scheduler.store import Store  # noqa: E402

REDIS = "redis://127.0.0.1:6379/7"
JOB = {"job": "x", "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G"}}


def open_store(kind: str, tmp: Path) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp / f"preempt-{secrets.token_hex(3)}.db")
    from scheduler.redis_store import RedisStore

    return RedisStore(f"{REDIS}?prefix=fedml-bench-{secrets.token_hex(4)}:")


# -- 1. latency ----------------------------------------------------------------------------------------------------
def latency(kind: str, tmp: Path, n_nodes: int, queued: int, rounds: int, teams: int = 50) -> dict[str, Any]:
    store = open_store(kind, tmp)
    try:
        return _latency(store, kind, n_nodes, queued, rounds, teams)
    finally:
        if kind == "redis":
            store.wipe()  # type: ignore[attr-defined]
        store.close()


def _latency(store: Store, kind: str, n_nodes: int, queued: int, rounds: int, teams: int) -> dict[str, Any]:
    sched = Scheduler(store, Notifier(), heartbeat_interval=1e6, rng=random.Random(1))
    now = time.time()
    names = [f"team{t:02d}" for t in range(teams)]
    for name in names:
        store.put_team(Team(name=name), new=True)
    with store.batch():
        for i in range(n_nodes):
            store.upsert_node(Node(id=f"node-{i:05d}", name=f"n{i}", last_seen=now + 1e6, gpus=[
                GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(8)]))
    # Every GPU busy: one run per GPU, written placed and RUNNING (as many passes would have left them)
    runs = []
    k = 0
    for i in range(n_nodes):
        for g in range(8):
            team = names[k % teams]
            runs.append(Run(id=f"run-a{k:06d}", name="busy", job=JOB, owner=f"{team}-user", team=team,
                            status=RunStatus.RUNNING, created_at=now - 3600 + k * 1e-4, started_at=now - 3000 + k * 1e-3,
                            placements=[Placement(rank=0, node_id=f"node-{i:05d}", gpus=[g],
                                                  status=RunStatus.RUNNING)]))
            k += 1
    with store.batch():
        for r in runs:
            store.create_run(r)
    with store.batch():
        for j in range(queued):
            team = names[j % teams]
            store.create_run(Run(id=f"run-q{j:06d}", name="waiting", job=JOB, owner=f"{team}-user", team=team,
                                 created_at=now + j * 1e-4))
    sched.kick()
    sched.schedule_pass()  # (the first pass: the book and candidates built, every queued run told why it waits)
    preempt, settle, total = [], [], []
    for r in range(rounds):
        team = names[(r * 7) % teams]
        who = Principal(scope="user", owner=f"{team}-boss", key_id="bench", team=team)
        t0 = time.perf_counter()
        urgent = sched.create_run(RunCreate(job={**JOB, "priority": 100}), who).id
        sched.schedule_pass()
        t1 = time.perf_counter()
        victims = [v for v in store.list_runs(status=[RunStatus.PREEMPTED], limit=100)
                   if v.preempted is not None and v.preempted.by == urgent]
        assert len(victims) == 1, f"round {r}: {len(victims)} victims"
        v = victims[0]
        t2 = time.perf_counter()
        for p in v.placements:
            sched.report(v.id, StatusReport(status=RunStatus.KILLED, attempt=v.attempt, reason="preempted"), p.node_id)
        got = sched.get_run(urgent)
        if got.status == RunStatus.QUEUED:  # (Redis: the pass runs after the report, not in its commit)
            sched.schedule_pass()
            got = sched.get_run(urgent)
        t3 = time.perf_counter()
        assert got.status == RunStatus.STARTING and got.placements[0].node_id == v.placements[0].node_id, got.reason
        preempt.append(t1 - t0)
        settle.append(t3 - t2)
        total.append(t1 - t0 + t3 - t2)
        # it runs; so does the queue behind it (the victim's requeued run waits among them)
        sched.report(urgent, StatusReport(status=RunStatus.RUNNING), got.placements[0].node_id)
    return {"store": kind, "nodes": n_nodes, "gpus": n_nodes * 8, "queued": queued, "teams": teams, "rounds": rounds,
            "launch_to_preempted_ms": _ms(preempt), "report_to_placed_ms": _ms(settle),
            "latency_without_grace_ms": _ms(total)}


def _ms(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs) * 1000, 1), "max": round(max(xs) * 1000, 1)}


# -- 2. fairness over a simulated day -------------------------------------------------------------------------------
class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def fairness(tmp: Path, jobs: int, fair: bool, seed: int = 7) -> dict[str, Any]:
    """One simulated day; returns each team's GPU-seconds while all waited, and the fairness error."""
    real_time = time.time
    clock = Clock(real_time())
    time.time = clock  # type: ignore[assignment]  # (the scheduler, stores and models read this clock)
    tmp.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(tmp / f"day-{'fair' if fair else 'fifo'}.db")
    try:
        return _day(store, clock, jobs, fair, seed)
    finally:
        store.close()
        time.time = real_time  # type: ignore[assignment]


SHARES = {"a": 1, "b": 1, "c": 2, "d": 4}


def _day(store: Store, clock: Clock, jobs: int, fair: bool, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sched = Scheduler(store, Notifier(), heartbeat_interval=1e9, rng=random.Random(seed))
    admin = auth.verify(store, auth.issue(store, name="root", scope="admin", owner="admin")[1])
    assert admin is not None
    for i in range(8):
        sched.register_node(NodeInfo(name=f"n{i}", job_user="fedml-job", gpus=[
            GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(8)]), admin)
    people: dict[str, Principal] = {}
    for t, shares in SHARES.items():
        if fair:
            sched.create_team(TeamCreate(name=t, shares=shares), admin)
        who = auth.verify(store, auth.issue(store, name=f"{t}-user", scope="user", owner=f"{t}-user",
                                            team=t if fair else None)[1])
        assert who is not None
        people[t] = who
    day = 86400.0
    start = clock.now
    arrivals: list[tuple[float, str, int, float]] = []
    per_team = jobs // len(SHARES)
    for t in SHARES:
        for _ in range(per_team):
            at = rng.uniform(0, 3600) if t == "a" else rng.uniform(0, day * 0.75)  # a: everything in the first hour
            arrivals.append((start + at, t, rng.choice((1, 1, 1, 2, 4)), rng.uniform(1200, 4 * 3600)))
    arrivals.sort()
    events: list[tuple[float, int, str, Any]] = []  # (time, kind, run id, node) kind 0: end
    team_of: dict[str, str] = {}
    duration: dict[str, float] = {}
    used_all_waiting = dict.fromkeys(SHARES, 0.0)
    running: dict[str, tuple[str, int]] = {}  # run -> (team, GPUs)
    waiting = dict.fromkeys(SHARES, 0)
    i = 0
    seq = 0
    while clock.now < start + day and (i < len(arrivals) or events):
        nxt = min(arrivals[i][0] if i < len(arrivals) else float("inf"), events[0][0] if events else float("inf"),
                  start + day)
        # GPU-seconds used since the last event, counted while every team had work waiting
        if all(waiting.values()):
            for team, gpus in running.values():
                used_all_waiting[team] += gpus * (nxt - clock.now)
        clock.now = nxt
        while events and events[0][0] <= clock.now:
            _, _, rid, node = heapq.heappop(events)
            sched.report(rid, StatusReport(status=RunStatus.FINISHED, exit_code=0), node)
            running.pop(rid, None)
        while i < len(arrivals) and arrivals[i][0] <= clock.now:
            _, t, gpus, dur = arrivals[i]
            i += 1
            r = sched.create_run(RunCreate(job={"job": "x", "computing": {"minimum_num_gpus": gpus}}), people[t])
            team_of[r.id], duration[r.id] = t, dur
            waiting[t] += 1
        sched.refresh_fair_usage()  # (a minute of the day passes between events at most: counted at each)
        while sched.schedule_pass():
            pass
        for r in store.list_runs(status=[RunStatus.STARTING], limit=10_000):
            sched.report(r.id, StatusReport(status=RunStatus.RUNNING), r.placements[0].node_id)
            t = team_of[r.id]
            waiting[t] -= 1
            running[r.id] = (t, sum(len(p.gpus) for p in r.placements))
            seq += 1
            heapq.heappush(events, (clock.now + duration[r.id], seq, r.id, r.placements[0].node_id))
    total = sum(used_all_waiting.values())
    part = {t: (used_all_waiting[t] / total if total else 0.0) for t in SHARES}
    due = {t: SHARES[t] / sum(SHARES.values()) for t in SHARES}
    error = max(abs(part[t] - due[t]) / due[t] for t in SHARES) if total else 0.0
    return {"order": "fair share" if fair else "first come, first served", "jobs": jobs,
            "gpu_hours_all_waiting": round(total / 3600, 1),
            "part": {t: round(p, 3) for t, p in part.items()}, "due": {t: round(d, 3) for t, d in due.items()},
            "fairness_error": round(error, 3)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=1250, help="nodes of 8 GPUs, all busy (default 1250: 10,000 GPUs)")
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--store", default="sqlite,redis")
    p.add_argument("--jobs", type=int, default=1000, help="jobs of the simulated day (0: skip it)")
    p.add_argument("--days", type=int, default=3, help="simulated days (each its own jobs)")
    args = p.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedml-bench-preempt-") as d:
        for kind in args.store.split(","):
            r = latency(kind, Path(d), args.nodes, args.queued, args.rounds)
            results.append(r)
            print(f"{kind:>6}: {r['gpus']:,} GPUs busy, {r['queued']:,} queued, {r['teams']} teams: a priority-100 launch "
                  f"to its victim PREEMPTED {r['launch_to_preempted_ms']['median']} ms (max "
                  f"{r['launch_to_preempted_ms']['max']}), the victim's stop report to the run placed "
                  f"{r['report_to_placed_ms']['median']} ms (max {r['report_to_placed_ms']['max']}): "
                  f"{r['latency_without_grace_ms']['median']} ms without the grace (max "
                  f"{r['latency_without_grace_ms']['max']})")
        for day in range(args.days if args.jobs else 0):
            for fair in (False, True):  # (the same jobs: the same seed)
                r = fairness(Path(d) / f"day{day}", args.jobs, fair, seed=7 + day)
                results.append(r)
                print(f"a simulated day (seed {7 + day}), {args.jobs} jobs, 64 GPUs, shares {SHARES}, {r['order']}: "
                      f"parts {r['part']} (due {r['due']}), fairness error {r['fairness_error']:.1%} over "
                      f"{r['gpu_hours_all_waiting']} GPU-hours used while every team waited")
    print(json.dumps({"bench": "preemption", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
