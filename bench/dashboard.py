"""The dashboard's speed (issue 16), against a real scheduler process and headless Chromium (Playwright):

- runs page with N runs in the store: time to first byte of the page, the API call the Runs page makes, and time
  from navigation to the table drawn;
- the queue page with 10,000 runs waiting behind 8,000 running on 1,000 nodes: GET /queue (place, who is
  ahead, estimated start) built anew (after a write and after the view's reuse time);
- a job printing a line every 10 ms: time from the print to the line on the run page (p50, p99), measured in the
  page against the time the job wrote into the line (one machine, one clock);
- a 1,000,000-line log: the run page opened, scrolled to ten places and back to the first line; the tab's JS heap
  after that, and whether the first line is there;
- the scheduler's CPU while 100 dashboards are open (100 event streams, each reading the runs list on every event
  as the page does), runs being created at a steady rate, against the same with none open (interleaved A B A B).

    .venv/bin/python bench/dashboard.py [--runs 100000] [--dashboards 100] [--log-lines 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, percentile  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--enable-precise-memory-info"]

SETUP = r"""
import sys, time
from pathlib import Path
from scheduler.contract.models import Run, RunStatus
from scheduler.sqlite_store import SQLiteStore
store = SQLiteStore(Path(sys.argv[1]) / "local" / "scheduler.db")
now = time.time() - 86400
job = {"job": "echo hi"}
with store.batch():
    for j in range(int(sys.argv[2])):
        store.create_run(Run(id=f"run-h{j:07d}", name=f"old-{j % 97}", job=job, status=RunStatus.FINISHED,
                             exit_code=0, created_at=now + j * 0.01, started_at=now + j * 0.01,
                             ended_at=now + j * 0.01 + 1))
store.close()
"""


QUEUE_SETUP = r"""
import sys, time
from pathlib import Path
from scheduler.contract.models import GpuInfo, Node, Placement, Run, RunStatus
from scheduler.sqlite_store import SQLiteStore
store = SQLiteStore(Path(sys.argv[1]) / "local" / "scheduler.db")
nodes, active, queued = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
now = time.time()
one = {"job": "sleep 1", "max_duration": "1h", "computing": {"minimum_num_gpus": 1}}
with store.batch():
    for n in range(nodes):
        # (no agents: heard from "in an hour", so they stay online, and their runs running, while this measures)
        store.upsert_node(Node(id=f"node-{n:05d}", name=f"n{n}", job_user="fedml-job", last_seen=now + 3600,
                               gpus=[GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(8)]))
    for j in range(active):
        store.create_run(Run(id=f"run-a{j:07d}", name="busy", job=one, status=RunStatus.RUNNING, owner=f"u{j % 7}",
                             placements=[Placement(rank=0, node_id=f"node-{(j // 8) % nodes:05d}", gpus=[j % 8])],
                             created_at=now - 600 + j * 1e-3, started_at=now - 600 + j * 1e-3))
    for j in range(queued):
        store.create_run(Run(id=f"run-q{j:07d}", name=f"wait-{j % 13}", job=one, owner=f"u{j % 7}",
                             created_at=now + j * 1e-3))
