"""Placement passes: queued runs, highest priority first, FIFO within one, onto the candidates placement
(scheduler/placement.py) scores; the blocked head job reserves the nodes it would get (backfill)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import heapq
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..contract.models import (
    SYSTEM_RANK,
    InvalidTransition,
    Node,
    NodeScore,
    Placement,
    Run,
    RunStatus,
)
from ..placement import WEIGHTS, Candidate, NoFit, Request, free_matching, place, ranking, reservation, usable_gpus
from ..store import GpuBusy, NotFound, QuotaFull, Sends, Stale, bulk
from .book import Book, Shape, Waiting
from .core import ACTIVE, BIG_CLUSTER, log, trim_heap
from .preempting import PreemptionMixin

FULL_PASS_S = 30.0  # an idle scheduler still looks at its whole queue this often
# The book is rebuilt from a full read of the store this often, as a safety net only: the change feed is complete.
# (A rebuild parses every queued and active run: 18,000 of them hold the interpreter for ~0.3 s.)
BOOK_REBUILD_S = 300.0


class PlacementMixin(PreemptionMixin):
    def _candidates(self, active: list[Run]) -> list[Candidate]:
        now = time.time()
        held: dict[str, set[int]] = {}
        for r in active:
            for p in r.placements:
                if not p.done:
                    held.setdefault(p.node_id, set()).update(p.gpus)
        seen = self.store.heartbeats()
        return [Candidate(node=n if n.id not in seen else n.model_copy(update={"last_seen": self.last_seen(n, seen)}),
                          free=[g for g in n.gpus if g.index not in held.get(n.id, set())
                                and g.index not in n.gpus_busy_outside], now=now,
                          heartbeat_timeout=self.heartbeat_timeout)
                for n in self.nodes()]

    def waiting(self, run: Run) -> Run:
        """A queued run with its reason, counts included ("... (3 nodes have them busy)"): counted when shown,
        over the candidates of the last pass, once per shape and pass (a pass itself only looks at nodes with a
        free GPU and does not count the others)."""
        if run.status == RunStatus.QUEUED and run.reason:
            req = Request.of(run.job, run.owner, run.team)
            last = self._waiting.get(req)
            if last is not None and last.summary == run.reason:
                counted = self._counted
                if req not in counted:
                    counted[req] = self._count(req, last)
                run.reason = counted[req]
        return run

    def _count(self, req: Request, last: NoFit) -> str:
        cache = self._cands
        if cache is None:
            return last.reason
        cands = list(cache.by_id.values())
        now, seen = time.time(), self.store.heartbeats()
        for c in cands:
            c.now, c.last_seen = now, self.last_seen(c.node, seen)
        verdict = place(req, cands, reserved=self._reserved.get(req, frozenset()), rng=random.Random(0))
        return verdict.reason if isinstance(verdict, NoFit) else last.reason

    def never_fits(self, req: Request) -> str | None:
        """Why `req` can never run on this cluster (None: it could, once GPUs are free). Answered from the nodes'
        static capacity (inventory, labels, owners, runtimes, prices) with every GPU free: no run is read, so a
        submission costs the same in an idle cluster and in a busy one."""
        nodes = self.nodes()
        cached = self._static
        if cached is None or cached[0] is not nodes:
            # A candidate per node: the one built before for the same node object, a new one for a node that
            # changed or joined (a join or a drain costs that node, not a Candidate for every node).
            now = time.time()
            before = {c.node.id: c for c in cached[1]} if cached is not None else {}
            with bulk():
                cands = [c if (c := before.get(n.id)) is not None and c.node is n else
                         Candidate(node=n, free=list(n.gpus), now=now, heartbeat_timeout=1e12) for n in nodes]
            cached = self._static = (nodes, cands, {})
        answers = cached[2]
        if req in answers:  # one answer per shape until the nodes change: O(1) for the shapes a sweep repeats
            return answers[req]
        verdict = place(req, cached[1], rng=self.rng)
        why = verdict.reason if isinstance(verdict, NoFit) and verdict.never else None
        if len(answers) < 10_000:
            answers[req] = why
        return why

    def schedule_pass(self) -> int:
        """Place queued runs: higher priority first, FIFO within a priority. The first run that cannot be
        placed reserves the nodes it would get (as many as it needs, those closest to fitting it), so smaller
        runs behind it cannot starve it; they still start on every other node (backfill). Returns how many
        runs were placed.

        The pass reads the queue and the held GPUs from the book (scheduler/service/book.py), brought up to date
        from the store's change feed: its cost follows what changed and the number of request shapes, not the
        length of the queue or the number of running jobs. The book is rebuilt from the store every BOOK_REBUILD_S."""
        # One pass at a time across replicas, for efficiency only: the store refuses a stale placement anyway,
        # so a pass that outlives the lock's TTL is harmless, and a replica killed mid-pass blocks no one long.
        # A pass is not repeated until something that could change its answer happens: every
        # such change (a run created or ended, a node joining, leaving, coming back or draining) kicks "schedule"
        # or "nodes", locally or relayed from another replica. A full pass every FULL_PASS_S is the safety net.
        tickets = (self.notifier.ticket("schedule"), self.notifier.ticket("nodes"))  # before reading anything
        idle = self._idle
        if idle is not None and idle[0] == tickets and time.monotonic() - idle[1] < FULL_PASS_S:
            return 0
        with self._schedule_lock:
            book, ask = self._feed_ask()
            with self.store.pass_lock(5.0, ask) as held:
                self._fed = None if held.feed is None or ask is None else (book, ask[0], held.feed)
                try:
                    return self._pass(tickets)
                except BaseException:
                    self._book = None  # it may hold placements that were rolled back: read the store again
                    self._fresh.clear()  # (and what was written in the same transaction may be gone too)
                    raise
                finally:
                    self._fed = None

    def _settle_freeing(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run, bool]:
        # A freed slot costs one durable commit, not two (the report's, then the placement's): where the store's
        # batch is one transaction and no pass is running, the pass that places into the GPUs this write frees
        # runs inside the write's transaction. A pass that fails is undone alone (a savepoint): the report
        # stays, and the next pass tries again. Never waits for the pass lock (a pass holding it may be waiting
        # for the store). Where writes are sent (Redis), the report goes with the pass lock instead.
        if not self.store.batch_commits_once:
            sends = self.store.sends()
            if not sends.deferred or not self._schedule_lock.acquire(blocking=False):
                return *self._settle(run_id, change), False
            try:
                return self._settle_sent(run_id, change, sends)
            finally:
                self._schedule_lock.release()
        if not self._schedule_lock.acquire(blocking=False):
            return *self._settle(run_id, change), False
        placed: list[Run] = []
        moved: list[Run] = []  # runs the pass preempted

        def hold(runs: list[Run]) -> None:  # (announced after the commit, below)
            placed.extend(runs)
            runs.clear()

        try:
            with self.store.lock("schedule", ttl=5.0):
                tickets = (self.notifier.ticket("schedule"), self.notifier.ticket("nodes"))  # before reading
                try:
                    with self.store.batch():
                        before, new = self._settle(run_id, change)
                        passed = new.gpu_claims() < before.gpu_claims()
                        if passed:
                            try:
                                with self.store.savepoint():
                                    self._pass(tickets, hold, moved.append)
                            except Exception:
                                log.exception("the pass after run %s's report failed; the next pass places", run_id)
                                self._book, passed = None, False
                                self._fresh.clear()
                                placed.clear()
                                moved.clear()
                except BaseException:
                    self._book = None  # it may hold placements that were not committed
                    self._fresh.clear()  # (and the report's write, rolled back with them)
                    raise
        finally:
            self._schedule_lock.release()
        if placed:
            self._announce(placed)  # after the commit: an agent woken must find its assignment
        for r in moved:
            self.run_changed(r)
        return before, new, passed

    def _settle_sent(self, run_id: str, change: Callable[[Run], Run | None], sends: Sends) -> tuple[Run, Run, bool]:
        """_settle_freeing where writes are sent (Redis): the report's write, the pass lock and the change feed in
        one round trip (Store.pass_lock), then the pass placing into the GPUs it freed, its placements and the
        lock's release in a second: a freed slot costs two round trips. The report stands on its own (its own
        compare-and-set): a pass that fails after it leaves it written, and the next pass places."""
        tickets = (self.notifier.ticket("schedule"), self.notifier.ticket("nodes"))  # before reading
        before, new = sends.modify(run_id, change)  # (judged on the run as this replica last had it)
        if new is before:
            return before, before, False
        self.wrote(new)  # (its version comes with the write: taken into the book only if written)
        book, ask = self._feed_ask()
        passed = False
        with self.store.pass_lock(5.0, ask, sends=sends, wait=False) as held:
            failed = held.sent.get(run_id)
            if failed is None:
                self._settled(before, new)
                passed = held.taken and new.gpu_claims() < before.gpu_claims()
            elif not isinstance(failed, Stale):
                raise failed
            if passed:
                self._fed = None if held.feed is None or ask is None else (book, ask[0], held.feed)
                try:
                    self._pass(tickets)
                except Exception:
                    log.exception("the pass after run %s's report failed; the next pass places", run_id)
                    self._book, passed = None, False
                    self._fresh.clear()
                finally:
                    self._fed = None
        if failed is not None:  # written by another since this replica read it: decided again, alone
            return *self._settle(run_id, change), False
        return before, new, passed

    def _feed_ask(self) -> tuple[Book | None, tuple[int, Callable[[], dict[str, int]]] | None]:
        """The book, and what of the change feed Store.pass_lock may read with the lock: after the book's seq,
        leaving out the writes the book has or will take from _fresh (None: the book is to be rebuilt)."""
        book = self._book
        if book is None or time.monotonic() - self._book_at > BOOK_REBUILD_S:
            return book, None

        def known() -> dict[str, int]:
            return {**book.own, **{r.id: v for r in list(self._fresh) if (v := r.version) is not None}}
        return book, (book.seq, known)

    def _pass(self, tickets: tuple[int, int], announce: Callable[[list[Run]], None] | None = None,
              changed: Callable[[Run], None] | None = None) -> int:
        """One pass under the locks (schedule_pass). `announce` gets the runs placed after each commit of the
        pass (default: announced then), `changed` each run it preempted (default: run_changed then)."""
        book = self._sync_book()
        if book.waiting_for:
            self._dependencies_ended(book)
        if book.gated:
            book.release_sweeps()
        if not book.queued:
            self._idle = (tickets, time.monotonic())
            self._waiting, self._counted = {}, {}
            return 0
        ps = _Pass(self._live_candidates(book), self.store.heartbeats, self.last_seen, self._heard,
                   self.heartbeat_timeout / 2)
        rank = self.fair_rank()
        if book.preempting or book.freed_for:  # runs that preempted others go first (the GPUs are freed for them)
            self.hold_for_preemptors(book, ps)
            first, fair = book.preemptors(), rank

            def rank(key: tuple[float, float, str], req: Request) -> tuple[Any, ...]:
                return (key[2] not in first, *fair(key, req))
        heads = [(rank(key, req), req) for key, req in book.heads()]
        heapq.heapify(heads)
        settled: bool | None = None  # no GPU free, and nothing any run may preempt: GPU shapes told so are skipped
        with _Commits(self.store, announce or self._announce, changed or self.run_changed,
                      lambda placed, failed: self._sent(book, ps, placed, failed)) as ps.commits:
            while heads:
                key, req = heapq.heappop(heads)
                shape = book.shapes[req]
                if ps.told_none_free(shape):
                    if settled is None:
                        settled = not self.preemption_possible(book, ps)
                    if settled:  # (with teams, a busy queue has a shape per team and user: 150 of them here)
                        if (last := self._waiting.get(req)) is not None:  # (what `waiting()` counts from)
                            ps.no_room[req] = last
                            ps.held_ahead[req] = frozenset(ps.reserved)
                        continue
                got = book.head(shape)
                if got is None:
                    continue
                outcome, new = self._place_one(got[0], shape, ps, book)
                if outcome is _Outcome.BLOCKED:
                    continue  # every run of the shape would get the same answer in this pass
                if new is not None:
                    ps.commits.wrote(new)
                if outcome is not _Outcome.RETRY:
                    book.pop(shape)
                if (nxt := book.head(shape)) is not None:
                    heapq.heappush(heads, (rank(nxt[1], req), req))
        # Every shape was tried until it found no room or ran out of runs: the next pass would find what this
        # one left, until something that could change it happens (a kick moves the tickets; a GpuBusy retry
        # kicked already). What it placed only took capacity.
        self._idle = (tickets, time.monotonic())
        self._waiting, self._counted, self._reserved = dict(ps.no_room), {}, ps.held_ahead
        return ps.commits.placed_in_all

    def _dependencies_ended(self, book: Book) -> None:
        """Queued runs waiting for others (Run.after): those whose dependencies have all ended join the queue,
        or fail when one that had to finish did not. A dependency the book knows as queued or active has not
        ended; one it does not is read from the store (the book may have missed it while it was rebuilt)."""
        for run in list(book.waiting_for.values()):
            failed = None
            for dep in run.after:
                if dep.run_id in book.live:
                    break
                ahead = self.store.get_run(dep.run_id)
                if ahead is not None and not ahead.terminal:
                    book.live.add(ahead.id)  # still to end: its end comes through the change feed
                    break
                if dep.when == "ok" and (ahead is None or ahead.status != RunStatus.FINISHED) and failed is None:
                    failed = (dep.run_id, ahead.status.value if ahead is not None else "gone (removed)")
            else:
                if failed is None:
                    book.ready(run)
                    continue
                why = (f"{failed[0]} ended {failed[1]}; this run waited for it to finish (`--after {failed[0]}:any` "
                       "waits for any ending)")
                book.waiting_for.pop(run.id, None)
                with contextlib.suppress(InvalidTransition, NotFound):
                    failed_run = self.store.transition(run.id, RunStatus.FAILED, reason=why)
                    self.run_changed(failed_run)
                    self.moved(run, failed_run)
                log.info("run %s: %s", run.id, why)

    def _sync_book(self) -> Book:
        """The book, brought up to date with every run written since it last looked (or rebuilt)."""
        book, now = self._book, time.monotonic()
        if book is None or now - self._book_at > BOOK_REBUILD_S:
            seq = self.store.runs_seq()  # before reading: a write that lands meanwhile is read again, harmlessly
            self._book, self._book_at = Book.build(seq, self.store.each_run([RunStatus.QUEUED, *ACTIVE])), now
            if len(self._book.queued) + len(self._book.claims) >= BIG_CLUSTER:
                trim_heap()  # (the pages of parsed runs are freed; their memory goes back to the system)
            return self._book
        fresh = self._fresh
        while fresh:  # (what this scheduler wrote since: as written, unless the book has passed that write)
            run = fresh.popleft()
            version = run.version
            if version is not None and version > max(book.seq, book.own.get(run.id, 0)):
                book.apply(run)
        fed, self._fed = self._fed, None
        while True:
            if fed is not None and fed[0] is book and fed[1] == book.seq:  # (read with the pass lock)
                (seq, runs), fed = fed[2], None
            else:
                seq, runs = self.store.runs_changed_since(book.seq, limit=10_000, known=book.own)
            for run in runs:
                book.apply(run)
            book.seq = seq
            passed = 0
            if book.own:  # (the feed has passed these writes: left out, or read as a later write)
                left = {k: v for k, v in book.own.items() if v > seq}
                passed, book.own = len(book.own) - len(left), left
            if len(runs) + passed < 10_000:  # (it read fewer rows than its limit: nothing more to read)
                return book

    def _live_candidates(self, book: Book) -> Cands:
        """Every node by id with its free GPUs (from the book; recomputed only for nodes whose holders changed),
        and which have a free GPU. Kept between passes and rebuilt when the node list changes; a pass adds the
        heartbeats it needs."""
        nodes = self.nodes()
        cache = self._cands
        if cache is None or cache.book is not book:
            with bulk():  # a Candidate per node: 100,000 of them are many objects at once
                cache = self._cands = Cands(nodes, book, self.heartbeat_timeout)
            dirty: Iterable[str] = cache.by_id.keys()
        elif cache.nodes is not nodes:  # nodes joined, changed or left: those are rebuilt, the rest kept
            dirty = cache.follow(nodes) | book.dirty
        else:
            dirty = book.dirty
        for node_id in dirty:
            c = cache.by_id.get(node_id)
            if c is not None:
                held = book.held_on(node_id)
                outside = c.node.gpus_busy_outside  # (used by a process of no run: not offered)
                cache.set_free(c, [g for g in c.node.gpus if g.index not in held and g.index not in outside])
        book.dirty = set()
        return cache

    def fair_rank(self) -> Callable[[tuple[float, float, str], Request], tuple[Any, ...]]:
        """The order of queued runs: with teams, the team that used least for its shares first (fair share,
        docs/teams.md), then priority, then, inside the team, the user who used least, then arrival; without
        teams, priority then arrival (book.order)."""
        fair = self.fair_usage()  # type: ignore[attr-defined]  # (TeamsMixin's)
        if fair is None:
            return lambda key, req: key
        teams, users = fair

        def rank(key: tuple[float, float, str], req: Request) -> tuple[Any, ...]:
            team = req.team or ""
            return (teams.get(team, 0.0), key[0], users.get((team, req.owner or ""), 0.0), key[1], key[2])

        return rank

    def _quota(self, req: Request) -> tuple[str, str, int] | None:
        """(quota key, bucket, GPUs) of the team quota a GPU request is charged to; None: no team, no GPUs, or no
        quota for it (docs/teams.md)."""
        if req.team is None or not req.gpus:
            return None
        team = self.team_cached(req.team)
        bucket = None if team is None else team.bucket(req.resource_type)
        if team is None or bucket is None:
            return None
        return f"{req.team}\t{bucket}", bucket, team.quotas[bucket]

    def _tell(self, shape: Shape, book: Book, ps: _Pass, why: str) -> None:
        """Store `why` as the reason of every queued run of the shape (only when its meaning changed)."""
        if shape.reason != why:
            for r in list(book.runs_of(shape)):
                if r.reason != why:
                    ps.commits.sends.note(r.id, reason=why)  # (Redis: sent with the placements, 256 at a time)
                    r.reason = why
                    ps.commits.wrote()
            shape.reason = why

    def _place_one(self, run: Waiting, shape: Shape, ps: _Pass, book: Book) -> tuple[_Outcome, Run | None]:
        req = shape.req
        quota = self._quota(req)
        if quota is not None and (after := book.quota_held.get(quota[0], 0) + req.gpus * req.count) > quota[2] and \
                (short := after - self.quota_limit(req, quota, book, ps)) > 0:
            # Its team holds its quota: it waits without holding nodes for itself (others may use them), unless
            # it outranks runs of its own that hold it (preemption).
            if run.id in book.preempting or self.preempt(run, req, ps, book, quota, short) is not None:
                return _Outcome.BLOCKED, None  # (its reason says whom it preempts)
            self._tell(shape, book, ps, quota_reason(req, quota))
            return _Outcome.BLOCKED, None
        if req.team is not None and (team := self.team_cached(req.team)) is not None and team.budget is not None \
                and self.team_spent(team) >= team.budget:  # type: ignore[attr-defined]  # (TeamsMixin's)
            self._tell(shape, book, ps, f"team {req.team} has spent its budget of {team.budget:g} this "
                                        f"{team.budget_period} (docs/teams.md)")
            return _Outcome.BLOCKED, None
        # Only nodes with a free GPU can take a GPU job; a busy cluster has few, so a freed slot costs a look at
        # them, not at every node. The reason stored is the shape's shortfall; the counts over every node are
        # added when it is shown (waiting()).
        reserved = frozenset(ps.reserved - ps.held_for[req] if req in ps.held_for else ps.reserved)
        kind = None  # (the nodes of the GPU kind asked for: Cands.kind)
        if ps.told_none_free(shape):  # nothing to place or to write (with teams: a shape per team and user)
            verdict: list[Any] | NoFit = NoFit(req.shortfall(), summary=req.shortfall())
        elif req.gpus and ps.by_id:
            kind = ps.cands.kind(req)
            verdict = place(req, ps.with_free, reserved=reserved, rng=self.rng, kind=kind)
            if isinstance(verdict, NoFit):
                never = self.never_fits(req) is not None
                verdict = NoFit(req.shortfall(), never=never, counts=verdict.counts, summary=req.shortfall())
        else:
            verdict = place(req, ps.all(), reserved=reserved, rng=self.rng)
        if isinstance(verdict, NoFit) and not verdict.never and req.team is not None and req.gpus and (
                run.id in book.preempting or self.preempt(run, req, ps, book, quota, 0) is not None):
            ps.no_room[req] = verdict
            return _Outcome.BLOCKED, None  # its victims are stopping; their nodes are held for it
        if isinstance(verdict, NoFit):
            ps.no_room[req] = verdict
            ps.held_ahead[req] = frozenset(ps.reserved)  # what jobs ahead of it held when it found no room
            if not ps.head_blocked and not verdict.never:
                ps.head_blocked = True
                ps.reserved |= self._reservation(req, ps)
            # The stored reason changes only with its meaning; the counts are added when it is shown (waiting()).
            self._tell(shape, book, ps, verdict.summary)
            return _Outcome.BLOCKED, None
        placements = [Placement(rank=i, node_id=pl.node.id, gpus=pl.gpus, price_per_gpu_hour=pl.node.price_per_gpu_hour)
                      for i, pl in enumerate(verdict)]
        scores = [NodeScore(node_id=pl.node.id, rank=i, total=pl.score, scores=pl.scores, weights=WEIGHTS)
                  for i, pl in enumerate(verdict)] + verdict[0].runners_up
        # (always set: an attempt placed after its team's quota was removed must not count against the old one)
        charge: dict[str, Any] = {"quota_key": None} if quota is None else {
            "quota_key": quota[0], "quota_limit": self.store_limit(req, quota)}
        assert ps.commits is not None
        try:  # (written by the latest when the pass commits: _Commits, _sent)
            new = ps.commits.sends.transition(run.id, RunStatus.STARTING, placements=placements, scores=scores,
                                              reason=None, master_port=self.rng.randrange(20000, 40000), **charge)
        except (InvalidTransition, NotFound):
            return _Outcome.GONE, None  # stopped meanwhile: the change feed brings its new state
        except QuotaFull:  # another replica's placements took the team's quota: the feed brings them
            assert quota is not None
            self._tell(shape, book, ps, quota_reason(req, quota))
            self.kick()
            return _Outcome.BLOCKED, None
        except GpuBusy as busy:  # another replica placed a run there: this pass's view of that node is stale
            if busy.node_id in ps.by_id:
                ps.cands.set_free(ps.by_id[busy.node_id], [])
            self.kick()
            return _Outcome.RETRY, None
        book.apply(new)
        for pl in verdict:
            c = ps.by_id[pl.node.id]
            ps.cands.set_free(c, [g for g in c.free if g.index not in pl.gpus])
            ps.took(c, kind)
        if run.attempt > 1:  # the log says where each attempt ran and why the one before it ended (once written)
            names = ", ".join(pl.node.name for pl in verdict)
            why = run.last_reason
            ps.commits.lines[run.id] = (run.attempt, f"── attempt {run.attempt} on node {names}"
                                                       + (f": {why}" if why else ""))
        return _Outcome.PLACED, new

    def _sent(self, book: Book, ps: _Pass, placed: list[Run], failed: dict[str, Run | Exception]) -> None:
        """After the pass's transitions were written (Store.sends): `placed` as written. The book takes the
        writes' versions (the change feed leaves them out, as the scheduler's own), and forgets each placement
        that `failed` (not written: its run as stored now, its GPUs free again, the pass kicked to look again),
        or takes it as written over a newer copy of its run."""
        assert ps.commits is not None
        if not failed and not ps.commits.sends.deferred:  # (written at once: the book has them as written)
            return
        for i, new in enumerate(placed):
            got = failed.get(new.id)
            if isinstance(got, Run):
                placed[i] = new = got
            elif got is not None:
                continue
            version = new.version
            if version is not None and version > book.seq:
                book.own[new.id] = version
        if not failed:
            return
        placed[:] = [r for r in placed if not isinstance(failed.get(r.id), Exception)]
        for run_id, got in failed.items():
            if isinstance(got, Run):
                book.apply(got)
                continue
            log.info("run %s: its placement was not written (%s); the next pass looks again", run_id, got)
            ps.commits.lines.pop(run_id, None)
            stored = self.store.get_run(run_id, logs=False)
            if stored is None:
                self._book = None  # (runs are not removed: read the store again rather than guess)
            else:
                book.apply(stored)  # (its placement's GPUs free again: their nodes are looked at again)
            if isinstance(got, GpuBusy) and got.node_id in ps.by_id:  # another replica's: not for this pass
                ps.cands.set_free(ps.by_id[got.node_id], [])
        self.kick()

    def _reservation(self, req: Request, ps: _Pass) -> set[str]:
        """The nodes the blocked head holds: those with the most usable free GPUs (in a busy cluster, among the
        few with any free), then, when fewer than it needs have one, the nodes with the most such GPUs in all (a
        ranking kept per shape until the nodes change): the order placement.reservation gives, without sorting
        every node at every freed slot."""
        held = reservation(req, [c for c in ps.with_free if free_matching(req, c)])
        if len(held) < req.count:
            nodes = self.nodes()
            if self._ranked[0] is not nodes:
                # (where no node is private or a team's, owner and team do not change a ranking: one per kind of
                # request, not per user and team)
                self._ranked = (nodes, {}, any(n.owner is not None or n.teams for n in nodes))
            key = req if self._ranked[2] else dataclasses.replace(req, owner=None, team=None, preemptible=True)
            ranked = self._ranked[1].get(key)
            if ranked is None:
                self.never_fits(req)  # (builds the static candidates for these nodes)
                assert self._static is not None
                ranked = self._ranked[1][key] = ranking(req, self._static[1])
            for node_id in ranked:
                if len(held) >= req.count:
                    break
                held.add(node_id)
        return held

    def _announce(self, runs: list[Run]) -> None:
        # After the commit: an agent woken by this must find its assignment in the store.
        now = time.time()
        for run in runs:
            self.run_changed(run)
            if run.attempt == 1:
                self.tally.waited(now - run.created_at)
        self.tally.add("placements", len(runs))
        runs.clear()


class _Commits:
    """A pass's writes, committed 256 at a time (one durable commit each, not one per write), with the store
    free for other requests between them; the runs placed are announced after the commit that holds them (an
    agent woken must find its assignment)."""

    EVERY = 256

    def __init__(self, store: Any, announce: Callable[[list[Run]], None],
                 changed: Callable[[Run], None] | None = None,
                 sent: Callable[[list[Run], dict[str, Run | Exception]], None] | None = None) -> None:
        self.store, self.announce, self.on_changed, self.on_sent = store, announce, changed, sent
        self.sends = store.sends()  # the placements' transitions (one round trip for a commit's on Redis)
        self.lines: dict[str, tuple[int, str]] = {}  # run -> (attempt, its log's first line), written once placed
        self.placed: list[Run] = []
        self.flying: list[Run] = []  # placed and sent, their answers not read yet (Sends.send's overlap)
        self.placed_in_all = 0  # placements written (those send() failed left out)
        self.changed: list[Run] = []  # other runs the pass moved (preempted): told after the commit too
        self.count = 0
        self._batch: contextlib.ExitStack | None = None

    def __enter__(self) -> _Commits:
        self._open()
        return self

    def _open(self) -> None:
        self._batch = contextlib.ExitStack()
        self._batch.enter_context(self.store.batch())

    def wrote(self, placed: Run | None = None) -> None:
        if placed is not None:
            self.placed.append(placed)
        self.count += 1
        if self.count >= self.EVERY:
            self._commit(overlap=True)
            self._open()

    def placed_first(self, run_ids: Iterable[str]) -> None:
        """Commit now if one of these runs was placed since the last commit: a write about to be made reads
        them as the store has them (where a store sends a pass's placements at its commit, still queued)."""
        if (self.placed or self.flying) and not {r.id for r in self.placed + self.flying}.isdisjoint(run_ids):
            self._commit()
            self._open()

    def _commit(self, last: bool = False, overlap: bool = False) -> None:
        """Send what the pass wrote since the last commit. With `overlap`, a store may leave it in flight while
        the pass goes on (Redis runs the scripts of one commit while the pass makes the next one's placements);
        the placements are counted, logged and announced once their answers are in."""
        batch, self._batch = self._batch, None
        assert batch is not None
        try:
            failed = self.sends.send(last, overlap=overlap)
            placed, self.placed = self.flying + self.placed, []
            if flying := self.sends.in_flight():
                self.flying = [r for r in placed if r.id in flying]
                placed = [r for r in placed if r.id not in flying]
            else:
                self.flying = []
            if self.on_sent is not None:
                self.on_sent(placed, failed)
            if self.lines:
                now = time.time()
                for run in placed:
                    if (line := self.lines.pop(run.id, None)) is not None and line[0] == run.attempt:
                        self.store.append_logs(run.id, run.attempt, SYSTEM_RANK, 0, [(now, "fedml", line[1])])
        except BaseException as exc:  # (the batch is left as a failed pass leaves it: rolled back on SQLite)
            self.sends.abandon()
            batch.__exit__(type(exc), exc, exc.__traceback__)
            raise
        batch.close()
        self.placed_in_all += len(placed)
        self.count = 0
        self.announce(placed)
        for run in self.changed:
            if self.on_changed is not None:
                self.on_changed(run)
        self.changed.clear()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._batch is not None:
            if exc_type is not None:  # a failed pass: its open writes are rolled back (SQLite), not announced
                self.sends.abandon()
                self._batch.__exit__(exc_type, exc, tb)
                self._batch = None
                return
            self._commit(last=True)


class _Outcome(enum.Enum):
    PLACED = "placed"
    BLOCKED = "blocked"  # no room for the shape in this pass
    GONE = "gone"  # the run is no longer queued
    RETRY = "retry"  # a node's view was stale (GpuBusy): the same run again, without that node


class Cands:
    """Every node's candidate, kept between passes (placing._live_candidates), and the ids of those with a free
    GPU: a pass starts from those, O(nodes with a free GPU), not from every node (at 100,000 nodes a list of all
    of them cost 7 ms per pass, each freed slot a pass)."""

    def __init__(self, nodes: list[Node], book: Book, heartbeat_timeout: float) -> None:
        self.nodes, self.book, self.timeout = nodes, book, heartbeat_timeout
        self.by_id = {n.id: Candidate(node=n, free=[], now=0.0, heartbeat_timeout=heartbeat_timeout) for n in nodes}
        self.order = {n.id: i for i, n in enumerate(nodes)}
        self.free: set[str] = set()
        # (GPU type, memory) -> the nodes with such a GPU, and a request that asks for one: kind()
        self.kinds: dict[tuple[str | None, int], tuple[set[str], Request]] = {}

    def follow(self, nodes: list[Node]) -> set[str]:
        """Take the node list `nodes` (SchedulerBase.nodes: a node that did not change is the same object):
        a new candidate for each node that changed or joined, none for those that left. Returns the ids whose
        free GPUs are to be set again."""
        dirty: set[str] = set()
        ids = set()
        for n in nodes:
            ids.add(n.id)
            c = self.by_id.get(n.id)
            if c is None or c.node is not n:
                self.by_id[n.id] = Candidate(node=n, free=[], now=0.0, heartbeat_timeout=self.timeout)
                self.free.discard(n.id)
                dirty.add(n.id)
        for gone in self.by_id.keys() - ids:
            del self.by_id[gone]
            self.free.discard(gone)
            for kind, _ in self.kinds.values():
                kind.discard(gone)
        for kind, probe in self.kinds.values():
            for i in dirty:
                if usable_gpus(probe, self.by_id[i].node):
                    kind.add(i)
                else:
                    kind.discard(i)
        if dirty or len(self.order) != len(nodes):
            self.order = {n.id: i for i, n in enumerate(nodes)}
        self.nodes = nodes
        return dirty

    def kind(self, req: Request) -> set[str] | None:
        """The nodes with a GPU of the type and memory `req` asks for (None: any GPU will do): a placement's
        random walk passes the others with one look-up (with three GPU types, two visits in three ran every
        filter to learn that). Made once per kind, kept as nodes change (follow)."""
        if req.resource_type is None and not req.gpu_memory_mb:
            return None
        key = (req.resource_type, req.gpu_memory_mb)
        got = self.kinds.get(key)
        if got is None:
            if len(self.kinds) >= 64:  # (bounded: the kinds come from users' job files)
                self.kinds.clear()
            probe = Request(gpus=1, resource_type=req.resource_type, gpu_memory_mb=req.gpu_memory_mb)
            got = self.kinds[key] = ({i for i, c in self.by_id.items() if usable_gpus(probe, c.node)}, probe)
        return got[0]

    def set_free(self, c: Candidate, free: list[Any]) -> None:
        c.free = free
        if free:
            self.free.add(c.node.id)
        else:
            self.free.discard(c.node.id)

    def with_free(self) -> list[Candidate]:
        """The candidates with a free GPU, in node order (placement's choices do not depend on set order)."""
        return [self.by_id[i] for i in sorted(self.free, key=self.order.__getitem__)]


class _Pass:
    """What one scheduling pass knows: candidates with their free GPUs, and the head job's reservation."""

    def __init__(self, cands: Cands, heartbeats: Callable[..., dict[str, float]],
                 last_seen: Callable[[Node, dict[str, float]], float], heard: dict[str, float] | None = None,
                 heard_for: float = 0.0) -> None:
        self.cands = cands
        self.by_id = cands.by_id  # kept between passes: not rebuilt per pass
        self.with_free = cands.with_free()
        self._heartbeats, self._last_seen, self.now = heartbeats, last_seen, time.time()
        # Whether a node is online: from its latest heartbeat, read for the nodes this pass looks at, but for
        # those this scheduler heard from within `heard_for` (SchedulerBase._heard): alive then, so online now.
        heard = heard or {}
        fresh = {i: t for c in self.with_free if self.now - (t := heard.get(i := c.node.id, 0.0)) <= heard_for}
        seen = {**heartbeats([c.node.id for c in self.with_free if c.node.id not in fresh]), **fresh}
        for c in self.with_free:
            c.now, c.last_seen = self.now, last_seen(c.node, seen)
        self.all_seen: list[Candidate] | None = None
        self.reserved: set[str] = set()
        self.head_blocked = False
        self.no_room: dict[Request, NoFit] = {}
        self.commits: _Commits | None = None  # set by the pass
        self.held_ahead: dict[Request, frozenset[str]] = {}
        self.held_for: dict[Request, set[str]] = {}  # nodes held for runs that preempted others (by their shape)
        self.owed: dict[str, set[str]] = {}  # quota name -> teams waiting within it (preempting.py)
        self.borrowing: dict[str, dict[str, int]] = {}  # quota name -> teams over it -> by how much
        self._filled = 0
        self._of_kind: dict[int, list[int]] = {}  # id(a kind's set) -> [its nodes in with_free, those filled]

    def all(self) -> list[Candidate]:
        """Every node, heartbeats brought up to date (once per pass, only when a pass needs them all)."""
        if self.all_seen is None:
            seen = self._heartbeats()
            everyone = list(self.by_id.values())
            for c in everyone:
                c.now, c.last_seen = self.now, self._last_seen(c.node, seen)
            self.all_seen = everyone
        return self.all_seen

    def told_none_free(self, shape: Shape) -> bool:
        """A GPU shape whose runs were told "no node with a free GPU", while no node has one and the head's
        reservation is made: placement would find the same, and nothing is to be written."""
        req = shape.req
        return bool(req.gpus) and not self.cands.free and self.head_blocked and shape.reason == req.shortfall()

    def seen_now(self, node_ids: set[str]) -> None:
        """Bring these nodes' heartbeats up to date (nodes with no free GPU, which the pass did not look at)."""
        if node_ids:
            seen = self._heartbeats(list(node_ids))
            for i in node_ids:
                if (c := self.by_id.get(i)) is not None:
                    c.now, c.last_seen = self.now, self._last_seen(c.node, seen)

    def took(self, c: Candidate, kind: set[str] | None = None) -> None:
        """A placement took GPUs of `c` (for a request of GPUs of `kind`: Cands.kind). Nodes it filled stay in
        `with_free` (placement skips them) until they are half of it, or half of its nodes of that kind (a walk
        passes the other kinds at once, and runs every filter on a filled node of its own): then it is rebuilt,
        so each placement costs O(1) on average, not a list rebuild, nor a walk over the filled nodes of the
        kind a pass is using up."""
        if c.free:
            return
        self._filled += 1
        if kind is not None:
            key = id(kind)
            if key not in self._of_kind:  # (how many of with_free are of the kind, counted once per rebuild)
                self._of_kind[key] = [sum(1 for x in self.with_free if x.node.id in kind), 0]
            counts = self._of_kind[key]
            counts[1] += 1
            if counts[1] * 2 > counts[0]:
                self._filled = len(self.with_free)  # (rebuilt below)
        if self._filled * 2 > len(self.with_free):
            self.with_free = [x for x in self.with_free if x.free]
            self._filled = 0
            self._of_kind = {}


def quota_reason(req: Request, quota: tuple[str, str, int]) -> str:
    """Why a run waits for its team's quota (no counts: stored, it changes only with its meaning)."""
    _, bucket, cap = quota
    kind = "" if bucket == "any" else f" {bucket}"
    return f"team {req.team} holds its quota of {cap}{kind} GPU{'s' if cap != 1 else ''} (docs/teams.md)"
