"""The queue as passes see it (`GET /queue`, `fedml queue`, the dashboard's Queue page): each pending run's place
in line, why it waits, who is ahead of it and when it may start (scheduler/queueview.py estimates)."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from .. import access
from ..contract.models import Principal, Run, RunStatus
from ..placement import Candidate, Request, could_use, not_draining, online, usable_gpus
from ..queueview import INF, Entry, Gpu, Quota, median, stand
from ..store import NotFound
from .core import SchedulerBase

HISTORY_S = 60.0  # finished runs' durations are re-read this often
HISTORY_RUNS = 2000  # the latest finished runs that say how long a name runs
# A view is reused while no run was written since, and for QUEUE_FRESH_S at most, or ten times what it took to
# build if that is longer: the Queue page open in a busy cluster (10,000 queued, a view in ~0.5 s) costs the
# scheduler a tenth of a core at most, and estimates in minutes do not need fresher counts.
QUEUE_FRESH_S = 2.0
ESTIMATE_FIRST = 500  # start times for the first 500 in line: each costs a walk over the nodes' GPUs


class QueueMixin(SchedulerBase):
    _history: tuple[float, dict[tuple[str, str], float]] | None = None
    _ends: dict[str, tuple[float, str | None]] | None = None  # active run -> (expected end or INF, why none)
    _queue_view: tuple[int, float, dict[str, Any]] | None = None

    def queue(self, who: Principal, *, limit: int = 100, mine: bool = False, run: str | None = None,
              team: str | None = None) -> dict[str, Any]:
        """Pending runs in the order passes consider them, those the caller may see (a user: their own; the
        runs ahead of theirs are counted by owner and size, not shown). Runs waiting for other runs to end, or
        for their sweep to have room, are listed apart: passes do not consider them yet. `run`: that one only."""
        if run is not None and ((got := self.store.get_run(run)) is None or not access.may_see_run(who, got)):
            raise NotFound(f"run {run} not found")
        view = self._whole_queue()
        owner = access.runs_listed_for(who) or (who.owner if mine else None)
        rows = [r for r in view["runs"] if (owner is None or r["owner"] == owner) and run in (None, r["id"])
                and team in (None, r["team"])]
        held = [r for r in view["held"] if (owner is None or r["owner"] == owner) and run in (None, r["id"])
                and team in (None, r["team"])]
        return {"now": view["now"], "took_s": view["took_s"], "total": view["total"], "shown": len(rows[:limit]),
                "runs": rows[:limit], "held": held[:limit]}

    def _whole_queue(self) -> dict[str, Any]:
        seq, mono = self.store.runs_seq(), time.monotonic()
        cached = self._queue_view
        if cached is not None and (cached[0] == seq and mono - cached[1] < QUEUE_FRESH_S
                                   or mono - cached[1] < 10 * cached[2]["took_s"]):
            return cached[2]
        with self._schedule_lock:
            book = self._sync_book()
            rank = self.fair_rank()  # type: ignore[attr-defined]  # (PlacementMixin's: the order passes use)
            line = sorted(book.queued.values(), key=lambda q: rank(q[2], q[1]))
            held_gpus = {n: dict(g) for n, g in book.held.items()}
            active = list(book.claims)
            charged = dict(book.charged)
            apart = [*book.waiting_for.values(), *(r for runs in book.gated.values() for r in runs.values())]
        now = time.time()
        history = self._durations(mono)
        ends = self._expected_ends(active, history, now)
        eligible = self._eligibility(now)
        docs: dict[str, Run] = {}
        for waiting, _, _ in line[:ESTIMATE_FIRST]:
            if (run := self.store.get_run(waiting.id)) is not None:
                docs[waiting.id] = run
        entries = []
        quotas: dict[str, Quota] = {}
        for waiting, req, _ in line:
            run = docs.get(waiting.id)
            duration, basis = _duration(run, history) if run is not None else (None, None)
            q = self._quota(req)  # type: ignore[attr-defined]  # (PlacementMixin's)
            if q is not None and q[0] not in quotas:
                quotas[q[0]] = Quota(q[2])
            entries.append(Entry(waiting.id, req.owner or "", req, req.gpus, req.count, duration, basis,
                                 q[0] if q is not None else None))
        for run_id, (key, n) in charged.items():  # what the teams' running runs hold, until their expected ends
            if key in quotas:
                end, why = ends.get(run_id, (INF, None))
                quotas[key].free_at.extend([end] * n)
                if end == INF and quotas[key].why is None:
                    quotas[key].why = why
        gpus: dict[str, dict[int, Gpu]] = {}
        for node in self.nodes():
            on = held_gpus.get(node.id, {})
            gpus[node.id] = {g.index: Gpu(now) if g.index not in on else Gpu(*ends.get(on[g.index], (INF, None)))
                             for g in node.gpus}
        standings = stand(entries, gpus, eligible, now=now, estimate_first=ESTIMATE_FIRST, quotas=quotas)
        teams_of: dict[str, set[str]] = {}  # owner -> the teams of their queued runs (who is ahead: owner, team)
        for _, req, _ in line:
            if req.team:
                teams_of.setdefault(req.owner or "", set()).add(req.team)
        rows = []
        for (waiting, req, _), e, st in zip(line, entries, standings, strict=True):
            run = docs.get(waiting.id)
            if run is not None:
                run = self.waiting(run)
            rows.append({
                "position": st.position, "id": waiting.id, "owner": e.owner, "team": req.team, "gpus": req.gpus,
                "nodes": req.count,
                "gpu_type": req.resource_type, "name": run.name if run else None,
                "priority": run.priority if run else None, "created_at": run.created_at if run else None,
                "reason": (run.reason if run else waiting.reason) or "waiting for the next pass",
                "expected_duration": e.duration, "duration_basis": e.basis,
                "ahead": {"runs": st.ahead_runs, "gpus": st.ahead_gpus,
                          "owners": [{"owner": o, "team": ",".join(sorted(teams_of.get(o, ()))) or None,
                                      "runs": v[0], "gpus": v[1]} for o, v in
                                     sorted(st.ahead_owners.items(), key=lambda kv: (-kv[1][1], kv[0]))]},
                "start_at": st.start_at, "basis": st.basis, "no_basis": st.no_basis})
        held = [{"id": r.id, "name": r.name, "owner": r.owner, "team": r.team, "priority": r.priority,
                 "created_at": r.created_at,
                 "reason": r.reason or "held back until its sweep has room"} for r in apart]
        view = {"now": now, "total": len(rows), "runs": rows, "held": held, "took_s": time.monotonic() - mono}
        self._queue_view = (seq, mono, view)
        return view

    def gpus_held(self) -> dict[str, dict[int, str]]:
        """node -> GPU -> the run holding it, as the book knows it now (GET /metrics)."""
        with self._schedule_lock:
            return {n: dict(g) for n, g in self._sync_book().held.items()}

    def _durations(self, mono: float) -> dict[tuple[str, str], float]:
        """(owner, name) -> the median duration of its latest finished runs."""
        got = self._history
        if got is not None and mono - got[0] < HISTORY_S:
            return got[1]
        seen: dict[tuple[str, str], list[float]] = {}
        for r in self.store.list_runs(status=[RunStatus.FINISHED], limit=HISTORY_RUNS):
            if r.started_at is not None and r.ended_at is not None:
                seen.setdefault((r.owner, r.name), []).append(r.ended_at - r.started_at)
        out = {k: m for k, v in seen.items() if (m := median(v)) is not None}
        self._history = (mono, out)
        return out

    def _expected_ends(self, active: list[str], history: dict[tuple[str, str], float],
                       now: float) -> dict[str, tuple[float, str | None]]:
        """Each active run's expected end, read once per run (kept while it is active)."""
        keep = set(active)
        ends = {k: v for k, v in (self._ends or {}).items() if k in keep}
        out = dict(ends)
        for run_id in active:
            if run_id in out or (run := self.store.get_run(run_id)) is None:
                continue
            duration, _ = _duration(run, history)
            if duration is None:
                out[run_id] = (INF, f"{run.id} ({run.owner}) runs with no max_duration and no finished run of "
                                    "its name to go by")
            else:
                out[run_id] = ((run.started_at or now) + duration, None)
            if run.started_at is not None:  # (a starting one is read again: its clock has not started)
                ends[run_id] = out[run_id]
        self._ends = ends
        return out

    def _eligibility(self, now: float) -> Any:
        """shape -> {node: its GPUs the shape may use}, over the nodes online and not draining."""
        seen = self.store.heartbeats()
        cands = [Candidate(node=n, free=list(n.gpus), now=now, heartbeat_timeout=self.heartbeat_timeout,
                           last_seen=self.last_seen(n, seen)) for n in self.nodes()]

        def eligible(shape: Hashable) -> dict[str, list[int]]:
            assert isinstance(shape, Request)
            return {c.node.id: usable_gpus(shape, c.node) for c in cands
                    if online(shape, c) is None and not_draining(shape, c) is None and could_use(shape, c)}

        return eligible


def _duration(run: Run, history: dict[tuple[str, str], float]) -> tuple[float | None, str | None]:
    if run.job.max_duration:
        return float(run.job.max_duration), "max_duration"
    got = history.get((run.owner, run.name))
    return (got, "history") if got is not None else (None, None)