store.close()
"""


class Server:
    """`python -m scheduler.server` on a home of its own (with its local agent unless no_agent)."""

    def __init__(self, runs: int, *, no_agent: bool, setup: list[str] | None = None) -> None:
        import psutil

        self.home = Path(tempfile.mkdtemp(prefix="fedml-bench-dash-"))
        (self.home / "local").mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "FEDML_HOME": str(self.home)}
        if runs:
            subprocess.run([sys.executable, "-c", SETUP, str(self.home), str(runs)], env=env, cwd=REPO, check=True)
        if setup:
            subprocess.run([sys.executable, "-c", *setup[:1], str(self.home), *setup[1:]], env=env, cwd=REPO,
                           check=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(self.home), "--quiet",
                                      *(["--no-agent"] if no_agent else [])],
                                     env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        state = self.home / "local" / "scheduler.json"
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.url = json.loads(state.read_text())["url"]
        self.token = (self.home / "local" / "token").read_text().strip()
        self.env = env
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        return sum(self.ps.cpu_times()[:2])

    def launch(self, job: str) -> str:
        d = Path(tempfile.mkdtemp(dir=self.home))
        (d / "job.yaml").write_text("job: |\n" + "".join(f"  {ln}\n" for ln in job.splitlines()))
        out = subprocess.run([sys.executable, "-m", "fedml_cli.entry", "launch", str(d / "job.yaml"), "--detach"],
                             env=self.env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run([sys.executable, "-m", "fedml_cli.entry", "scheduler", "stop"], env=self.env,
                       capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def signed_in(browser: Any, s: Server) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(s.url + "/")
    page.evaluate("k => fetch('/ui/session', {method: 'POST', headers: {'content-type': 'application/json'}, "
                  "body: JSON.stringify({api_key: k})})", s.token)
    page.reload()  # (the page reads its session when it loads)
    page.wait_for_selector("#nav:not([hidden])")
    return page


def runs_page(browser: Any, n: int) -> dict[str, float]:
    from scheduler.contract.transport import httpx

    s = Server(n, no_agent=True)
    try:
        h = {"Authorization": f"Bearer {s.token}"}
        ttfb, api, fresh, deep, found, counts = [], [], [], [], [], []
        with httpx.Client(base_url=s.url) as c:
            half = c.get(f"/api/v1/runs/run-h{n // 2:07d}", headers=h).json()
            mid = f"{half['created_at']!r},{half['id']}"
            for i in range(20):
                t = time.perf_counter()
                with c.stream("GET", "/") as r:
                    next(r.iter_raw())
                    ttfb.append(time.perf_counter() - t)
                t = time.perf_counter()
                assert len(c.get("/api/v1/runs", params={"limit": 100}, headers=h).json()) == 100
                api.append(time.perf_counter() - t)
                # not from the list cache (another limit each time): the store's page itself
                t = time.perf_counter()
                assert len(c.get("/api/v1/runs", params={"limit": 101 + i}, headers=h).json()) == 101 + i
                fresh.append(time.perf_counter() - t)
                # a page half way back (the cursor of the run in the middle) and a search that scans
                t = time.perf_counter()
                got = c.get("/api/v1/runs", params={"limit": 100 + i, "before": mid}, headers=h)
                assert len(got.json()) == 100 + i, got.text
                deep.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = c.get("/api/v1/runs", params={"limit": 100, "q": f"old-{i}x"}, headers=h)  # (no match: 5,000 looked at)
                assert got.status_code == 200 and "x-next-before" in got.headers
                found.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = c.get("/api/v1/runs", params={"limit": 1 + i, "counts": "true"}, headers=h)
                assert json.loads(got.headers["x-run-counts"])["FINISHED"] == n
                counts.append(time.perf_counter() - t)
        page = signed_in(browser, s)
        drawn = []
        for _ in range(5):
            t = time.perf_counter()
            page.goto(s.url + "/#/runs")
            page.reload()
            page.wait_for_selector("#runs tbody tr")
            drawn.append(time.perf_counter() - t)
        page.close()
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        return {"runs": n, "ttfb_ms": med(ttfb), "api_runs_ms": med(api), "api_runs_uncached_ms": med(fresh),
                "api_page_half_way_ms": med(deep), "api_search_5000_ms": med(found), "api_counts_ms": med(counts),
                "page_drawn_ms": med(drawn)}
    finally:
        s.close()


def queue_page(browser: Any, nodes: int, active: int, queued: int) -> dict[str, float]:
    """GET /queue (the Queue page, `fedml queue`) with `queued` runs waiting behind `active` running ones that fill
    `nodes` nodes of 8 GPUs: each read after a write and after the view's reuse, so each is built anew."""
    from scheduler.contract.transport import httpx

    s = Server(0, no_agent=True, setup=[QUEUE_SETUP, str(nodes), str(active), str(queued)])
    try:
        h = {"Authorization": f"Bearer {s.token}"}
        took, built, cpu = [], [], []
        with httpx.Client(base_url=s.url, timeout=120) as c:
            q = c.get("/api/v1/queue", params={"limit": 500}, headers=h).json()  # (the scheduler builds its book)
            for _ in range(5):
                # a write, then past the view's reuse (10x what it took to build): the next answer is built anew
                c.post("/api/v1/runs", json={"job": {"job": "echo"}}, headers=h)
                time.sleep(max(2.0, 10 * q["took_s"]) + 0.1)
                c0, t = s.cpu(), time.perf_counter()
                q = c.get("/api/v1/queue", params={"limit": 500}, headers=h).json()
                took.append(time.perf_counter() - t)
                cpu.append(s.cpu() - c0)
                built.append(q["took_s"])
            assert q["total"] >= queued and q["runs"][0]["start_at"] is not None, q["runs"][:1]
        page = signed_in(browser, s)
        t = time.perf_counter()
        page.goto(s.url + "/#/queue")
        page.wait_for_selector("#queue tbody tr")
        drawn = time.perf_counter() - t
        page.close()
        return {"nodes": nodes, "active": active, "queued": queued, "api_queue_ms": statistics.median(took) * 1e3,
                "api_queue_cpu_ms": statistics.median(cpu) * 1e3, "view_built_ms": statistics.median(built) * 1e3,
                "page_drawn_ms": drawn * 1e3}
    finally:
        s.close()


