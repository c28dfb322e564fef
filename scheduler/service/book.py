"""The scheduler's in-memory view of what placement needs: queued runs grouped by request shape, and the GPUs
that active runs hold. It follows the store's change feed (Store.runs_changed_since), so a pass reads only the
runs written since the last one, by this replica or any other, instead of the whole queue and every active run.

The store stays the source of truth: the view is rebuilt from it on start and every BOOK_REBUILD_S (5 min), every
change is applied as the run's current state (idempotent: a run seen twice is the same), and a placement made from
a stale view is refused by the store's compare-and-set (GpuBusy, InvalidTransition).

Shapes (placement.Request: GPUs, model, labels, gang size, owner...) are Slurm's and Kueue's equivalence
classes: every run of a shape gets the same answer from placement, so a pass asks once per shape and a shape
that found no room is skipped for the rest of the pass. Within a shape runs wait in a heap by (priority, age):
the next one is found in O(log n).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..contract.models import Run, RunStatus
from ..placement import Request
from .core import ACTIVE

_ACTIVE = frozenset(ACTIVE)


def _gate(run: Run) -> str | None:
    """The sweep whose max_parallel holds this run back, if any."""
    return run.sweep.id if run.sweep is not None and run.sweep.max_parallel else None


def order(run: Run) -> tuple[float, float, str]:
    """Queue order: higher priority first, then first come, first served."""
    return (-run.priority, run.created_at, run.id)


@dataclass(slots=True)
class Waiting:
    """What a pass needs of a queued run (a whole Run with its job spec is ~10 KB; the book holds thousands)."""

    id: str
    attempt: int
    reason: str | None  # as stored
    last_reason: str | None  # why its previous attempt ended (for the log line of the next one)

    @classmethod
    def of(cls, run: Run) -> Waiting:
        return cls(run.id, run.attempt, run.reason, run.attempts[-1].reason if run.attempts else None)


@dataclass(slots=True)
class Holder:
    """What preemption needs of an active run that holds GPUs (scheduler/service/preempting.py)."""

    team: str | None
    owner: str
    priority: int
    preemptible: bool  # its job's preemptible, and no stop asked of it
    quota_key: str | None
    gpus: int  # GPUs it holds in all
    started: float  # when its attempt was placed (or started)
    preempted_by: str | None  # while PREEMPTED: the run it makes room for
    grace: float  # its job's preemption.grace


class Shape:
    __slots__ = ("req", "heap", "reason")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.heap: list[tuple[tuple[float, float, str], str]] = []
        self.reason: str | None = None  # the reason every queued run of the shape is known to carry


class Book:
    def __init__(self, seq: int) -> None:
        self.seq = seq  # the store's change counter this view has applied up to
        self.queued: dict[str, tuple[Waiting, Request, tuple[float, float, str]]] = {}
        self.shapes: dict[Request, Shape] = {}
        self.claims: dict[str, dict[str, set[int]]] = {}  # active run -> node -> GPUs it holds
        self.held: dict[str, dict[int, str]] = {}  # node -> GPU -> the run holding it
        self.charged: dict[str, tuple[str, int]] = {}  # active run -> (its quota key, GPUs it holds against it)
        self.quota_held: dict[str, int] = {}  # quota key "team\tbucket" -> GPUs its active runs hold
        self.holders: dict[str, Holder] = {}  # active runs holding GPUs
        self.of_team: dict[str | None, set[str]] = {}  # team -> its runs in holders
        # team -> priority -> how many of its holders may be preempted (a pass asks "any below P?" per shape)
        self.preemptible: dict[str | None, dict[int, int]] = {}
        self.queued_priorities: dict[str | None, dict[int, int]] = {}  # team -> priority -> its queued runs
        # Preemptions under way: the waiting run -> the runs being stopped for it (PREEMPTED); and when the last
        # of them stopped (the pass tries it first for a while: the GPUs were freed for it)
        self.preempting: dict[str, set[str]] = {}
        self.freed_for: dict[str, float] = {}
        self.dirty: set[str] = set()  # nodes whose held GPUs changed since the pass last looked
        # Runs applied as this scheduler wrote them: run id -> the store's change counter of that write. The
        # change feed leaves a run out while its last write is that one (Store.runs_changed_since's `known`):
        # a freed slot's report and placement are not read back and parsed again.
        self.own: dict[str, int] = {}
        self.live: set[str] = set()  # queued and active runs: a dependency among them has not ended
        self.waiting_for: dict[str, Run] = {}  # queued runs with dependencies (Run.after), not in a shape yet
        # Sweeps with max_parallel: the runs let into the queue (queued in a shape, or active), and those held
        # back until fewer than max_parallel are (release_sweeps).
        self.sweep_open: dict[str, set[str]] = {}
        self.gated: dict[str, dict[str, Run]] = {}

    @classmethod
    def build(cls, seq: int, runs: Iterable[Run]) -> Book:
        book = cls(seq)
        for run in runs:
            book.apply(run)
        return book

    # -- changes -------------------------------------------------------------------------------------------
    def apply(self, run: Run) -> None:
        """Take `run` as it is now in the store (as read, or as a write of this scheduler just returned it)."""
        version = run.version
        if version is not None and version > self.seq:
            self.own[run.id] = version
        elif self.own:
            self.own.pop(run.id, None)
        before = self.queued.pop(run.id, None)
        if before is not None:
            self._count_queued(before[1].team, -int(before[2][0]), -1)
        self._release(run.id)
        self.waiting_for.pop(run.id, None)
        gate = _gate(run)
        was_open = False
        if gate is not None:
            self.gated.get(gate, {}).pop(run.id, None)
            opened = self.sweep_open.get(gate)
            if opened is not None and run.id in opened:
                was_open = True
                opened.discard(run.id)
                if not opened:
                    del self.sweep_open[gate]
        if run.status == RunStatus.QUEUED or run.status in _ACTIVE:
            self.live.add(run.id)
        else:
            self.live.discard(run.id)
        if run.status == RunStatus.QUEUED and run.after:
            self.waiting_for[run.id] = run  # the pass queues it once its dependencies have ended (ready())
            return
        if gate is not None and (run.status in _ACTIVE or run.status == RunStatus.QUEUED and was_open):
            self.sweep_open.setdefault(gate, set()).add(run.id)
        elif gate is not None and run.status == RunStatus.QUEUED:
            self.gated.setdefault(gate, {})[run.id] = run  # until its sweep has room (release_sweeps)
            return
        self._queue(run, before)

    def ready(self, run: Run) -> None:
        """A run whose dependencies have ended well: queued in its shape from now on (or held back with its
        sweep's other points until the sweep has room)."""
        self.waiting_for.pop(run.id, None)
        gate = _gate(run)
        if gate is not None:
            self.gated.setdefault(gate, {})[run.id] = run
            return
        self._queue(run, None)

    def release_sweeps(self) -> int:
        """Let held-back points of each sweep into the queue, in queue order, while fewer than its max_parallel
        are queued or running. Costs a look at the sweeps that hold points back, not at the queue."""
        released = 0
        for sweep_id, held in list(self.gated.items()):
            if not held:
                del self.gated[sweep_id]
                continue
            opened = self.sweep_open.setdefault(sweep_id, set())
            first = next(iter(held.values()))
            room = (first.sweep.max_parallel if first.sweep and first.sweep.max_parallel else 1) - len(opened)
            if room <= 0:
                continue
            for run in sorted(held.values(), key=order)[:room]:
                del held[run.id]
                opened.add(run.id)
                self._queue(run, None)
                released += 1
        return released

    def _queue(self, run: Run, before: tuple[Waiting, Request, tuple[float, float, str]] | None) -> None:
        if run.status == RunStatus.QUEUED:
            req = Request.of(run.job, run.owner, run.team)
            key = order(run)
            self.queued[run.id] = (Waiting.of(run), req, key)
            self._count_queued(req.team, run.priority, 1)
            shape = self.shapes.get(req)
            fresh = shape is None
            if shape is None:
                shape = self.shapes[req] = Shape(req)
            if fresh or before is None or before[1:] != (req, key):
                heapq.heappush(shape.heap, (key, run.id))  # (an entry it had stays valid: same shape, same place)
            if run.reason != shape.reason:
                shape.reason = None
        elif run.status in _ACTIVE:
            claims: dict[str, set[int]] = {}
            for p in run.placements:
                if not p.done and p.gpus:
                    claims.setdefault(p.node_id, set()).update(p.gpus)
            if claims:
                self.claims[run.id] = claims
                for node, gpus in claims.items():
                    self.dirty.add(node)
                    on = self.held.setdefault(node, {})
                    for g in gpus:
                        on[g] = run.id
                n = sum(len(g) for g in claims.values())
                if run.quota_key:
                    self.charged[run.id] = (run.quota_key, n)
                    self.quota_held[run.quota_key] = self.quota_held.get(run.quota_key, 0) + n
                by = run.preempted.by if run.status == RunStatus.PREEMPTED and run.preempted else None
                # (a run being stopped already, by its user or its gang, is no one's victim: it would be requeued)
                holder = self.holders[run.id] = Holder(
                    run.team, run.owner, run.priority, run.job.preemptible and not run.stop_requested, run.quota_key,
                    n, run.started_at or run.updated_at, by, run.job.preemption.grace)
                self.of_team.setdefault(run.team, set()).add(run.id)
                if holder.preemptible and by is None:
                    prios = self.preemptible.setdefault(run.team, {})
                    prios[run.priority] = prios.get(run.priority, 0) + 1
                if by is not None:
                    self.preempting.setdefault(by, set()).add(run.id)

    def _release(self, run_id: str) -> None:
        holder = self.holders.pop(run_id, None)
        if holder is not None:
            mates = self.of_team.get(holder.team)
            if mates is not None:
                mates.discard(run_id)
                if not mates:
                    del self.of_team[holder.team]
            if holder.preemptible and holder.preempted_by is None:
                prios = self.preemptible[holder.team]
                prios[holder.priority] -= 1
                if not prios[holder.priority]:
                    del prios[holder.priority]
                    if not prios:
                        del self.preemptible[holder.team]
            by = holder.preempted_by
            if by is not None and by in self.preempting:
                self.preempting[by].discard(run_id)
                if not self.preempting[by]:
                    del self.preempting[by]
                    self.freed_for[by] = time.monotonic()
        charged = self.charged.pop(run_id, None)
        if charged is not None:
            left = self.quota_held.get(charged[0], 0) - charged[1]
            if left > 0:
                self.quota_held[charged[0]] = left
            else:
                self.quota_held.pop(charged[0], None)
        for node, gpus in self.claims.pop(run_id, {}).items():
            self.dirty.add(node)
            on = self.held.get(node, {})
            for g in gpus:
                if on.get(g) == run_id:
                    del on[g]

    # -- what a pass reads ---------------------------------------------------------------------------------
    def head(self, shape: Shape) -> tuple[Waiting, tuple[float, float, str]] | None:
        """The shape's next queued run (stale heap entries are dropped on the way)."""
        heap = shape.heap
        while heap:
            key, run_id = heap[0]
            got = self.queued.get(run_id)
            if got is not None and got[2] == key:
                return got[0], key
            heapq.heappop(heap)
        return None

    def pop(self, shape: Shape) -> None:
        heapq.heappop(shape.heap)

    def heads(self) -> list[tuple[tuple[float, float, str], Request]]:
        """Each shape's head, as a heap: the pass merges the shapes in queue order."""
        out = []
        for req, shape in list(self.shapes.items()):
            got = self.head(shape)
            if got is None:
                del self.shapes[req]
                continue
            out.append((got[1], req))
        heapq.heapify(out)
        return out

    def runs_of(self, shape: Shape) -> Iterator[Waiting]:
        for _, run_id in shape.heap:
            got = self.queued.get(run_id)
            if got is not None and got[1] == shape.req:
                yield got[0]

    def _count_queued(self, team: str | None, priority: int, n: int) -> None:
        prios = self.queued_priorities.setdefault(team, {})
        left = prios.get(priority, 0) + n
        if left > 0:
            prios[priority] = left
        else:
            prios.pop(priority, None)
            if not prios:
                del self.queued_priorities[team]

    def any_priority_preemption(self) -> bool:
        """Does some team have a run queued above a run of its own it may preempt?"""
        return any(t is not None and t in self.preemptible and max(prios) > min(self.preemptible[t])
                   for t, prios in self.queued_priorities.items())

    def may_preempt(self, team: str | None, priority: int) -> bool:
        """Does the team hold a run it may preempt for this priority (preemptible, lower, not being preempted)?"""
        prios = self.preemptible.get(team)
        return prios is not None and min(prios) < priority

    def held_on(self, node_id: str) -> dict[int, str]:
        return self.held.get(node_id, {})

    FREED_FOR_S = 60.0

    def preemptors(self) -> set[str]:
        """Queued runs that preempted others: those still stopping, and those whose victims stopped in the last
        FREED_FOR_S (the pass tries them before the rest of the queue: the GPUs were freed for them)."""
        now = time.monotonic()
        for run_id, at in list(self.freed_for.items()):
            if now - at > self.FREED_FOR_S or run_id not in self.queued:
                del self.freed_for[run_id]
        return {r for r in self.preempting if r in self.queued} | set(self.freed_for)
