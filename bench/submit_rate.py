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

from bench._common import BUSY_JOB, REPO, busy_cluster, emit, percentile  # noqa: E402
from scheduler.contract.transport import NODELAY, httpx  # noqa: E402

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


def start(home: Path, store_spec: str) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    env["FEDML_HOME"] = str(home)
    log = open(home / "scheduler.out", "wb")  # noqa: SIM115 - the child's
    # An hour-long heartbeat interval: the prepared nodes send none, and must stay online for the measurement.
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--port", "0",
                             "--no-agent", "--quiet", "--heartbeat-interval", "3600", "--store", store_spec],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
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


async def load(url: str, key: str, seconds: float, concurrency: int, batch: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx.AsyncHTTPTransport(socket_options=NODELAY, limits=limits, retries=0)
    headers = {"Authorization": f"Bearer {key}"}
    path, body = (("/api/v1/runs", {"job": JOB, "name": "bench"}) if batch == 1 else
                  ("/api/v1/runs/batch", {"runs": [{"job": JOB, "name": "bench"}] * batch}))
    lat: list[float] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=httpx.Timeout(60.0)) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await client.post(path, json=body, headers=headers)
                if r.status_code != 201:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    if errors:
        sys.exit(f"bench: a submission failed: {errors[0]}")
    return {"runs_per_s": len(lat) * batch / took, "requests": len(lat), "batch": batch,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3}


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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--store", default="sqlite", help="sqlite, or a redis:// URL (a prefix of its own is added)")
    a = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fedml-bench-submit-"))
    spec = a.store if a.store == "sqlite" else f"{a.store}?prefix=bench-submit-{os.getpid()}:"
    prepare(home, spec, a.nodes, a.queued)
    proc, url, key = start(home, spec)
    try:
        settled(url, key)
        single = asyncio.run(load(url, key, a.seconds, a.concurrency, 1))
        batched = asyncio.run(load(url, key, a.seconds, a.concurrency, a.batch))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if a.store != "sqlite":
            from scheduler.redis_store import RedisStore

            RedisStore(spec).wipe()
        shutil.rmtree(home, ignore_errors=True)
    where = f"{a.store.split('?')[0]}, {a.nodes} nodes x 8 busy, {a.queued} queued, {a.concurrency} clients"
    for name, r in (("one run per request", single), (f"batches of {a.batch}", batched)):
        print(f"{where}: {name:>20}: {r['runs_per_s']:8.0f} runs/s ({r['runs_per_s'] / FLOOR:5.2f}x the 500/s floor)"
              f"  request p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms", flush=True)
    emit("submit_rate", {"store": a.store.split("?")[0], "nodes": a.nodes, "queued": a.queued,
                         "concurrency": a.concurrency, "single": single, "batch": batched, "floor_per_s": FLOOR})
    return 0


if __name__ == "__main__":
    sys.exit(main())
