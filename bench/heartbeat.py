"""Heartbeat capacity: heartbeats/s one scheduler absorbs over real HTTP, with latency percentiles.

Starts a real scheduler process (`python -m scheduler.server --no-agent`) in a temporary home, registers
NODES simulated nodes over HTTP (POST /api/v1/nodes/register with the admin key), then:

1. closed loop, for SECONDS: CONCURRENCY simulated agents, each on its own keep-alive connection, cycle
   through their share of the nodes sending heartbeats back-to-back: POST /api/v1/nodes/{id}/poll with that
   node's token and {"running": [], "wait": 0} (answer at once; a real agent long-polls, but capacity is what
   is measured here). Every node heartbeats once before the clock starts (a node's first heartbeat since
   the scheduler started is written durably, later ones are not), then WARMUP seconds more.
2. open loop, for PACED_SECONDS: heartbeats due at a fixed PACED_RATE (default 1,000/s: 10,000 agents every
   10 s, issue 6), latency counted from when each was due.

With --gpus 0,8 both are measured for each number of GPU samples in turn, on the same scheduler and nodes,
with the CPU per heartbeat of each against none (the same run).

Prints heartbeats/s, p50/p90/p99/max latency, errors, the scheduler's and this client's CPU, and what the rate
means for agents heartbeating every 10 s. Loopback only; the temporary home is removed at the end (kept on
an error). Exit 1 on any failed heartbeat; a missed target is a figure, not an error. Last line: JSON.

    .venv/bin/python bench/heartbeat.py [--nodes 2000] [--seconds 15] [--concurrency 64] [--paced-rate 1000] [--gpus 0,8]

Not covered: 10,000 connections held open at once (real agents long-poll, one connection each).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from bench._common import REPO, emit, percentile  # noqa: E402
from scheduler.contract.transport import NODELAY, httpx  # noqa: E402

TARGET_AGENTS = 10_000  # issue 6
INTERVAL = 10.0  # the default heartbeat interval (s)
TARGET_RATE = TARGET_AGENTS / INTERVAL  # heartbeats/s that 10,000 agents every 10 s need


class SchedulerProc:
    """A scheduler process of our own in a temporary home; never the user's FEDML_HOME."""

    def __init__(self, home: Path, store: str = "sqlite", interval: float = INTERVAL) -> None:
        self.home = home
        self.log_path = home / "scheduler.out"
        env = {k: v for k, v in os.environ.items()
               if k not in ("FEDML_SERVER", "FEDML_API_KEY", "FEDML_ADMIN_KEY", "FEDML_HEARTBEAT_INTERVAL")}
        env["FEDML_HOME"] = str(home)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.server", "--home", str(home), "--host", "127.0.0.1", "--port", "0",
             "--no-agent", "--quiet", "--heartbeat-interval", str(interval), "--store", store],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 30.0, token_too: bool = True) -> tuple[str, str]:
        state, token = self.home / "local" / "scheduler.json", self.home / "local" / "token"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited with {self.proc.returncode}")
            try:
                doc = json.loads(state.read_text())
                if doc.get("pid") == self.proc.pid:
                    return doc["url"], token.read_text().strip() if token_too else ""
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"scheduler did not write {state} within {timeout:.0f} s")

    def offline(self) -> int:
        """How many times the scheduler logged a node going OFFLINE (its heartbeat timed out)."""
        try:
            return self.log_path.read_text(errors="replace").count(" is offline: no heartbeat for ")
        except OSError:
            return 0

    def tail(self, n: int = 20) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def stop(self) -> float:
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return time.perf_counter() - t0


def cpu_seconds(p: psutil.Process | list[psutil.Process]) -> float:
    return sum(t.user + t.system for t in (x.cpu_times() for x in (p if isinstance(p, list) else [p])))


