"""Inference gateway overhead: requests/s and added latency of POST /inference/NAME over calling a replica directly.

    .venv/bin/python bench/gateway.py [--requests 1000] [--concurrency 16] [--seconds 5]

Starts the embedded scheduler in a throw-away FEDML_HOME and launches a serve job with 2 replicas of a minimal
ASGI app on uvicorn (it echoes a small JSON body; its own cost is tiny, so what is measured is the hop). Then, in
the same run and with the same client (aiohttp, keep-alive):
  latency:    N sequential requests through the gateway and N straight to the replicas (alternating, in
              interleaved blocks so that drift hits both), p50/p99 each and the difference: the added latency;
  throughput: `--concurrency` async clients for `--seconds` through the gateway, then straight to the replicas.
Every answer must be 200. Everything shares this machine's cores (client, scheduler, replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import FEDML, REPO, check_cli, emit, median, percentile, temp_home

APP = r'''
import json, os
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    out = json.dumps({"replica": int(os.environ["FEDML_REPLICA_INDEX"]), "n": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host=os.environ["FEDML_SERVE_HOST"], port=int(os.environ["PORT"]), log_level="warning",
                access_log=False)
'''

JOB = """workspace: ws
job: python3 app.py
job_type: serve
service:
  name: bench-echo
  replicas: 2
  readiness_path: /health
"""

PAYLOAD = json.dumps({"inputs": [[0.5] * 64]}).encode()


def fedml(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FEDML), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


async def post(client: Any, url: str) -> None:
    async with client.post(url, data=PAYLOAD, headers={"content-type": "application/json"}) as r:
        text = await r.read()
        if r.status != 200:
            raise SystemExit(f"bench: {url} answered {r.status}: {text[:200]!r}")


async def sequential(client: Any, urls: list[str], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await post(client, urls[i % len(urls)])
        out.append(time.perf_counter() - t0)
    return out


async def throughput(client: Any, urls: list[str], concurrency: int, seconds: float) -> tuple[float, list[float]]:
    done = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await post(client, urls[i % len(urls)])
            lat.append(time.perf_counter() - t0)
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - t0), lat


async def measure(url: str, key: str, direct: list[str], args: argparse.Namespace) -> dict[str, object]:
    import aiohttp

    via = [f"{url}/inference/bench-echo"]
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=args.concurrency * 2),
                                     timeout=aiohttp.ClientTimeout(total=30)) as client:
        await sequential(client, via + direct, 200)  # warm both paths' connections
        g: list[float] = []
        d: list[float] = []
        block = 100
        for _ in range(max(1, args.requests // block)):
            g += await sequential(client, via, block)
            d += await sequential(client, direct, block)
        rps_g, lat_g = await throughput(client, via, args.concurrency, args.seconds)
        rps_d, lat_d = await throughput(client, direct, args.concurrency, args.seconds)
    ms = lambda xs, p: round(percentile(xs, p) * 1000, 3)  # noqa: E731
    return {
        "sequential": {
            "n": len(g),
            "gateway_p50_ms": ms(g, 50), "gateway_p99_ms": ms(g, 99),
            "direct_p50_ms": ms(d, 50), "direct_p99_ms": ms(d, 99),
            "added_p50_ms": round((median(g) - median(d)) * 1000, 3),
            "added_p99_ms": round((percentile(g, 99) - percentile(d, 99)) * 1000, 3),
        },
        "concurrent": {
            "concurrency": args.concurrency, "seconds": args.seconds,
            "gateway_rps": round(rps_g), "direct_rps": round(rps_d),
            "gateway_over_direct": round(rps_g / rps_d, 3) if rps_d else None,
            "gateway_p99_ms": ms(lat_g, 99), "direct_p99_ms": ms(lat_d, 99),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    check_cli()
    with temp_home("gateway") as (home, env):
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        job = Path(tempfile.mkdtemp(prefix="fedml-bench-gw-job-"))
        (job / "ws").mkdir()
        (job / "ws" / "app.py").write_text(APP)  # answers 200 on every path, /health included
        (job / "job.yaml").write_text(JOB)
        r = fedml(env, "launch", str(job / "job.yaml"), "--detach")
        if r.returncode != 0:
            raise SystemExit(f"bench: launch failed: {r.stderr}")
        run_id = r.stdout.strip()
        r = fedml(env, "endpoint", "scale", "bench-echo", "2", "--wait", "--timeout", "90", "--json", timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"bench: the endpoint did not get 2 ready replicas: {r.stderr}")
        ep = json.loads(r.stdout)
        state = json.loads((home / "local" / "scheduler.json").read_text())
        key = (home / "local" / "token").read_text().strip()
        direct = [f"http://{s['address']}:{s['port']}/predict" for s in ep["states"]]
        result = asyncio.run(measure(state["url"], key, direct, args))
        fedml(env, "run", "stop", run_id)
        shutil.rmtree(job, ignore_errors=True)
        print(f"sequential ({result['sequential']['n']} requests each): gateway p50 "
              f"{result['sequential']['gateway_p50_ms']} ms p99 {result['sequential']['gateway_p99_ms']} ms; direct "
              f"p50 {result['sequential']['direct_p50_ms']} ms p99 {result['sequential']['direct_p99_ms']} ms; added "
              f"p50 {result['sequential']['added_p50_ms']} ms, p99 {result['sequential']['added_p99_ms']} ms")
        c = result["concurrent"]
        print(f"concurrent ({c['concurrency']} clients, {c['seconds']} s): gateway {c['gateway_rps']} req/s "
              f"(p99 {c['gateway_p99_ms']} ms), direct {c['direct_rps']} req/s (p99 {c['direct_p99_ms']} ms), "
              f"ratio {c['gateway_over_direct']}")
        emit("gateway", result)


if __name__ == "__main__":
    main()
