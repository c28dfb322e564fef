"""Submissions per second into a busy cluster, over real HTTP, each committed before it is acknowledged (issue 14).

A real scheduler process (`python -m scheduler.server`, SQLite with synchronous=FULL, or --store redis://...)
over a store prepared beforehand: NODES nodes x 8 GPUs all busy and QUEUED runs waiting behind them. Then, for
SECONDS each:
1. single: CONCURRENCY clients POST /api/v1/runs back to back (one run per request);
2. batch: CONCURRENCY clients POST /api/v1/runs/batch with BATCH runs each (one commit per batch: what a sweep
   uses).
Prints runs accepted per second and request latency percentiles, against the issue's floor of 500/s (Slurm's
published figure; no slurmctld is measured here). Every response must be 201. Last line: JSON.

    .venv/bin/python bench/submit_rate.py [--nodes 1000] [--queued 10000] [--seconds 10] [--concurrency 16]
                                          [--store redis://127.0.0.1:6379/7] [--compare REV --rounds 2]

The clients (aiohttp, one process) share the machine with the scheduler; the scheduler's CPU per run is printed
beside the rate (with a 2-core machine the rate is bounded by the one core the scheduler's interpreter uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import BUSY_JOB, REPO, busy_cluster, emit, percentile, worktree  # noqa: E402
from scheduler.contract.transport import httpx  # noqa: E402

FLOOR = 500.0  # submissions/s: Slurm's published figure (issue 14)
JOB = BUSY_JOB


def prepare(home: Path, store_spec: str, nodes: int, queued: int) -> None:
    """The busy cluster, written straight into the store the scheduler will open."""
    from scheduler.server import open_store

    local = home / "local"
    local.mkdir(parents=True, exist_ok=True)
    store = open_store(store_spec, local)
    busy_cluster(store, nodes, queued)
    store.close()


def start(home: Path, store_spec: str, tree: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    env["FEDML_HOME"] = str(home)
    log = open(home / "scheduler.out", "wb")  # noqa: SIM115 - the child's
    # An hour-long heartbeat interval: the prepared nodes send none, and must stay online for the measurement.
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--port", "0",
                             "--no-agent", "--quiet", "--heartbeat-interval", "3600", "--store", store_spec],
                            cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    state, token = home / "local" / "scheduler.json", home / "local" / "token"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: the scheduler exited: {(home / 'scheduler.out').read_text()[-2000:]}")
        try:
            doc = json.loads(state.read_text())
            if doc.get("pid") == proc.pid:
                return proc, doc["url"], token.read_text().strip()
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    sys.exit("bench: the scheduler did not start within 60 s")


async def load(url: str, key: str, seconds: float, concurrency: int, batch: int, pid: int) -> dict[str, Any]:
    """CONCURRENCY keep-alive connections posting back to back for SECONDS. The client is aiohttp: httpx's async
    client costs several times more CPU per request, and the clients share the machine with the scheduler."""
    import aiohttp
    import psutil

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    path, body = (("/api/v1/runs", {"job": JOB, "name": "bench"}) if batch == 1 else
                  ("/api/v1/runs/batch", {"runs": [{"job": JOB, "name": "bench"}] * batch}))
    data = json.dumps(body).encode()
    lat: list[float] = []
    errors: list[str] = []
    server, me = psutil.Process(pid), psutil.Process()
    async with aiohttp.ClientSession(url, headers=headers, timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with client.post(path, data=data) as r:
                    text = await r.read()
                    if r.status != 201:
                        errors.append(f"{r.status} {text[:200]!r}")
                        return
                lat.append(time.perf_counter() - t)
        cpu0, mine0 = server.cpu_times(), me.cpu_times()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
        cpu1, mine1 = server.cpu_times(), me.cpu_times()
    if errors:
        sys.exit(f"bench: a submission failed: {errors[0]}")
    runs = len(lat) * batch
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    client_cpu = (mine1.user + mine1.system) - (mine0.user + mine0.system)
    return {"runs_per_s": runs / took, "requests": len(lat), "batch": batch,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "scheduler_cpu_ms_per_run": server_cpu / runs * 1e3, "scheduler_cores": server_cpu / took,
            "client_cores": client_cpu / took}


def settled(url: str, key: str) -> None:
    """Wait for the scheduler's first pass over the prepared queue (it writes every waiting run's reason once):
    a probe run shows a reason when it has happened."""
    headers = {"Authorization": f"Bearer {key}"}
    probe = httpx.post(f"{url}/api/v1/runs", json={"job": JOB, "name": "probe"}, headers=headers, timeout=60).json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/api/v1/runs/{probe['id']}", headers=headers, timeout=60).json().get("reason"):
            return
        time.sleep(0.1)
    sys.exit("bench: the scheduler's first pass did not finish within 120 s")


def measure(tree: Path, store: str, a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """One prepared cluster, one scheduler process started from `tree`: (one run per request, batches)."""
    home = Path(tempfile.mkdtemp(prefix="fedml-bench-submit-"))
    spec = store if store == "sqlite" else f"{store}?prefix=bench-submit-{os.getpid()}-{time.monotonic_ns()}:"
    prepare(home, spec, a.nodes, a.queued)
    proc, url, key = start(home, spec, tree)
    try:
        settled(url, key)
        single = asyncio.run(load(url, key, a.seconds, a.concurrency, 1, proc.pid))
        batched = asyncio.run(load(url, key, a.seconds, a.concurrency, a.batch, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if store != "sqlite":
            from scheduler.redis_store import RedisStore

            RedisStore(spec).wipe()
        shutil.rmtree(home, ignore_errors=True)
    return single, batched


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--store", default="sqlite", help="sqlite, or a redis:// URL (a prefix of its own is added)")
    p.add_argument("--compare", metavar="REV", help="also measure git revision REV (a worktree), taking turns")
    p.add_argument("--rounds", type=int, default=1, help="with --compare: turns each")
    a = p.parse_args()
    results: list[dict[str, Any]] = []
    with worktree(a.compare) as before:
        trees = [("this tree", REPO)] + ([(a.compare[:12], before)] if a.compare and before else [])
        for _ in range(a.rounds if a.compare else 1):
            for label, tree in trees:
                single, batched = measure(tree, a.store, a)
                where = f"{label}: {a.store.split('?')[0]}, {a.nodes} nodes x 8 busy, {a.queued} queued, " \
                        f"{a.concurrency} clients"
                for name, r in (("one run per request", single), (f"batches of {a.batch}", batched)):
                    print(f"{where}: {name:>20}: {r['runs_per_s']:6.0f} runs/s ({r['runs_per_s'] / FLOOR:5.2f}x the "
                          f"500/s floor)  request p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms; scheduler "
                          f"{r['scheduler_cpu_ms_per_run']:.2f} ms CPU per run ({r['scheduler_cores']:.2f} cores), "
                          f"clients {r['client_cores']:.2f} cores", flush=True)
                results.append({"tree": label, "single": single, "batch": batched})
    emit("submit_rate", {"store": a.store.split("?")[0], "nodes": a.nodes, "queued": a.queued,
                         "concurrency": a.concurrency, "runs": results, "floor_per_s": FLOOR})
    return 0


if __name__ == "__main__":
    sys.exit(main())