def line_latency(browser: Any, lines: int) -> dict[str, float]:
    s = Server(0, no_agent=False)
    try:
        run = s.launch(f'for i in $(seq 1 {lines}); do echo "t=$(date +%s.%N)"; sleep 0.01; done\nsleep 30')
        page = signed_in(browser, s)
        page.goto(s.url + f"/#/run/{run}")
        page.wait_for_selector("#log")
        # Only lines printed once the page watches (those printed before it opened come with its first read).
        page.evaluate("""() => { window.seen = new Map(); window.t0 = (performance.timeOrigin + performance.now()) / 1000;
            new MutationObserver(() => { const now = (performance.timeOrigin + performance.now()) / 1000;
              for (const r of document.querySelectorAll('#log .row')) { const m = /t=([0-9.]+)/.exec(r.textContent);
                if (m && parseFloat(m[1]) > window.t0 && !window.seen.has(m[1]))
                  window.seen.set(m[1], now - parseFloat(m[1])); } })
            .observe(document.getElementById('log'), {childList: true, subtree: true}); }""")
        deadline = time.monotonic() + 60 + lines * 0.02
        while page.evaluate("window.seen.size") < lines * 0.5 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(lines * 0.015)  # (the rest of them)
        lags = sorted(page.evaluate("[...window.seen.values()]"))
        page.close()
        return {"lines": len(lags), "p50_ms": percentile(lags, 50) * 1e3, "p99_ms": percentile(lags, 99) * 1e3}
    finally:
        s.close()


def big_log(browser: Any, lines: int) -> dict[str, Any]:
    s = Server(0, no_agent=False)
    try:
        run = s.launch(f"seq 1 {lines}")
        from scheduler.contract.transport import httpx

        h = {"Authorization": f"Bearer {s.token}"}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            r = httpx.get(f"{s.url}/api/v1/runs/{run}", headers=h).json()
            if r["status"] in ("FINISHED", "FAILED") and r["log_count"] >= lines:
                break
            time.sleep(1)
        page = signed_in(browser, s)
        loaded = ("p => { const r = document.querySelector(`#log .row[data-pos='${p}']`); "
                  "return r && /\\d$/.test(r.textContent); }")  # that row is drawn, its line read
        t = time.perf_counter()
        page.goto(s.url + f"/#/run/{run}")
        page.wait_for_function(loaded, arg=0, timeout=60_000)
        opened = time.perf_counter() - t
        jumps = []
        for frac in (0.1, 0.5, 0.99, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0):
            t = time.perf_counter()
            page.evaluate("f => { const b = document.getElementById('log'); b.scrollTop = f * b.scrollHeight; }", frac)
            first = page.evaluate("() => Math.floor(document.getElementById('log').scrollTop / 18)")
            page.wait_for_function(loaded, arg=first + 5, timeout=30_000)
            jumps.append(time.perf_counter() - t)
        first_there = bool(page.evaluate(loaded, 0))
        heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null")
        rows = page.locator("#log .row").count()
        page.close()
        return {"lines": lines, "opened_s": opened, "jump_median_ms": statistics.median(jumps) * 1e3,
                "js_heap_mib": heap / 2**20 if heap else None, "rows_in_page": rows,
                "first_line_after_scrolling": first_there}
    finally:
        s.close()