def machine_busy_seconds() -> float:
    """CPU seconds all processes used, all cores together (to see whether something else competed)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def client(base: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx.AsyncHTTPTransport(socket_options=NODELAY, limits=limits, retries=0)
    return httpx.AsyncClient(base_url=base, transport=transport, timeout=httpx.Timeout(30.0))


GPUS = 0  # --gpus: GPU samples sent with each heartbeat (agents/telemetry.py), as an 8-GPU node's agent sends


def poll_body() -> bytes:
    doc: dict[str, Any] = {"running": [], "wait": 0}
    if GPUS:
        doc["gpus"] = [{"index": i, "util": 87, "mem_used_mb": 61234, "mem_total_mb": 81920, "power_w": 312.5,
                        "temp_c": 64, "pids": [40000 + i]} for i in range(GPUS)]
    return json.dumps(doc).encode()


def node_info(i: int) -> dict[str, Any]:
    return {"name": f"hb-{i:05d}", "gpus": [{"index": g, "name": "NVIDIA A100 80GB PCIe", "memory_mb": 81920}
                                           for g in range(8)],
            "cpus": 64, "memory_mb": 512_000, "labels": {"bench": "heartbeat"}, "runtimes": ["process"],
            "address": "127.0.0.1"}


async def register_all(base: str, admin: str, n: int, concurrency: int) -> tuple[list[tuple[str, str]], float]:
    """Register n nodes over `concurrency` connections of the lean client (with httpx's, the client's CPU held
    the rate down on 2 cores); returns [(node_id, node_token)] and the wall time it took."""
    out: list[tuple[str, str] | None] = [None] * n
    todo = iter(range(n))
    url = urlsplit(base)
    conns = [RawConn(url.hostname or "127.0.0.1", url.port or 80) for _ in range(concurrency)]

    async def worker(conn: RawConn) -> None:
        for i in todo:
            status, data = await conn.post("/api/v1/nodes/register", admin, json.dumps(node_info(i)).encode())
            if status != 200:
                raise RuntimeError(f"register {i}: HTTP {status}: {data[:300].decode(errors='replace')}")
            doc = json.loads(data)
            out[i] = (doc["node"]["id"], doc["node_token"])

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return [x for x in out if x is not None], time.perf_counter() - t0


class RawConn:
    """One keep-alive HTTP/1.1 connection, written by hand: a request is one write, the answer is read by its
    Content-Length. On a 2-core machine the client shares the CPU with the scheduler, so it must cost little;
    httpx's async pool costs ~10x more per request (see --client httpx)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        for level, opt, val in NODELAY:
            sock.setsockopt(level, opt, val)

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                          f"authorization: Bearer {token}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for ln in lines[1:]:
            name, _, value = ln.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class HttpxConn:
    """The same through httpx.AsyncClient (one client with one connection per agent: a shared pool scans all
    its connections for every queued request, which at 64 connections costs more than the request)."""

    def __init__(self, base: str) -> None:
        self.c = client(base, 1)

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        r = await self.c.post(path, content=body,
                              headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
        return r.status_code, r.content

    async def close(self) -> None:
        await self.c.aclose()


async def heartbeat(bases: list[str], nodes: list[tuple[str, str]], concurrency: int, warmup: float,
                    seconds: float, scheds: list[psutil.Process], kind: str) -> dict[str, Any]:
    """Back-to-back heartbeats from `concurrency` agents, each on its own keep-alive connection. Warm-up: every
    node heartbeats once (a node's first heartbeat since the scheduler started may be written durably; later
    ones need not be), then `warmup` more seconds. Only heartbeats that start and end inside the measured
    window count. Returns the figures."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    me = psutil.Process()
    body = poll_body()
    shares = [s for s in (nodes[w::concurrency] for w in range(concurrency)) if s]
    window: dict[str, float] = {}
    stop_at = [float("inf")]
    first_pass = [0]  # agents that have sent one heartbeat for every node of their share
    all_seen = asyncio.Event()
    urls = [urlsplit(b) for b in bases]  # agents spread over the replicas, as behind a load balancer
    conns: list[RawConn | HttpxConn] = [RawConn(urls[i % len(urls)].hostname or "127.0.0.1", urls[i % len(urls)].port or 80)
                                        if kind == "raw" else HttpxConn(bases[i % len(bases)])
                                        for i in range(len(shares))]

    async def agent(conn: RawConn | HttpxConn, share: list[tuple[str, str]]) -> None:
        k = 0
        while True:
            node_id, token = share[k % len(share)]
            if k == len(share):
                first_pass[0] += 1
                if first_pass[0] == len(conns):
                    all_seen.set()
            k += 1
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            try:
                status, _ = await conn.post(f"/api/v1/nodes/{node_id}/poll", token, body)
                ok, why = status == 200, f"HTTP {status}"
            except (OSError, asyncio.IncompleteReadError, ValueError, httpx.HTTPError) as exc:
                ok, why = False, type(exc).__name__
                await conn.close()
            t1 = time.perf_counter()
            if "start" in window and t0 >= window["start"] and t1 <= stop_at[0]:
                if ok:
                    lat.append(t1 - t0)
                else:
                    errors[why] = errors.get(why, 0) + 1

    async def clock() -> None:
        t = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), 120)
        window["first_pass_s"] = time.perf_counter() - t
        await asyncio.sleep(warmup)
        window["start"] = time.perf_counter()
        window["cpu_s"], window["cpu_c"] = cpu_seconds(scheds), cpu_seconds(me)
        window["cpu_all"] = machine_busy_seconds()
        stop_at[0] = window["start"] + seconds
        await asyncio.sleep(seconds)
        window["end"] = time.perf_counter()
        window["cpu_s_end"], window["cpu_c_end"] = cpu_seconds(scheds), cpu_seconds(me)
        window["cpu_all_end"] = machine_busy_seconds()

    try:
        await asyncio.gather(clock(), *(agent(c, s) for c, s in zip(conns, shares, strict=True)))
    finally:
        for c in conns:
            await c.close()

    wall = window["end"] - window["start"]
    ms = [x * 1000 for x in lat]
    n_err = sum(errors.values())
    return {
        "client": kind, "heartbeats": len(lat), "errors": n_err, "error_kinds": errors, "seconds": round(wall, 3),
        "rate_per_s": round(len(lat) / wall, 1),
        "first_pass_s": round(window["first_pass_s"], 2),
        "first_pass_per_s": round(len(nodes) / window["first_pass_s"], 1),
        "latency_ms": {"p50": round(percentile(ms, 50), 2), "p90": round(percentile(ms, 90), 2),
                       "p99": round(percentile(ms, 99), 2), "max": round(max(ms), 2) if ms else None},
        "scheduler_cpu_pct": round(100 * (window["cpu_s_end"] - window["cpu_s"]) / wall, 1),
        "client_cpu_pct": round(100 * (window["cpu_c_end"] - window["cpu_c"]) / wall, 1),
        # roughly what everything else on the machine used, in % of one core (system-wide ticks minus ours: +-20 %
        # of noise); far above that, something competed for the CPU and the figures are low
        "other_cpu_pct": round(100 * ((window["cpu_all_end"] - window["cpu_all"]) - (window["cpu_s_end"] - window["cpu_s"])
                                      - (window["cpu_c_end"] - window["cpu_c"])) / wall, 1),
    }


async def paced(bases: list[str], nodes: list[tuple[str, str]], rate: float, seconds: float, concurrency: int,
                scheds: list[psutil.Process]) -> dict[str, Any]:
    """Open loop: heartbeat i is due at start + i/rate (round-robin over the nodes), whatever the answers do,
    as agents on a timer send them. `concurrency` connections carry them; a heartbeat that finds none free waits
    for one, and its latency runs from when it was due (so a server that falls behind shows it in the
    percentiles instead of slowing the client down: no coordinated omission). With replicas, a node's heartbeats
    all go to one of them (node i to replica i mod R, as in the closed loop), as an agent's kept-alive
    connection behind a load balancer does: spread over both, each replica's first look at a node's key is a
    read of the store, which this phase (every node once in 10 s at 5,000/s) would mostly measure."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    body = poll_body()
    urls = [urlsplit(b) for b in bases]
    conns = [RawConn(urls[i % len(urls)].hostname or "127.0.0.1", urls[i % len(urls)].port or 80)
             for i in range(concurrency)]
    total = int(rate * seconds)
    ticket = list(range(len(urls)))  # per replica: the next heartbeat (its index) that goes to it
    t_start = time.perf_counter() + 0.05
    cpu0 = cpu_seconds(scheds)

    async def worker(conn: RawConn, r: int) -> None:
        while ticket[r] < total:
            i = ticket[r]
            ticket[r] += len(urls)
            due = t_start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            node_id, token = nodes[i % len(nodes)]
            try:
                status, _ = await conn.post(f"/api/v1/nodes/{node_id}/poll", token, body)
                ok, why = status == 200, f"HTTP {status}"
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                ok, why = False, type(exc).__name__
                await conn.close()
            if ok:
                lat.append(time.perf_counter() - due)
            else:
                errors[why] = errors.get(why, 0) + 1

    try:
        await asyncio.gather(*(worker(c, i % len(urls)) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    wall = time.perf_counter() - t_start
    ms = [x * 1000 for x in lat]
    return {"rate_asked": rate, "sent": total, "ok": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": round(wall, 2), "achieved_per_s": round(len(lat) / wall, 1),
            "latency_ms": {"p50": round(percentile(ms, 50), 2), "p90": round(percentile(ms, 90), 2),
                           "p99": round(percentile(ms, 99), 2), "max": round(max(ms), 2) if ms else None},
            "scheduler_cpu_pct": round(100 * (cpu_seconds(scheds) - cpu0) / wall, 1)}


def measure(args: argparse.Namespace, urls: list[str], nodes: list[tuple[str, str]], procs: list[psutil.Process],
            gpus: int, several: bool, first: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The closed loop, then the paced phase, with `gpus` GPU samples in each heartbeat; prints the figures and
    returns them (the closed loop's with what its rate means for agents at 10 s, and its verdict)."""
    global GPUS
    GPUS = gpus
    if several:
        print(f"## heartbeats with {gpus} GPU samples each" + (" (GPU telemetry on)" if gpus else ""))
    hb = asyncio.run(heartbeat(urls, nodes, args.concurrency, args.warmup, args.seconds, procs, args.client))
    lat = hb["latency_ms"]
    agents = hb["rate_per_s"] * INTERVAL
    verdict = "PASS" if hb["rate_per_s"] >= TARGET_RATE else "MISS"
    hb.update(agents_at_10s=round(agents), verdict=verdict)
    print(f"{'first' if first else 'one more'} heartbeat of every node (warm-up, not counted): "
          f"{hb['first_pass_s']:.2f} s ({hb['first_pass_per_s']:.0f}/s)")
    print(f"heartbeats: {hb['heartbeats']} in {hb['seconds']:.1f} s = {hb['rate_per_s']:.0f}/s "
          f"({args.concurrency} agents back-to-back over {len(nodes)} nodes, wait=0, {args.client} client)")
    print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"errors: {hb['errors']}" + (f" {hb['error_kinds']}" if hb["errors"] else ""))
    print(f"CPU over the window: scheduler{'s' if args.replicas > 1 else ''} {hb['scheduler_cpu_pct']:.0f} % (100 % = "
          f"one core; each runs Python under one GIL), this client {hb['client_cpu_pct']:.0f} %; {psutil.cpu_count()} cores")
    if hb["other_cpu_pct"] > 50:
        print(f"   NOTE: other processes used {hb['other_cpu_pct']:.0f} % of a core meanwhile: these figures are "
              "lower than this machine gives when idle")
    print(f"=> sustains ~{agents:,.0f} agents heartbeating every {INTERVAL:.0f} s; issue 6 wants "
          f"{TARGET_AGENTS:,} ({TARGET_RATE:,.0f}/s): {verdict} ({hb['rate_per_s'] / TARGET_RATE:.0%} of it)")
    print("   (a real agent long-polls with wait=15: one request per interval, but two poll_once calls, "
          "one on arrival and one when the wait ends)")
    pc: dict[str, Any] | None = None
    if args.paced_seconds > 0 and args.paced_rate > 0:
        pc = asyncio.run(paced(urls, nodes, args.paced_rate, args.paced_seconds, args.concurrency, procs))
        pl = pc["latency_ms"]
        print(f"paced at {args.paced_rate:.0f}/s for {args.paced_seconds:.0f} s (open loop, latency from when each "
              f"was due): {pc['ok']}/{pc['sent']} answered in {pc['wall_s']:.1f} s = {pc['achieved_per_s']:.0f}/s; "
              f"latency ms p50 {pl['p50']}  p90 {pl['p90']}  p99 {pl['p99']}  max {pl['max']}; "
              f"errors {pc['errors']}; scheduler CPU {pc['scheduler_cpu_pct']:.0f} %")
    return hb, pc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000, help="simulated nodes to register (default 2000)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured heartbeat window (default 15)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent agents / connections (default 64)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds after every node's first heartbeat (default 1)")
    ap.add_argument("--register-concurrency", type=int, default=16)
    ap.add_argument("--paced-rate", type=float, default=TARGET_RATE,
                    help=f"then heartbeats at this fixed rate, open loop (default {TARGET_RATE:.0f}/s: issue 6's load)")
    ap.add_argument("--paced-seconds", type=float, default=5.0, help="length of the paced phase (default 5; 0: skip)")
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite",
                    help="the scheduler's store: sqlite (default) or redis (127.0.0.1:6379/7, a key prefix of its own, "
                         "wiped afterwards; heartbeats then go to a Redis hash the replicas share)")
    ap.add_argument("--replicas", type=int, default=1,
                    help="scheduler replicas sharing the store (redis only; agents spread over them, as behind a "
                         "load balancer); CPU figures are all replicas together")
    ap.add_argument("--gpus", default="0",
                    help="GPU samples in each heartbeat (GPU telemetry on: 8 for an 8-GPU node; default 0); several, "
                         "separated by commas (0,8), are measured one after the other on the same scheduler and nodes")
    ap.add_argument("--heartbeat-interval", type=float, default=INTERVAL,
                    help="the scheduler's heartbeat interval (default 10 s; a node silent for 3 is OFFLINE). A "
                         "node this bench reaches less often than that times out and comes back, each a durable "
                         "write: at 50,000 nodes on 2 cores, registering alone takes 2-3 minutes, so give 120 there to "
                         "measure the polls alone. The rate is still read as agents every 10 s.")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="heartbeat client: a lean hand-written HTTP/1.1 one (default) or httpx.AsyncClient")
    args = ap.parse_args()
    try:
        gpu_counts = [int(x) for x in str(args.gpus).split(",")]
    except ValueError:
        gpu_counts = [-1]
    if any(g < 0 for g in gpu_counts):
        ap.error("--gpus: a number of GPU samples, or several separated by commas (0,8)")
    if args.nodes < 1 or args.concurrency < 1 or args.seconds <= 0 or args.heartbeat_interval <= 0:
        ap.error("--nodes, --concurrency, --seconds and --heartbeat-interval must be positive")
    if args.replicas < 1 or (args.replicas > 1 and args.store != "redis"):
        ap.error("--replicas: at least 1, and more than 1 only with --store redis")

    home = Path(tempfile.mkdtemp(prefix="fedml-bench-heartbeat-"))
    keep = False
    store = "sqlite"
    sched: SchedulerProc | None = None
    others: list[SchedulerProc] = []
    result: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        store = "sqlite" if args.store == "sqlite" else f"redis://127.0.0.1:6379/7?prefix=fedml-bench-{os.getpid()}:"
        sched = SchedulerProc(home, store, args.heartbeat_interval)
        url, admin = sched.wait_ready()
        print(f"# scheduler pid {sched.proc.pid} at {url} (home {home}, store {args.store}), up in "
              f"{time.perf_counter() - t0:.2f} s")
        urls = [url]
        for i in range(1, args.replicas):
            (home / f"replica-{i}").mkdir()
            others.append(SchedulerProc(home / f"replica-{i}", store, args.heartbeat_interval))
            urls.append(others[-1].wait_ready(token_too=False)[0])
            print(f"# replica {i}: pid {others[-1].proc.pid} at {urls[-1]}")
        procs = [sched.ps] + [o.ps for o in others]

        c0 = cpu_seconds(sched.ps)
        nodes, reg_s = asyncio.run(register_all(url, admin, args.nodes, args.register_concurrency))
        reg_cpu = 100 * (cpu_seconds(sched.ps) - c0) / reg_s
        print(f"registered {len(nodes)} nodes in {reg_s:.2f} s ({len(nodes) / reg_s:.0f}/s, "
              f"{args.register_concurrency} connections, scheduler CPU {reg_cpu:.0f} %)")

        result = {"store": args.store, "replicas": args.replicas, "nodes": len(nodes), "concurrency": args.concurrency,
                  "register_s": round(reg_s, 2), "register_per_s": round(len(nodes) / reg_s, 1),
                  "register_scheduler_cpu_pct": round(reg_cpu, 1), "target_agents": TARGET_AGENTS,
                  "target_rate": TARGET_RATE}
        failed = False
        for k, gpus in enumerate(gpu_counts):  # the same scheduler and nodes: 10,000 are not registered again
            hb, pc = measure(args, urls, nodes, procs, gpus, several=len(gpu_counts) > 1, first=k == 0)
            failed = failed or bool(hb["errors"] or not hb["heartbeats"] or (pc and pc["errors"]))
            one = {**hb, "paced": pc}
            if len(gpu_counts) == 1:
                result.update(one)
            else:
                result.setdefault("by_gpus", {})[str(gpus)] = one
        if len(gpu_counts) > 1:
            cost = {g: r["scheduler_cpu_pct"] / r["rate_per_s"] for g, r in result["by_gpus"].items() if r["rate_per_s"]}
            if "0" in cost and len(cost) > 1:
                result["cpu_per_heartbeat_vs_none"] = {g: round(c / cost["0"], 2) for g, c in cost.items() if g != "0"}
                print("CPU per heartbeat against none (the same run): " + ", ".join(
                    f"{g} GPU samples {x:.2f}x" for g, x in result["cpu_per_heartbeat_vs_none"].items()))
        offline = sum(x.offline() for x in [sched, *others])
        result["went_offline"] = offline
        result["heartbeat_interval"] = args.heartbeat_interval
        print(f"nodes that went OFFLINE meanwhile (not heard within {3 * args.heartbeat_interval:g} s): {offline}"
              + ("  (the figures include their state writes)" if offline else ""))
        keep = failed
        return 1 if failed else 0
    except BrokenPipeError:  # stdout went away (`| head`): nothing to report, nothing worth keeping
        return 1
    except Exception as exc:  # report, keep the home for a post-mortem
        print(f"# error: {type(exc).__name__}: {exc}")
        if sched is not None:
            for ln in sched.tail():
                print(f"#   {ln[:300]}")
        result = {"error": f"{type(exc).__name__}: {exc}"}
        return 1
    finally:
        for o in others:
            o.stop()
        took = sched.stop() if sched is not None else 0.0
        if sched is not None and store != "sqlite":
            from scheduler.redis_store import wipe_prefix

            wipe_prefix(store)
        if not keep:  # before printing: a closed stdout (`| head`) must not leave the home behind
            shutil.rmtree(home, ignore_errors=True)
        with contextlib.suppress(BrokenPipeError):
            if sched is not None:
                print(f"# cleanup: scheduler stopped (exit {sched.proc.returncode}) in {took:.1f} s")
            if keep:
                print(f"# kept {home} for a post-mortem")
            emit("heartbeat", result)


if __name__ == "__main__":
    sys.exit(main())
