"""An idle scheduler's CPU with a long queue (issue 14): a real `python -m scheduler.server` process (SQLite, no
agent) holding Q queued runs that cannot be placed (one node, busy), sampled with psutil for a while.

With --compare REV the same is measured for git revision REV (a worktree), interleaved (A B A B), so the ratio
is measured in one run on one machine.

    .venv/bin/python bench/idle_cpu.py [--queued 10000] [--seconds 20] [--compare REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, worktree  # noqa: E402

SETUP = r"""
import sys, time
from pathlib import Path
from scheduler.contract.models import GpuInfo, Node, Placement, Run, RunStatus
from scheduler.sqlite_store import SQLiteStore
store = SQLiteStore(Path(sys.argv[1]) / "local" / "scheduler.db")
now = time.time()
store.upsert_node(Node(id="node-1", name="n1", last_seen=now, gpus=[GpuInfo(index=0, name="A100")]))
job = {"job": "echo hi", "computing": {"minimum_num_gpus": 1}}
busy = store.create_run(Run(id="run-busy", name="busy", job=job, created_at=now))
store.transition(busy.id, RunStatus.STARTING, placements=[Placement(rank=0, node_id="node-1", gpus=[0])])
with store.batch():
    for j in range(int(sys.argv[2])):
        store.create_run(Run(id=f"run-q{j:06d}", name="waiting", job=job, created_at=now + 1 + j * 1e-6))
store.close()
"""


def measure(tree: Path, queued: int, seconds: float) -> float:
    import psutil

    home = Path(tempfile.mkdtemp(prefix="fedml-bench-idle-"))
    (home / "local").mkdir()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", SETUP, str(home), str(queued)], env=env, cwd=tree, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--no-agent", "--quiet"],
                            env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (home / "local" / "scheduler.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)  # the first passes (they write the queue reasons) are not idle
        p = psutil.Process(proc.pid)
        before = sum(p.cpu_times()[:2])
        time.sleep(seconds)
        return (sum(p.cpu_times()[:2]) - before) / seconds
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", metavar="REV")
    a = ap.parse_args()
    with worktree(a.compare) as before:
        trees = [(a.compare[:12], before)] if a.compare and before else []
        return run_all(a, [*trees, ("now", REPO)])


def run_all(a: argparse.Namespace, trees: list[tuple[str, Path]]) -> int:
    got: dict[str, list[float]] = {name: [] for name, _ in trees}
    for _ in range(a.rounds):
        for name, tree in trees:
            share = measure(tree, a.queued, a.seconds)
            got[name].append(share)
            print(f"idle scheduler, {a.queued} queued [{name:>12}]: {share:.1%} of a core", flush=True)
    print(json.dumps({"bench": "idle_cpu", "queued": a.queued, "cpu_share": got}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
