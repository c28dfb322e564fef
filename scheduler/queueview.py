"""Where each queued run stands: its place in line, who is ahead of it on the GPUs it could use, and when it may
start (pure: no store, no clock; scheduler/service/queue.py feeds it).

The estimate is Slurm's kind (`squeue --start`), made simple: every GPU has a time it is free from (now, or when
the run holding it is expected to end), and the queue is walked in the order passes consider it. A run of g GPUs
on n nodes starts when n nodes it may use each have g matching GPUs free; it then holds them for its expected
duration. Expected durations: the job's `max_duration` (an upper bound: it is stopped then), else the median of
its name's finished runs for that owner ("history"), else none, and then no run behind it on those GPUs has an
estimate either: the answer says whose run gave no basis. A run charged to its team's quota also waits until
the team's runs (those running, and those booked before it in the walk) hold few enough of it: its nominal
quota (borrowing idle quota of other teams may start it sooner). Runs that arrive later with a higher priority,
preemptions, and backfill into gaps make real starts differ; the dashboard and `fedml queue` say "about".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

INF = math.inf
BASIS = "the expected ends of the runs before it (their max_duration, or how long their name ran before)"


@dataclass(slots=True)
class Entry:
    """One queued run, in queue order."""

    run_id: str
    owner: str
    shape: Hashable  # runs of one shape could use the same nodes (placement.Request)
    gpus: int  # per node
    count: int  # nodes
    duration: float | None  # expected seconds it runs, when there is a basis
    basis: str | None  # "max_duration" | "history"
    quota: str | None = None  # the team quota it is charged to (a key of `quotas` in stand())


@dataclass(slots=True)
class Gpu:
    free_at: float  # from when it is free (now, the end expected of its run, INF with no basis)
    why: str | None = None  # with INF: whose run gives no basis


@dataclass(slots=True)
class Standing:
    position: int  # 1 = next
    ahead_runs: int = 0  # queued before it that could use some of the same nodes
    ahead_gpus: int = 0
    ahead_owners: dict[str, list[int]] = field(default_factory=dict)  # owner -> [runs, gpus]
    start_at: float | None = None
    basis: str | None = None  # what the estimate rests on
    no_basis: str | None = None  # why there is none


@dataclass(slots=True)
class Quota:
    """A team quota as the walk books it: its limit, and when each GPU charged to it is expected free (one time
    per GPU; INF: its run has no expected end, `why`)."""

    limit: int
    free_at: list[float] = field(default_factory=list)
    why: str | None = None


def stand(entries: list[Entry], gpus: dict[str, dict[int, Gpu]], eligible: Callable[[Hashable], dict[str, list[int]]],
          *, now: float, estimate_first: int = 500, quotas: dict[str, Quota] | None = None) -> list[Standing]:
    """The standing of each entry (same order). `gpus`: node -> GPU index -> Gpu (mutated: the walk books GPUs).
    `eligible(shape)`: node -> the GPU indexes of that node the shape may use (nodes it may never use absent).
    `quotas`: the team quotas entries are charged to (mutated likewise). Start times are estimated for the first
    `estimate_first` entries."""
    out: list[Standing] = []
    ids: dict[Hashable, int] = {}  # shapes by a small number: hashing a shape (a Request) per pair is slow
    nodes_of: list[dict[str, list[int]]] = []
    overlap: dict[tuple[int, int], bool] = {}
    seen: dict[int, dict[str, list[int]]] = {}  # per shape: owner -> [runs, gpus] so far
    timeline = _Timeline(gpus, quotas or {})
    for i, e in enumerate(entries):
        sid = ids.get(e.shape)
        if sid is None:
            sid = ids[e.shape] = len(ids)
            nodes_of.append(eligible(e.shape))
        mine = nodes_of[sid]
        st = Standing(position=i + 1)
        for other, owners in seen.items():
            hit = overlap.get((other, sid))
            if hit is None:
                hit = overlap[(other, sid)] = other == sid or not nodes_of[other].keys().isdisjoint(mine.keys())
            if hit:
                for owner, (runs, g) in owners.items():
                    got = st.ahead_owners.get(owner)
                    if got is None:
                        st.ahead_owners[owner] = [runs, g]
                    else:
                        got[0] += runs
                        got[1] += g
        st.ahead_runs = sum(v[0] for v in st.ahead_owners.values())
        st.ahead_gpus = sum(v[1] for v in st.ahead_owners.values())
        tally = seen.setdefault(sid, {}).setdefault(e.owner, [0, 0])
        tally[0] += 1
        tally[1] += e.gpus * e.count
        if i < estimate_first:
            timeline.estimate(e, st, mine, now)
        else:
            st.no_basis = f"only the first {estimate_first} in line get an estimate"
        out.append(st)
    return out


class _Timeline:
    """When each node could next give a shape its GPUs: per (shape, GPUs a node) a heap of (time, node), kept
    lazily (a node whose GPUs were booked since its entry was pushed is looked at again when it comes up), so an
    entry costs O(nodes it books x log nodes), not a look at every node."""

    def __init__(self, gpus: dict[str, dict[int, Gpu]], quotas: dict[str, Quota]) -> None:
        self.gpus, self.quotas = gpus, quotas
        self.version: dict[str, int] = {}
        self.heaps: dict[tuple[Hashable, int], list[tuple[float, str, int]]] = {}  # (time, node, version)
        self.pushed: dict[tuple[Hashable, int, str], int] = {}  # the version of a node's newest entry in a heap

    def _ready_at(self, node: str, idx: list[int], g: int) -> list[Gpu] | None:
        have = self.gpus.get(node, {})
        free = sorted((have[i] for i in idx if i in have), key=lambda x: x.free_at)
        return free[:g] if len(free) >= g else None

    def estimate(self, e: Entry, st: Standing, mine: dict[str, list[int]], now: float) -> None:
        if not mine:
            st.no_basis = "no node it may use"
            return
        if e.gpus == 0:  # CPU work waits for a node, not for GPUs: no GPU timeline to go by
            st.start_at, st.basis = now, "no GPUs asked"
            return
        key = (e.shape, e.gpus)
        heap = self.heaps.get(key)
        if heap is None:
            heap = []
            for node, idx in mine.items():
                got = self._ready_at(node, idx, e.gpus)
                if got is not None:
                    heap.append((got[-1].free_at, node, self.version.get(node, 0)))
                    self.pushed[(*key, node)] = self.version.get(node, 0)
            heapq.heapify(heap)
            self.heaps[key] = heap
        chosen: list[tuple[float, str, list[Gpu]]] = []
        while len(chosen) < e.count and heap:
            t, node, ver = heapq.heappop(heap)
            now_ver = self.version.get(node, 0)
            if ver != now_ver:  # booked since: its time has moved (one entry per node at its newest version)
                if self.pushed.get((*key, node)) != now_ver:
                    again = self._ready_at(node, mine[node], e.gpus)
                    if again is not None:
                        heapq.heappush(heap, (again[-1].free_at, node, now_ver))
                        self.pushed[(*key, node)] = now_ver
                continue
            got = self._ready_at(node, mine[node], e.gpus)
            if got is None:
                continue
            chosen.append((t, node, got))
        if len(chosen) < e.count:
            for t, node, _ in chosen:
                heapq.heappush(heap, (t, node, self.version.get(node, 0)))  # (the same version: still the newest)
            st.no_basis = f"fewer than {e.count} node(s) it may use have {e.gpus} such GPU(s)"
            return
        start = max(now, chosen[-1][0])
        quota = self.quotas.get(e.quota) if e.quota else None
        if quota is not None and start != INF:  # and when its team holds few enough of its quota
            times = sorted(quota.free_at)
            over = len(times) + e.gpus * e.count - quota.limit
            if over > 0 and (over > len(times) or times[over - 1] == INF):
                for t, node, _ in chosen:  # (not booked: the nodes stay as they were for the next entry)
                    heapq.heappush(heap, (t, node, self.version.get(node, 0)))
                st.no_basis = "more GPUs than its team's quota" if over > len(times) else \
                    quota.why or "its team's quota is held by runs with no expected end"
                return
            if over > 0:
                start = max(start, times[over - 1])
        if start == INF:
            blocker = next((g.why for _, _, got in chosen for g in got if g.free_at == INF and g.why), None)
            st.no_basis = blocker or "a run ahead of it has no expected end"
        else:
            st.start_at = start
            st.basis = "free now" if start <= now else BASIS
        end = INF if e.duration is None or start == INF else start + e.duration
        why = None if e.duration is not None else \
            f"{e.run_id} ({e.owner}) has no max_duration and no finished run to go by"
        if quota is not None:  # the GPUs freed by then are no longer charged; its own are, until its end
            quota.free_at = [t for t in quota.free_at if t > start] + [end] * (e.gpus * e.count)
            if end == INF and quota.why is None:
                quota.why = why
        for _, node, got in chosen:
            for g in got:
                if end == INF:
                    g.free_at, g.why = INF, g.why if start == INF else why
                else:
                    g.free_at, g.why = end, None
            self.version[node] = self.version.get(node, 0) + 1
            again = self._ready_at(node, mine[node], e.gpus)
            if again is not None:
                heapq.heappush(heap, (again[-1].free_at, node, self.version[node]))
                self.pushed[(*key, node)] = self.version[node]


def median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
