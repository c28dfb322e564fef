"""Endpoints: replica states reported by agents, scaling, autoscaling, and the inference gateway.

A deploy/serve run carries an `Endpoint` (models.py): its name, the replica count wanted, the bounds for the
autoscaler and the replica states last reported by the node's serve supervisor (runtime/workloads/serve.py). The gateway
answers `POST /inference/{name}` (FedML's route; `/inference/{name}/{path}` reaches other routes) by
proxying to a ready replica, round robin. A request whose connection to a replica fails before any response
(replica killed, restarting) is retried on the next ready replica, so inference routes are assumed idempotent.
With no ready replica the answer is 503 and says why.

Autoscaling (endpoints whose min_replicas < max_replicas): the gateway keeps, per endpoint, the time-weighted
average number of requests in flight. Every second the scaler computes wanted = ceil(average / target_inflight)
clamped to [min, max]: it scales up as soon as the average over the last 3 s asks for more replicas, and down
only when the average over the last `scale_down_delay` seconds (default 30) asks for fewer, so a short lull
does not drop replicas a burst is about to need.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from . import access
from .contract.errors import BadGateway, Conflict, GatewayTimeout, Invalid, NotFound, Unavailable
from .contract.models import Endpoint, Principal, ReplicaReport, ReplicaState, Run
from .service import Scheduler

UP_WINDOW = 3.0
DOWN_WINDOW = 30.0
HISTORY_S = 610.0  # the longest scale_down_delay (600 s) and some
CACHE_S = 0.5  # how stale the gateway's view of replicas may get (changes through this replica drop it)
SUSPECT_S = 1.0  # a replica whose connection just failed is skipped this long, until its state is reported
# What the gateway answered (rate, latency to the replica's first byte, errors), kept in 10 s buckets for the
# last STATS_S: `fedml endpoint status` and the dashboard's Endpoints page show them.
STATS_S = 300.0
BUCKET_S = 10.0
# Latency histogram bounds: 0.25 ms to ~4.6 min, 4 bins per doubling (a percentile is within 19 % of the truth).
LATENCY_BOUNDS = tuple(0.00025 * 2 ** (i / 4) for i in range(81))

# Hop-by-hop headers (RFC 9110 7.6.1) and ones the proxy sets itself.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "authorization"})


def wanted_replicas(now: int, up: float | None, down: float | None, target: float, lo: int, hi: int) -> int:
    """The autoscaler's rule: `up` / `down` are the average requests in flight over the short (scale-up) and the
    long (scale-down) window (None: not that much history yet). Scale up at once to ceil(up / target); scale down
    only when the whole long window wanted fewer (never below 1); always within [lo, hi]."""
    want = now
    if up is not None and math.ceil(up / target) > now:
        want = math.ceil(up / target)
    elif down is not None and max(1, math.ceil(down / target)) < now:
        want = max(1, math.ceil(down / target))
    return min(max(want, lo), hi)


class Load:
    """Requests in flight for one endpoint, integrated over time (Little's law) for the autoscaler."""

    def __init__(self) -> None:
        self.inflight = 0
        self.total = 0
        self._integral = 0.0
        self._last = time.monotonic()
        self.samples: deque[tuple[float, float]] = deque()  # (time, integral)
        self.answers: deque[list[Any]] = deque()  # [bucket number, requests, errors, latency histogram]
        # Since the start, for GET /metrics (Prometheus takes rates itself): answers, errors, latency histogram.
        self.answered_total = 0
        self.errors_total = 0
        self.latency_total = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def _advance(self) -> None:
        now = time.monotonic()
        self._integral += self.inflight * (now - self._last)
        self._last = now

    def enter(self) -> None:
        self._advance()
        self.inflight += 1
        self.total += 1

    def leave(self) -> None:
        self._advance()
        self.inflight -= 1

    def answered(self, seconds: float, ok: bool) -> None:
        """One request answered (`ok`: below 500), `seconds` after it arrived (to the replica's first byte)."""
        n = int(time.monotonic() // BUCKET_S)
        if not self.answers or self.answers[-1][0] != n:
            self.answers.append([n, 0, 0, [0] * (len(LATENCY_BOUNDS) + 1)])
            while self.answers[0][0] <= n - STATS_S / BUCKET_S:
                self.answers.popleft()
        b = self.answers[-1]
        i = bisect.bisect_left(LATENCY_BOUNDS, seconds)
        b[1] += 1
        b[2] += 0 if ok else 1
        b[3][i] += 1
        self.answered_total += 1
        self.errors_total += 0 if ok else 1
        self.latency_total[i] += 1
        self.latency_sum += seconds

    def stats(self) -> dict[str, float | int | None]:
        """Over the last STATS_S: requests per second, p50 and p99 latency (ms; None with no request), errors."""
        n = int(time.monotonic() // BUCKET_S)
        recent = [b for b in self.answers if b[0] > n - STATS_S / BUCKET_S]
        total = sum(b[1] for b in recent)
        hist = [sum(col) for col in zip(*(b[3] for b in recent), strict=True)] if recent else []

        def pct(q: float) -> float | None:
            if not total:
                return None
            seen = 0
            for i, c in enumerate(hist):
                seen += c
                if seen >= q * total:
                    return round(1000 * LATENCY_BOUNDS[min(i, len(LATENCY_BOUNDS) - 1)], 2)
            return None

        return {"window_s": STATS_S, "rate": round(total / STATS_S, 3), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "errors": sum(b[2] for b in recent), "answered": total}

    def sample(self) -> None:
        self._advance()
        self.samples.append((self._last, self._integral))
        while self.samples and self.samples[0][0] < self._last - HISTORY_S:
            self.samples.popleft()

    def average(self, window: float) -> float | None:
        """Average in-flight over the last `window` seconds; None until that much history exists."""
        if len(self.samples) < 2:
            return None
        t1, i1 = self.samples[-1]
        for t0, i0 in self.samples:  # oldest first: the first inside the window spans the most of it
            if t1 - t0 <= window + 0.01:
                return (i1 - i0) / (t1 - t0) if t1 - t0 >= window * 0.9 else None
        return None


class Endpoints:
    """Endpoint management over the scheduler's store (sync; called from FastAPI's thread pool)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.store = sched.store
        self.loads: dict[str, Load] = {}  # run id -> load
        self._cache: tuple[float, dict[str, Run]] | None = None
        self._gen = 0  # bumped by changed(): a view read before a change is not kept after it
        self._lock = threading.Lock()
        self._rr: dict[str, itertools.count[int]] = {}
        self._suspect: dict[tuple[str, int, int], float] = {}  # (run, replica, port) -> until

    listen: tuple[str, int] | None = None  # the scheduler's own address (set by create_app)

    def _is_own(self, address: str, port: int) -> bool:
        if self.listen is None or port != self.listen[1]:
            return False
        host = self.listen[0]
        return host in ("0.0.0.0", "::", "") or address == host or address.startswith("127.") or address in (
            "localhost", "::1")

    # -- lookup --------------------------------------------------------------------------------------------
    def by_name(self) -> dict[str, Run]:
        cached = self._cache
        if cached is None or time.monotonic() - cached[0] > CACHE_S:
            gen = self._gen
            runs = self.store.endpoint_runs()
            cached = (time.monotonic(), {r.endpoint.name: r for r in runs if r.endpoint is not None})
            if gen == self._gen:  # else a stop or launch landed while we read: the next look reads again
                self._cache = cached
        return cached[1]

    def changed(self) -> None:
        self._gen += 1
        self._cache = None
        self.sched.notifier.notify("endpoints")  # (open dashboards' Endpoints pages: routes/ui.py events)

    def fresh(self) -> bool:
        cached = self._cache
        return cached is not None and time.monotonic() - cached[0] <= CACHE_S

    def named(self, name: str) -> Run | None:
        """The live endpoint called `name`. A name not in the cached view triggers one fresh look (an endpoint
        launched a moment ago through another replica), at most every 0.1 s."""
        run = self.by_name().get(name)
        cached = self._cache
        if run is None and cached is not None and time.monotonic() - cached[0] > 0.1:
            self._cache = None
            run = self.by_name().get(name)
        return run

    def find(self, ref: str, who: Principal) -> Run:
        """An endpoint by name, or by its run's id (a finished one too)."""
        run = self.named(ref)
        if run is None and ref.startswith("run-"):
            run = self.store.get_run(ref)
            if run is not None and run.endpoint is None:
                raise NotFound(f"run {ref} is not an endpoint (job_type {run.job.job_type})")
        if run is None or not access.may_see_run(who, run):
            raise NotFound(f"endpoint {ref} not found (`fedml endpoint list` shows them)")
        return run

    def list(self, who: Principal) -> list[Run]:
        access.require_not_node(who, "list endpoints")
        return sorted((r for r in self.by_name().values() if access.may_see_run(who, r)), key=lambda r: r.created_at)

    # -- agents' reports -------------------------------------------------------------------------------------
    def report(self, run_id: str, rep: ReplicaReport, node_id: str, who: Principal) -> Run:
        access.require_acts_for_node(who, node_id)
        node = self.store.get_node(node_id)
        with self.sched.run_lock(run_id):
            run = self.store.get_run(run_id)
            if run is None or run.endpoint is None:
                raise NotFound(f"endpoint run {run_id} not found")
            if rep.attempt != run.attempt or run.placement_on(node_id) is None:
                raise Conflict(f"run {run_id} attempt {rep.attempt} is not placed on node {node_id}")
            if run.terminal:
                return run
            # Only the address the scheduler knows for the node (user-joined nodes: where they connect from), and
            # never our own listener or a privileged port: a node's report cannot make the gateway a proxy into
            # the scheduler's API or the head's other services (docs/security.md).
            address = node.address if node else "127.0.0.1"
            for r in rep.replicas:
                if not 1024 <= r.port <= 65535 or self._is_own(address, r.port):
                    raise Invalid(f"replica {r.index}: port {r.port} is not one an agent assigns to replicas")
            states = [r.model_copy(update={"node_id": node_id, "address": address}) for r in rep.replicas]
            ep = run.endpoint.model_copy(update={"states": states, "attempt": rep.attempt})
            run = self.store.update_run(run_id, endpoint=ep)
        self.changed()
        return run

    # -- scaling ----------------------------------------------------------------------------------------------
    def scale(self, ref: str, who: Principal, replicas: int | None = None, min_replicas: int | None = None,
              max_replicas: int | None = None) -> Run:
        """`replicas` alone fixes the count (autoscaling off); min/max set the autoscaler's bounds."""
        access.require_not_node(who, "scale")
        run = self.find(ref, who)
        with self.sched.run_lock(run.id):
            run = self.store.get_run(run.id) or run
            if run.terminal or run.endpoint is None:
                raise Conflict(f"endpoint {ref} has ended ({run.status.value})")
            ep = run.endpoint
            lo, hi = ep.min_replicas, ep.max_replicas
            if replicas is not None and min_replicas is None and max_replicas is None:
                lo = hi = replicas
            lo = lo if min_replicas is None else min_replicas
            hi = hi if max_replicas is None else max_replicas
            if lo > hi:
                raise Invalid(f"min_replicas ({lo}) is above max_replicas ({hi})")
            if hi > 64:
                raise Invalid(f"at most 64 replicas per endpoint (asked for {hi})")
            want = min(max(ep.replicas if replicas is None else replicas, lo), hi)
            if replicas is not None and want != replicas:
                raise Invalid(f"replicas ({replicas}) must be between min_replicas ({lo}) and max_replicas ({hi})")
            run = self._set(run, ep.model_copy(update={"replicas": want, "min_replicas": lo, "max_replicas": hi}))
        return run

    def _set(self, run: Run, ep: Endpoint) -> Run:
        run = self.store.update_run(run.id, endpoint=ep)
        self.changed()
        self.sched.run_changed(run)  # wakes the node's long poll: it learns the new count at once
        return run

    def autoscale_pass(self) -> list[tuple[str, int, int]]:
        """One look at every autoscaled endpoint. Returns the changes made: (name, old, new)."""
        changes = []
        for name, run in list(self.by_name().items()):
            load = self.loads.setdefault(run.id, Load())
            load.sample()
            ep = run.endpoint
            if ep is None or not ep.autoscale or run.terminal:
                continue
            want = wanted_replicas(ep.replicas, load.average(UP_WINDOW), load.average(ep.scale_down_delay),
                                   ep.target_inflight, ep.min_replicas, ep.max_replicas)
            if want != ep.replicas:
                with self.sched.run_lock(run.id):
                    fresh = self.store.get_run(run.id)
                    if fresh is None or fresh.endpoint is None or fresh.terminal:
                        continue
                    self._set(fresh, fresh.endpoint.model_copy(update={"replicas": want}))
                changes.append((name, ep.replicas, want))
        live = {r.id for r in self.by_name().values()}
        now = time.monotonic()
        for rid in [rid for rid in self.loads if rid not in live]:
            del self.loads[rid]
        for rid in [rid for rid in self._rr if rid not in live]:
            del self._rr[rid]
        for k in [k for k, until in self._suspect.items() if until < now]:
            del self._suspect[k]
        return changes

    # -- routing ----------------------------------------------------------------------------------------------
    def route(self, name: str, who: Principal) -> tuple[Run, list[ReplicaState]]:
        """The endpoint's run and its ready replicas, in the order to try them (round robin)."""
        run = self.named(name)
        ready = self._ready(run) if run is not None else []
        if run is not None and not ready:
            # Before saying 503, read the run itself: the cached view may predate its end or a replica's readiness.
            run = self.live(run.id)
            ready = self._ready(run) if run is not None else []
        if run is None or not access.may_use_endpoint(who, run):
            raise NotFound(f"no endpoint named {name}")
        ep = run.endpoint
        assert ep is not None
        if not ready:
            states = ", ".join(f"{r.index}: {r.state}" for r in ep.states if ep.attempt == run.attempt)
            raise Unavailable(f"endpoint {name} has no ready replica ("
                                f"{'replicas ' + states if states else run.status.value.lower()}); retry later")
        start = next(self._rr.setdefault(run.id, itertools.count()))
        k = start % len(ready)
        return run, ready[k:] + ready[:k]

    def _ready(self, run: Run) -> list[ReplicaState]:
        ep = run.endpoint
        now = time.monotonic()
        return [r for r in ep.ready() if ep.attempt == run.attempt
                and self._suspect.get((run.id, r.index, r.port), 0.0) < now] if ep is not None else []

    def live(self, run_id: str) -> Run | None:
        """The run as the store has it now (not the cached view), or None when it has ended or is gone."""
        fresh = self.store.get_run(run_id)
        if fresh is None or fresh.terminal:
            self.changed()
            return None
        return fresh

    def suspect(self, run: Run, r: ReplicaState) -> None:
        self._suspect[(run.id, r.index, r.port)] = time.monotonic() + SUSPECT_S


class Gateway:
    """The async proxy in front of the replicas: one pooled aiohttp session for all of them (httpx's async
    client costs ~10x more per request here: see bench/gateway.py)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.session: Any = None  # made in the serving event loop, on first use

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _session(self) -> Any:
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=60),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        return self.session

    async def forward(self, name: str, path: str, method: str, headers: Any, query: str, body: bytes,
                      who: Principal) -> tuple[int, list[tuple[str, str]], bytes | AsyncIterator[bytes]]:
        import aiohttp
        from starlette.concurrency import run_in_threadpool

        eps = self.endpoints
        if eps.fresh():  # the common case: routing is a lookup in memory
            run, order = eps.route(name, who)
        else:  # the view is reloaded from the store: not in the event loop
            run, order = await run_in_threadpool(eps.route, name, who)
        assert run.endpoint is not None  # routed: a serving run
        timeout = run.endpoint.request_timeout
        target = path or run.endpoint.predict_path
        send_headers = [(k, v) for k, v in headers if k.lower() not in _HOP]
        session = self._session()
        load = eps.loads.setdefault(run.id, Load())
        load.enter()
        began = time.monotonic()
        try:
            last_error = ""
            for r in order:
                url = f"http://{r.address}:{r.port}{target}" + (f"?{query}" if query else "")
                try:
                    resp = await session.request(method, url, data=body, headers=send_headers, allow_redirects=False,
                                                 timeout=aiohttp.ClientTimeout(sock_connect=2.0, sock_read=timeout))
                except (TimeoutError, aiohttp.ServerTimeoutError):
                    raise GatewayTimeout(f"endpoint {name}: replica {r.index} did not answer within "
                                        f"{timeout:g} s (service.request_timeout)") from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    # Nothing came back: the replica died or is restarting. Try the next one.
                    eps.suspect(run, r)
                    last_error = f"replica {r.index}: {type(exc).__name__}"
                    continue
                out_headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP]
                out_headers.append(("x-fedml-replica", str(r.index)))
                if resp.content_length is not None:  # a plain answer: read it whole (cheaper than streaming)
                    try:
                        content = await resp.read()
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        raise BadGateway(f"endpoint {name}: replica {r.index} broke off its answer "
                                            f"({type(exc).__name__})") from None
                    finally:
                        resp.release()
                    load.answered(time.monotonic() - began, resp.status < 500)
                    load.leave()
                    return resp.status, out_headers, content
                load.answered(time.monotonic() - began, resp.status < 500)  # (streamed: to its first byte)
                return resp.status, out_headers, _body(resp, _Once(load.leave))  # chunked, SSE: streamed
            if await run_in_threadpool(eps.live, run.id) is None:  # replicas refuse: the endpoint was just stopped
                raise NotFound(f"no endpoint named {name}")
            raise Unavailable(f"endpoint {name}: no replica answered ({last_error}); retry later")
        except BaseException as exc:
            if isinstance(exc, GatewayTimeout | Unavailable | BadGateway):
                load.answered(time.monotonic() - began, False)
            load.leave()
            raise


class _Once:
    def __init__(self, fn: Any) -> None:
        self.fn, self.done = fn, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.fn()


async def _body(resp: Any, done: _Once) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    finally:
        done()
        resp.release()