async def _dashboards(url: str, token: str, n: int, stop: asyncio.Event) -> int:
    """n pages: each an event stream, and on each burst of events one read of the runs list and of the counts
    (what the Runs page does). Returns the reads made."""
    from scheduler.contract.transport import httpx

    reads = 0
    h = {"Authorization": f"Bearer {token}"}

    async def one(c: Any) -> None:
        nonlocal reads
        async with c.stream("GET", "/api/v1/events", headers=h, timeout=None) as r:
            async for line in r.aiter_lines():
                if stop.is_set():
                    return
                if line.startswith("event:"):  # the Runs page: its page of runs and the counts per state
                    await c.get("/api/v1/runs", params={"limit": 100, "counts": "true"}, headers=h)
                    reads += 1

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=2 * n + 10)) as c:
        tasks = [asyncio.create_task(one(c)) for _ in range(n)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return reads


def dashboards_cpu(n: int, seconds: float, rate: float) -> dict[str, Any]:
    import threading

    from scheduler.contract.transport import httpx

    s = Server(1000, no_agent=True)
    try:
        h = {"Authorization": f"Bearer {s.token}"}
        out: dict[str, list[float]] = {"none": [], f"{n}": []}
        reads = 0
        for _ in range(2):
            for label in ("none", f"{n}"):
                stop = asyncio.Event()
                loop = asyncio.new_event_loop()
                result: list[int] = []
                th = None
                if label != "none":
                    def pages(loop: Any = loop, stop: asyncio.Event = stop, result: list[int] = result) -> None:
                        result.append(loop.run_until_complete(_dashboards(s.url, s.token, n, stop)))

                    th = threading.Thread(target=pages, daemon=True)
                    th.start()
                    time.sleep(2)
                before, t0 = s.cpu(), time.monotonic()
                made = 0
                with httpx.Client(base_url=s.url, headers=h) as c:  # runs created at `rate` a second
                    while time.monotonic() - t0 < seconds:
                        c.post("/api/v1/runs", json={"job": {"job": "echo hi"}})
                        made += 1
                        time.sleep(max(0.0, t0 + made / rate - time.monotonic()))
                out[label].append((s.cpu() - before) / (time.monotonic() - t0))
                if th is not None:
                    loop.call_soon_threadsafe(stop.set)
                    th.join(timeout=30)
                    reads += result[0] if result else 0
        none, some = statistics.mean(out["none"]), statistics.mean(out[f"{n}"])
        return {"dashboards": n, "create_rate": rate, "cpu_none": none, "cpu_with": some,
                "added_share_of_a_core": some - none, "reads_by_pages": reads}
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--dashboards", type=int, default=100)
    ap.add_argument("--log-lines", type=int, default=1_000_000)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--queue-nodes", type=int, default=1000, help="nodes of 8 GPUs, all busy, for the queue page")
    ap.add_argument("--latency-lines", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=5, help="runs created a second during the CPU measurement")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            results["runs_page"] = r = runs_page(browser, a.runs)
            print(f"runs page, {r['runs']} runs: first byte {r['ttfb_ms']:.1f} ms, GET /runs?limit=100 "
                  f"{r['api_runs_ms']:.1f} ms ({r['api_runs_uncached_ms']:.1f} ms uncached; a page half way back "
                  f"{r['api_page_half_way_ms']:.1f} ms; a search over 5,000 {r['api_search_5000_ms']:.0f} ms; counts "
                  f"{r['api_counts_ms']:.1f} ms), table drawn {r['page_drawn_ms']:.0f} ms", flush=True)
            results["queue_page"] = r = queue_page(browser, a.queue_nodes, a.queue_nodes * 8, a.queued)
            print(f"queue page, {r['queued']} queued behind {r['active']} running on {r['nodes']} nodes: GET /queue "
                  f"built anew {r['api_queue_ms']:.0f} ms ({r['api_queue_cpu_ms']:.0f} ms of scheduler CPU; the view "
                  f"{r['view_built_ms']:.0f} ms), page drawn {r['page_drawn_ms']:.0f} ms", flush=True)
            results["line_latency"] = r = line_latency(browser, a.latency_lines)
            print(f"print -> line on the page ({r['lines']} lines at ~100/s, printed while the page was open): "
                  f"p50 {r['p50_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms", flush=True)
            results["big_log"] = r = big_log(browser, a.log_lines)
            print(f"{r['lines']}-line log: first line shown in {r['opened_s']:.2f} s; a jump {r['jump_median_ms']:.0f} "
                  f"ms (median of 10); after them: "
                  f"JS heap {r['js_heap_mib']:.1f} MiB, {r['rows_in_page']} rows in the page, first line there: "
                  f"{r['first_line_after_scrolling']}", flush=True)
        finally:
            browser.close()
    results["dashboards_cpu"] = r = dashboards_cpu(a.dashboards, a.seconds, a.rate)
    print(f"scheduler CPU, {a.rate:g} runs created a second: none open {r['cpu_none']:.1%} of a core, "
          f"{r['dashboards']} dashboards open {r['cpu_with']:.1%} (+{r['added_share_of_a_core']:.1%}; "
          f"{r['reads_by_pages']} list reads by the pages)", flush=True)
    print(json.dumps({"bench": "dashboard", **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
