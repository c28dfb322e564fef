"""Borrowing idle quota and preemption (docs/teams.md), for the placement pass (scheduler/service/placing.py).

- A team may hold GPUs over its quota, up to its borrow limit, out of the idle quota other teams lend (their
  quota of the same name, less what they hold, up to their lend limit, less what others borrow already), while
  no team it would borrow from has work waiting within its own quota. `preemptible: false` runs never borrow.
- A waiting run of a team preempts (scheduler/preemption.py chooses whom): runs of its own team with a lower
  priority; and, while its team holds less than its quota, runs of teams that borrow in that quota, no more of a
  team's than it borrows. Victims go PREEMPTED (SIGTERM, their job's grace, then SIGKILL), keep their GPUs until
  their ranks have stopped, and are then QUEUED again as their next attempt.
- No preemption loops: while its victims stop, the nodes they free are held for the waiting run (other runs do not
  take them GPU by GPU), and once they have stopped it is tried before the rest of the queue; a victim does not
  borrow again while the team it was stopped for waits (it would be stopped again at once).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from ..contract.models import SYSTEM_RANK, InvalidTransition, Preemption, RunStatus, Team
from ..placement import Candidate, Request, could_use, free_matching, not_draining, online, usable_gpus
from ..preemption import Need, Victim, choose
from ..store import NotFound
from .book import Book, Waiting
from .core import SchedulerBase, log

if TYPE_CHECKING:
    from .placing import _Pass


class PreemptionMixin(SchedulerBase):
    _teams_all: tuple[float, dict[str, Team]] | None = None

    def teams_now(self) -> dict[str, Team]:
        """Every team, as read at most TEAM_CACHE_S ago (borrowing weighs each team's idle quota)."""
        got = self._teams_all
        now = time.monotonic()
        if got is None or now - got[0] > self.TEAM_CACHE_S:
            got = self._teams_all = (now, {t.name: t for t in self.store.list_teams()})
        return got[1]

    # -- borrowing -----------------------------------------------------------------------------------------------
    def quota_limit(self, req: Request, quota: tuple[str, str, int], book: Book, ps: _Pass) -> int:
        """The GPUs the request's team may hold against `quota` now: its nominal quota, plus what it may borrow."""
        _, bucket, nominal = quota
        assert req.team is not None
        team = self.team_cached(req.team)
        if team is None or not team.borrow_limit or not req.preemptible:
            return nominal
        teams = self.teams_now()
        pool = 0
        for k in teams.values():
            if k.name == req.team or bucket not in k.quotas:
                continue
            n, held = k.quotas[bucket], book.quota_held.get(f"{k.name}\t{bucket}", 0)
            lend = n if k.lend_limit is None else min(k.lend_limit, n)
            pool += max(0, min(lend, n - held)) - max(0, held - n)  # its idle quota it lends, less what others took
        if pool <= 0 or self._waiting_within(bucket, book, ps, teams) - {req.team}:
            return nominal
        return nominal + min(team.borrow_limit, pool)

    def _waiting_within(self, bucket: str, book: Book, ps: _Pass, teams: dict[str, Team]) -> set[str]:
        """The teams with work waiting that fits their own quota of `bucket` (no other team borrows there then:
        the GPUs would be reclaimed at once). Counted once per pass and quota."""
        got = ps.owed.get(bucket)
        if got is None:
            got = ps.owed[bucket] = set()
            for req, shape in book.shapes.items():
                k = teams.get(req.team or "")
                if k is None or not req.gpus or k.bucket(req.resource_type) != bucket or book.head(shape) is None:
                    continue
                if book.quota_held.get(f"{k.name}\t{bucket}", 0) + req.gpus * req.count <= k.quotas[bucket]:
                    got.add(k.name)
        return got

    def _borrowing(self, bucket: str, book: Book, ps: _Pass) -> dict[str, int]:
        """The teams that hold more than their quota of `bucket`, and by how much (once per pass and quota)."""
        got = ps.borrowing.get(bucket)
        if got is None:
            got = ps.borrowing[bucket] = {}
            for name, k in self.teams_now().items():
                if bucket in k.quotas and (held := book.quota_held.get(f"{name}\t{bucket}", 0)) > k.quotas[bucket]:
                    got[name] = held - k.quotas[bucket]
        return got

    def preemption_possible(self, book: Book, ps: _Pass) -> bool:
        """Could any queued run preempt now: one queued above a preemptible run of its team, or a team holding
        more than its quota (borrowing, which the owner may reclaim), or a preemption under way?"""
        if book.preempting or book.any_priority_preemption():
            return True
        teams = self.teams_now()
        for key, held in book.quota_held.items():
            name, _, bucket = key.partition("\t")
            k = teams.get(name)
            if k is not None and held > k.quotas.get(bucket, held):
                return True
        return False

    def store_limit(self, req: Request, quota: tuple[str, str, int]) -> int:
        """The store's last word on the team's GPUs (exact across replicas): its quota and all it may borrow."""
        team = self.team_cached(req.team) if req.team else None
        return quota[2] + (team.borrow_limit if team is not None and req.preemptible else 0)

    # -- preemption ----------------------------------------------------------------------------------------------
    def hold_for_preemptors(self, book: Book, ps: _Pass) -> None:
        """At the start of a pass: the nodes that runs being preempted are stopping on are held for the runs they
        make room for (their shapes), not given to others GPU by GPU."""
        for by, victims in book.preempting.items():
            got = book.queued.get(by)
            if got is None:
                continue
            nodes = {n for v in victims for n in book.claims.get(v, {})}
            ps.held_for.setdefault(got[1], set()).update(nodes)
            ps.reserved |= nodes

    def preempt(self, run: Waiting, req: Request, ps: _Pass, book: Book, quota: tuple[str, str, int] | None,
                quota_short: int) -> str | None:
        """Stop the fewest runs that make room for `run` (which found none, or waits `quota_short` GPUs for its
        team's quota); returns the reason it now waits with, or None when no runs it may stop would do."""
        if req.team is None or not req.gpus or run.id not in book.queued:
            return None
        priority = -int(book.queued[run.id][2][0])
        need = req.gpus * req.count
        # (asked of every blocked shape in every pass: the two cheap questions first)
        by_priority = book.may_preempt(req.team, priority)
        over: dict[str, int] = {}  # borrowing teams -> GPUs they hold over their quota of the bucket
        if quota is not None and not quota_short and book.quota_held.get(quota[0], 0) + need <= quota[2]:
            over = {t: n for t, n in self._borrowing(quota[1], book, ps).items() if t != req.team}
        if not by_priority and not over:
            return None
        found: list[tuple[str, Any, str]] = []  # (run id, holder, why)
        for vid in book.of_team.get(req.team, ()) if by_priority else ():
            h = book.holders[vid]
            if h.priority < priority and h.preemptible and h.preempted_by is None:
                found.append((vid, h, f"priority {priority} over {h.priority} in team {req.team}"))
        if over:
            assert quota is not None
            bucket = quota[1]
            for name in over:
                for vid in book.of_team.get(name, ()):
                    h = book.holders[vid]
                    if h.quota_key == f"{name}\t{bucket}" and h.preemptible and h.preempted_by is None:
                        found.append((vid, h, f"team {req.team} reclaims its quota of {quota[2]} "
                                              f"{'' if bucket == 'any' else bucket + ' '}GPUs, lent to team {name}"))
        if not found:
            return None
        # (the nodes held for other runs that preempted: not a blocked head's backfill reservation, which a
        # preemption outranks)
        reserved = set().union(*(nodes for r, nodes in ps.held_for.items() if r != req))
        usable: dict[str, bool] = {}

        def usable_node(node_id: str) -> bool:
            ok = usable.get(node_id)
            if ok is None:
                c = ps.by_id.get(node_id)
                ok = usable[node_id] = c is not None and node_id not in reserved and _could_run(req, c)
            return ok

        ps.seen_now({n for vid, _, _ in found for n in book.claims.get(vid, {})})  # (whether they are online)
        free = {c.node.id: n for c in ps.with_free if (n := free_matching(req, c)) and usable_node(c.node.id)}
        victims, why = [], {}
        for vid, h, text in found:
            freed = {}
            for node_id, gpus in book.claims.get(vid, {}).items():
                if usable_node(node_id):
                    fits = set(usable_gpus(req, ps.by_id[node_id].node))
                    if n := len(gpus & fits):
                        freed[node_id] = n
            victims.append(Victim(vid, h.priority, h.started, freed, h.gpus if quota and h.quota_key == quota[0] else 0,
                                  h.team))
            why[vid] = (h, text)

        def allowed(v: Victim, chosen: Any) -> bool:  # a team lends back no more than it borrows
            if v.team == req.team or v.team not in over:
                return True
            return sum(book.holders[x.run_id].gpus for x in chosen if x.team == v.team) < over[v.team]

        chosen = choose(Need(req.gpus, req.count, quota_short), free, victims, allowed)
        if not chosen:
            return None
        stopped = []
        assert ps.commits is not None
        ps.commits.placed_first(v.run_id for v in chosen)  # (a victim this pass placed: written before it is stopped)
        for v in chosen:
            h, text = why[v.run_id]
            p = Preemption(by=run.id, owner=req.owner or "", team=req.team, why=text, grace=h.grace)
            try:
                new = self.store.transition(v.run_id, RunStatus.PREEMPTED, stop_requested=True, preempted=p,
                                            reason=p.text())
            except (InvalidTransition, NotFound):
                continue  # it ended meanwhile: the change feed brings it
            book.apply(new)
            ps.commits.changed.append(new)
            ps.commits.wrote()
            stopped.append(v.run_id)
            with contextlib.suppress(Exception):  # (said in its log; the transition is what matters)
                seq = self.store.next_seq(new.id, new.attempt, SYSTEM_RANK)
                self.store.append_logs(new.id, new.attempt, SYSTEM_RANK, seq, [(
                    time.time(), "fedml", f"── {p.text()}: stopping (SIGTERM, then SIGKILL after {p.grace:g} s); "
                                          f"it is requeued as attempt {new.attempt + 1}")])
            log.info("run %s %s", v.run_id, p.text())
        if not stopped:
            return None
        self.tally.add("preemptions", len(stopped))
        grace = max(why[r][0].grace for r in stopped)
        reason = (f"preempting {len(stopped)} run{'s' if len(stopped) > 1 else ''} to make room "
                  f"({', '.join(stopped[:5])}{', ...' if len(stopped) > 5 else ''}; they stop within {grace:g} s)")
        with contextlib.suppress(NotFound):
            self.store.update_run(run.id, reason=reason)
        run.reason = reason
        self.hold_for_preemptors(book, ps)
        return reason


def _could_run(req: Request, c: Candidate) -> bool:
    """Could the request run on this node once GPUs there are free (online, not draining, static filters)?"""
    return online(req, c) is None and not_draining(req, c) is None and could_use(req, c)
