"""GET /metrics: the scheduler's state and what it has done, in Prometheus' text format (prometheus-client), for
an admin key or a metrics key (`fedml scheduler key create NAME --metrics`: a key that reads this and nothing
else). deploy/grafana/ holds a dashboard on these series; docs/metrics.md lists them.

State (runs by state, nodes, GPUs, endpoints' replicas) is read from the store when scraped and is the same from
every replica; counters (placements, runs created, heartbeats, log lines, queue waits, gateway answers) are this
process's since it started, labelled by nothing else: Prometheus sums replicas and takes rates itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .. import access
from .. import auth as keys
from ..contract.models import RunStatus
from ..gateway import LATENCY_BOUNDS
from ..service.core import WAIT_BOUNDS
from .deps import Ctx, ctx

router = APIRouter(include_in_schema=False)
GATEWAY_BINS = range(0, len(LATENCY_BOUNDS), 4)  # a bucket per doubling (0.25 ms .. 4.6 min): 21 per endpoint


class _State(Collector):
    def __init__(self, c: Ctx) -> None:
        self.c = c

    def collect(self) -> Iterator[Any]:
        c, now = self.c, time.time()
        counts = c.store.count_runs()
        runs = GaugeMetricFamily("fedml_runs", "Runs in each state (all owners)", labels=["state"])
        for st in RunStatus:
            runs.add_metric([st.value], counts.get(st.value, 0))
        yield runs
        nodes = c.sched.nodes()
        seen = c.store.heartbeats()
        states = {"online": 0, "offline": 0, "draining": 0}
        gpus_total = 0
        for n in nodes:
            up = n.state != "OFFLINE" and now - c.sched.last_seen(n, seen) <= c.sched.heartbeat_timeout
            states["draining" if up and n.draining else "online" if up else "offline"] += 1
            gpus_total += len(n.gpus)
        g = GaugeMetricFamily("fedml_nodes", "Nodes by state", labels=["state"])
        for k, v in states.items():
            g.add_metric([k], v)
        yield g
        held = sum(len(on) for on in c.sched.gpus_held().values())
        g = GaugeMetricFamily("fedml_gpus", "GPUs of all nodes: total, held by a run, used by a process of no run",
                              labels=["state"])
        g.add_metric(["total"], gpus_total)
        g.add_metric(["held"], held)
        g.add_metric(["busy_outside"], sum(len(n.gpus_busy_outside) for n in nodes))
        yield g
        yield from _per_gpu(c, {n.id: n.name for n in nodes}, now)

        done, waits, wait_sum = c.sched.tally.snapshot()
        for name, what in (("placements", "Runs placed (an attempt each)"), ("runs_created", "Runs created"),
                           ("heartbeats", "Agents' polls (heartbeats) answered"),
                           ("log_lines", "Log lines received from agents"),
                           ("preemptions", "Runs preempted (stopped for a run that outranks them)")):
            yield CounterMetricFamily(f"fedml_{name}", what, value=done[name])
        yield HistogramMetricFamily("fedml_queue_wait_seconds", "From submission to a first placement",
                                    buckets=_cumulative(WAIT_BOUNDS, waits), sum_value=wait_sum)

        names = {run.id: name for name, run in c.endpoints.by_name().items()}
        requests = CounterMetricFamily("fedml_gateway_requests", "Requests the gateway answered", labels=["endpoint"])
        errors = CounterMetricFamily("fedml_gateway_errors", "Of those: 5xx, timeouts, no replica answering",
                                     labels=["endpoint"])
        inflight = GaugeMetricFamily("fedml_gateway_inflight", "Requests in flight", labels=["endpoint"])
        latency = HistogramMetricFamily("fedml_gateway_latency_seconds", "To the replica's first byte",
                                        labels=["endpoint"])
        ready = GaugeMetricFamily("fedml_endpoint_replicas", "Replicas wanted and ready", labels=["endpoint", "state"])
        for run_id, load in list(c.endpoints.loads.items()):
            name = names.get(run_id)
            if name is None:
                continue  # (an endpoint that ended: its series stop)
            requests.add_metric([name], load.answered_total)
            errors.add_metric([name], load.errors_total)
            inflight.add_metric([name], load.inflight)
            seen = load.latency_total  # (bin i: up to LATENCY_BOUNDS[i]; the last, above them all)
            latency.add_metric([name], [(repr(LATENCY_BOUNDS[i]), sum(seen[:i + 1])) for i in GATEWAY_BINS]
                               + [("+Inf", sum(seen))], load.latency_sum)
        for name, run in c.endpoints.by_name().items():
            ep = run.endpoint
            if ep is None:
                continue
            ready.add_metric([name, "wanted"], ep.replicas)
            ready.add_metric([name, "ready"], sum(1 for r in ep.states if r.state == "ready") if
                             ep.attempt == run.attempt else 0)
        yield from (requests, errors, inflight, latency, ready)


def _per_gpu(c: Ctx, names: dict[str, str], now: float) -> Iterator[Any]:
    """Every GPU's latest NVML sample that this process got from its node's agent (fresh ones only)."""
    labels = ["node", "gpu"]
    fams = {"util": GaugeMetricFamily("fedml_gpu_utilization_ratio", "Busy share of the last sample", labels=labels),
            "used": GaugeMetricFamily("fedml_gpu_memory_used_bytes", "Memory in use", labels=labels),
            "total": GaugeMetricFamily("fedml_gpu_memory_total_bytes", "Memory", labels=labels),
            "power": GaugeMetricFamily("fedml_gpu_power_watts", "Power draw", labels=labels),
            "temp": GaugeMetricFamily("fedml_gpu_temperature_celsius", "Temperature", labels=labels),
            "procs": GaugeMetricFamily("fedml_gpu_processes", "Compute processes, and of those of no run",
                                       labels=[*labels, "owner"]),
            "ecc": GaugeMetricFamily("fedml_gpu_ecc_uncorrected", "Uncorrected ECC errors (volatile)", labels=labels)}
    xids = CounterMetricFamily("fedml_gpu_xid_errors", "Critical (XID) errors its agent reported", labels=labels)
    for (node_id, index), n in c.sched.xid_counts().items():
        if node_id in names:
            xids.add_metric([names[node_id], str(index)], n)
    for node_id, (at, samples) in c.sched.gpu_samples().items():
        name = names.get(node_id)
        if name is None or now - at > c.sched.heartbeat_timeout:
            continue
        for s in samples:
            key = [name, str(s.index)]
            for fam, value in (("util", None if s.util is None else s.util / 100), ("power", s.power_w),
                               ("temp", s.temp_c), ("ecc", s.ecc_uncorrected),
                               ("used", None if s.mem_used_mb is None else s.mem_used_mb * 1024 * 1024),
                               ("total", None if s.mem_total_mb is None else s.mem_total_mb * 1024 * 1024)):
                if value is not None:
                    fams[fam].add_metric(key, value)
            fams["procs"].add_metric([*key, "run"], len(s.pids) - len(s.outside))
            fams["procs"].add_metric([*key, "none"], len(s.outside))
    yield from fams.values()
    yield xids


def _cumulative(bounds: tuple[float, ...], per: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (one more than bounds: the last above them all) as Prometheus' cumulative buckets."""
    out, total = [], 0
    for bound, n in zip(bounds, per, strict=False):
        total += n
        out.append((repr(bound), total))
    out.append(("+Inf", sum(per)))
    return out


@router.get("/metrics")
def metrics(request: Request, c: Ctx = Depends(ctx)) -> Response:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    who = keys.verify(c.store, given.strip()) if scheme.lower() == "bearer" and given.strip() else None
    if who is None:
        return JSONResponse({"detail": "an admin or metrics key is needed (Authorization: Bearer ...)"},
                            status_code=401, headers={"www-authenticate": "Bearer"})
    if not access.may_read_metrics(who):
        return JSONResponse({"detail": "only an admin or metrics key reads /metrics (`fedml scheduler key create "
                                       "NAME --metrics`)"}, status_code=403)
    registry = CollectorRegistry(auto_describe=False)  # (one per scrape: it holds nothing but the collector)
    registry.register(_State(c))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
