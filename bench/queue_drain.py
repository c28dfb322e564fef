"""A busy cluster with a queue behind it, in process, over the real Scheduler and a real store (issue 14).

N nodes x 8 GPUs, all busy with N*8 one-GPU runs, Q more one-GPU runs queued. Measured:
- idle pass: one schedule_pass() when nothing can be placed;
- one submission: Scheduler.create_run (validation, the could-it-ever-run check, the committed write);
- one slot freed -> placed: a rank reports FINISHED, then the pass that places the next queued run (and that pass
  alone: the report's part is its durable commit);
- drain rate: K slots freed one at a time, each followed by its pass (placements per second).

With --compare REV the same measurement also runs against the code of git revision REV (a worktree), the two
interleaved in one run (A B A B), so the ratio is measured on the same machine at the same time.

    .venv/bin/python bench/queue_drain.py [--nodes 1000] [--queued 100,1000,10000] [--drain 50] [--compare REV]
                                          [--teams 0,50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUSY_JOB, REPO, busy_cluster, collect_as_the_scheduler, worktree  # noqa: E402


def placements(sched: object) -> float | None:
    """Runs the scheduler has placed (the report that frees a slot may place into it in its own commit); None
    for a revision that does not count them (its passes alone place)."""
    tally = getattr(sched, "tally", None)
    return None if tally is None else tally.snapshot()[0].get("placements", 0.0)


def measure(nodes: int, queued: int, drain: int, store_kind: str, teams: int = 0) -> dict[str, float]:
    """Runs inside the tree under test (its modules first on sys.path)."""
    collect_as_the_scheduler()
    import random

    from scheduler.contract.models import RunCreate, RunStatus, StatusReport

    tmp = Path(tempfile.mkdtemp(prefix="fedml-bench-queue-"))
    if store_kind == "sqlite":
        from scheduler.sqlite_store import SQLiteStore

        store = SQLiteStore(tmp / "s.db")
    else:
        from scheduler.redis_store import RedisStore

        store = RedisStore("redis://127.0.0.1:6379/7", prefix=f"bench-queue-{os.getpid()}:")
    sched = busy_cluster(store, nodes, queued, teams=teams) if teams else busy_cluster(store, nodes, queued)
    job = BUSY_JOB
    sched.kick()  # (written behind the scheduler's back: tell it)
    sched.schedule_pass()  # the first blocked pass (writes the queue reasons)
    sched.schedule_pass()  # and the one that reads them back from the change feed
    t = time.perf_counter()
    sched.schedule_pass()
    idle = time.perf_counter() - t
    t = time.perf_counter()
    extra = sched.create_run(RunCreate(job=job))  # type: ignore[arg-type]
    submit = time.perf_counter() - t
    sched.stop_run(extra.id)
    active = [r for r in store.list_runs(status=[RunStatus.STARTING], limit=nodes * 8 + 1)]
    random.Random(3).shuffle(active)
    freed, passes = [], []
    t0 = time.perf_counter()
    for r in active[:drain]:
        before = placements(sched)
        t = time.perf_counter()
        sched.report(r.id, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=r.attempt),
                     r.placements[0].node_id)
        t1 = time.perf_counter()
        placed = sched.schedule_pass()  # (where the report placed already, a pass that finds nothing to do)
        freed.append(time.perf_counter() - t)
        passes.append(time.perf_counter() - t1)
        if before is not None:
            placed = placements(sched) - before  # type: ignore[operator]
        assert placed == 1, f"a freed slot placed {placed} runs"
    rate = drain / (time.perf_counter() - t0)
    if store_kind != "sqlite":
        store.wipe()  # type: ignore[attr-defined]
    store.close()
    return {"idle_pass_ms": idle * 1e3, "submit_ms": submit * 1e3, "freed_to_placed_ms": statistics.median(freed) * 1e3,
            "pass_ms": statistics.median(passes) * 1e3,
            "drain_per_s": rate, "drain_all_s": queued / rate}


def run_in(tree: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "queue_drain.py"), "--child", *args], env=env,
                         cwd=tree, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"bench: the measurement in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--queued", default="100,1000,10000")
    p.add_argument("--drain", type=int, default=50)
    p.add_argument("--store", default="sqlite", choices=["sqlite", "redis"])
    p.add_argument("--compare", metavar="REV", help="also measure git revision REV, interleaved")
    p.add_argument("--teams", default="0", help="the runs spread over N teams with quotas and fair share (issue 18); "
                                                "several, comma-separated (0: none), are measured interleaved")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.nodes, a.one or 0, a.drain, a.store, int(a.teams))))
        return 0
    with worktree(a.compare) as before:
        trees = [(a.compare[:12], before)] if a.compare and before else []
        return run_all(a, [*trees, ("now", REPO)])


def run_all(a: argparse.Namespace, trees: list[tuple[str, Path]]) -> int:
    results = []
    for q in (int(x) for x in a.queued.split(",")):
        row = {"queued": q}
        for (name, tree), teams in ((tt, t) for tt in trees for t in a.teams.split(",")):
            # interleaved: each size measured on both trees (and with each number of teams) before the next
            r = run_in(tree, ["--nodes", str(a.nodes), "--one", str(q), "--drain", str(a.drain), "--store", a.store,
                              "--teams", teams])
            if teams != "0":
                name = f"{name}, {teams} teams"
            row[name] = r
            print(f"{a.store} {a.nodes} nodes x 8 busy, {q:>6} queued [{name:>12}]: idle pass {r['idle_pass_ms']:8.1f} ms"
                  f"  submit {r['submit_ms']:7.1f} ms  slot freed -> placed {r['freed_to_placed_ms']:8.1f} ms"
                  f" (its pass {r.get('pass_ms', float('nan')):7.2f} ms)"
                  f"  drain {r['drain_per_s']:8.1f}/s (all {q}: {r['drain_all_s']:8.1f} s)", flush=True)
        results.append(row)
    print(json.dumps({"bench": "queue_drain", "nodes": a.nodes, "store": a.store, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
