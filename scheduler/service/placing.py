"""Placement passes: queued runs, highest priority first, FIFO within one, onto the candidates placement
(scheduler/placement.py) scores; the blocked head job reserves the nodes it would get (backfill)."""

from __future__ import annotations

import time

from ..contract.models import (
    SYSTEM_RANK,
    InvalidTransition,
    NodeScore,
    Placement,
    Run,
    RunStatus,
)
from ..placement import WEIGHTS, Candidate, NoFit, Request, place, reservation
from ..store import GpuBusy
from .core import ACTIVE, SchedulerBase

FULL_PASS_S = 30.0  # an idle scheduler still looks at its whole queue this often


class PlacementMixin(SchedulerBase):
    def _candidates(self, active: list[Run]) -> list[Candidate]:
        now = time.time()
        held: dict[str, set[int]] = {}
        for r in active:
            for p in r.placements:
                if not p.done:
                    held.setdefault(p.node_id, set()).update(p.gpus)
        seen = self.store.heartbeats()
        return [Candidate(node=n if n.id not in seen else n.model_copy(update={"last_seen": self.last_seen(n, seen)}),
                          free=[g for g in n.gpus if g.index not in held.get(n.id, set())], now=now,
                          heartbeat_timeout=self.heartbeat_timeout)
                for n in self.nodes()]

    def waiting(self, run: Run) -> Run:
        """A queued run with its reason as of the last pass, counts included ("... (3 nodes have them busy)")."""
        if run.status == RunStatus.QUEUED and run.reason:
            last = self._waiting.get(Request.of(run.job, run.owner))
            if last is not None and last.summary == run.reason:
                run.reason = last.reason
        return run

    def never_fits(self, req: Request) -> str | None:
        """Why `req` can never run on this cluster (None: it could, once GPUs are free). Answered from the nodes'
        static capacity (inventory, labels, owners, runtimes, prices) with every GPU free: no run is read, so a
        submission costs the same in an idle cluster and in a busy one."""
        nodes = self.nodes()
        cached = self._static
        if cached is None or cached[0] is not nodes:
            now = time.time()
            cached = self._static = (nodes, [Candidate(node=n, free=list(n.gpus), now=now, heartbeat_timeout=1e12)
                                            for n in nodes])
        verdict = place(req, cached[1], rng=self.rng)
        return verdict.reason if isinstance(verdict, NoFit) and verdict.never else None

    def schedule_pass(self) -> int:
        """Place queued runs: higher priority first, FIFO within a priority. The first run that cannot be
        placed reserves the nodes it would get (as many as it needs, those closest to fitting it), so smaller
        runs behind it cannot starve it; they still start on every other node (backfill). Returns how many
        runs were placed."""
        # One pass at a time across replicas, for efficiency only: the store refuses a stale placement anyway,
        # so a pass that outlives the lock's TTL is harmless, and a replica killed mid-pass blocks no one long.
        # A pass that placed nothing is not repeated until something that could change its answer happens: every
        # such change (a run created or ended, a node joining, leaving, coming back or draining) kicks "schedule"
        # or "nodes", locally or relayed from another replica. A full pass every FULL_PASS_S is the safety net.
        tickets = (self.notifier.ticket("schedule"), self.notifier.ticket("nodes"))  # before reading anything
        idle = self._idle
        if idle is not None and idle[0] == tickets and time.monotonic() - idle[1] < FULL_PASS_S:
            return 0
        with self._schedule_lock, self.store.lock("schedule", ttl=5.0):
            queued = self.store.list_runs(status=[RunStatus.QUEUED], limit=1_000_000)
            if not queued:
                self._idle = (tickets, time.monotonic())
                return 0
            queued.sort(key=lambda r: (-r.priority, r.created_at))
            candidates = self._candidates(self.store.list_runs(status=ACTIVE, limit=1_000_000))
            pass_state = _Pass(candidates)
            placed = 0
            for start in range(0, len(queued), 256):
                changed: list[Run] = []
                with self.store.batch():  # one durable commit per chunk; other requests get the store between
                    for run in queued[start:start + 256]:
                        if self._place_one(run, pass_state):
                            changed.append(run)
                placed += len(changed)
                self._announce(changed)
            self._idle = None if placed else (tickets, time.monotonic())
            self._waiting = dict(pass_state.no_room)
            return placed

    def _place_one(self, run: Run, ps: _Pass) -> bool:
        req = Request.of(run.job, run.owner)
        # Nothing is freed during a pass: a request shape that found no room once will not find it again.
        verdict = ps.no_room.get(req) or place(req, ps.candidates, reserved=frozenset(ps.reserved), rng=self.rng)
        if isinstance(verdict, NoFit):
            ps.no_room[req] = verdict
            if not ps.head_blocked and not verdict.never:
                ps.head_blocked = True
                ps.reserved |= reservation(req, ps.candidates)
            # The stored reason changes only with its meaning; the counts are added when it is shown (waiting()).
            if run.reason != verdict.summary:
                self.store.update_run(run.id, reason=verdict.summary)
            return False
        placements = [Placement(rank=i, node_id=pl.node.id, gpus=pl.gpus) for i, pl in enumerate(verdict)]
        scores = [NodeScore(node_id=pl.node.id, rank=i, total=pl.score, scores=pl.scores, weights=WEIGHTS)
                  for i, pl in enumerate(verdict)] + verdict[0].runners_up
        try:
            self.store.transition(run.id, RunStatus.STARTING, placements=placements, scores=scores, reason=None,
                                  master_port=self.rng.randrange(20000, 40000))
        except InvalidTransition:
            return False  # stopped meanwhile
        except GpuBusy as busy:  # another replica placed a run there: this pass's view of that node is stale
            if busy.node_id in ps.by_id:
                ps.by_id[busy.node_id].free = []
            self.kick()
            return False
        run.placements = placements
        for pl in verdict:
            c = ps.by_id[pl.node.id]
            c.free = [g for g in c.free if g.index not in pl.gpus]
        if run.attempt > 1:  # the log says where each attempt ran and why the one before it ended
            names = ", ".join(pl.node.name for pl in verdict)
            why = run.attempts[-1].reason if run.attempts else None
            self.store.append_logs(run.id, run.attempt, SYSTEM_RANK, 0, [(
                time.time(), "fedml", f"── attempt {run.attempt} on node {names}" + (f": {why}" if why else ""))])
        return True

    def _announce(self, runs: list[Run]) -> None:
        # After the commit: an agent woken by this must find its assignment in the store.
        for run in runs:
            self.run_changed(run)
        runs.clear()


class _Pass:
    """What one scheduling pass knows: candidates with their free GPUs, and the head job's reservation."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        self.by_id = {c.node.id: c for c in candidates}
        self.reserved: set[str] = set()
        self.head_blocked = False
        self.no_room: dict[Request, NoFit] = {}


