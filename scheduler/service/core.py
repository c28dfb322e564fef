"""The scheduler's shared state and the run state's one writer: locks, the node cache, rank reports settled
by the outcome policy (scheduler/outcome.py) in one store write."""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter

from ..contract.errors import Conflict
from ..contract.models import (
    Delivery,
    GpuSample,
    Node,
    Principal,
    Run,
    RunStatus,
    Team,
)
from ..contract.series import COARSE, FINE, FLUSH_S, SAMPLE_S, Point, merge, pack, read_plan, run_key, unpack
from ..contract.series import rows as series_rows
from ..notify import Notifier
from ..outcome import decide
from ..placement import Candidate, NoFit, Request
from ..store import NotFound, Store, all_fields

if TYPE_CHECKING:
    from .book import Book
    from .placing import Cands

T = TypeVar("T")
log = logging.getLogger("fedml.scheduler")
SERIES_WRITE = 4000  # GPU series rows per store write (a write holds SQLite's lock: ~30 ms, not a whole flush)

ACTIVE = (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.PREEMPTED)  # holding GPUs
EVENTS = {RunStatus.RUNNING: "started", RunStatus.FINISHED: "finished", RunStatus.FAILED: "failed",
          RunStatus.KILLED: "killed", RunStatus.LOST: "lost"}  # a state reached -> its webhook event
LOCAL = Principal(scope="admin", owner="admin", key_id="local")  # in-process callers and tests


def new_run_id() -> str:
    # 64 bits: 32 collide within tens of thousands of runs (the birthday bound; a bench submission got a 409)
    return "run-" + secrets.token_hex(8)


# Queue waits (seconds from submission to a first placement) are counted in these buckets (GET /metrics).
WAIT_BOUNDS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class Tally:
    """What this scheduler process has done since it started, as plain counters (exported by GET /metrics,
    scheduler/routes/metrics.py): placements, runs created, heartbeats, log lines, preemptions, and queue waits by
    bucket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, float] = {"placements": 0, "runs_created": 0, "heartbeats": 0, "log_lines": 0,
                                         "preemptions": 0}
        self.waits = [0] * (len(WAIT_BOUNDS) + 1)  # per bucket (the last: above every bound)
        self.wait_sum = 0.0

    def add(self, name: str, n: float = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.waits[bisect.bisect_left(WAIT_BOUNDS, seconds)] += 1
            self.wait_sum += seconds

    def snapshot(self) -> tuple[dict[str, float], list[int], float]:
        with self._lock:
            return dict(self.counts), list(self.waits), self.wait_sum


class GroupCommit:
    """Concurrent submissions share one durable commit (Store.create_each: one SQLite transaction, one Redis round
    trip), each still committed before it is acknowledged: a submitter queues its run; whoever holds the writer's
    turn writes every run queued so far, and each learns its own outcome. Alone, a run is written at once.
    write() does the same for any other writes (a node's registration, its first heartbeat)."""

    def __init__(self) -> None:
        self._runs: list[_Slot] = []
        self._work: list[_Slot] = []
        self._lock = threading.Lock()  # guards _runs and _work
        self._turn = threading.Lock()  # one writer at a time

    def create(self, store: Store, run: Run) -> None:
        def flush(group: list[_Slot]) -> None:
            for s, error in zip(group, store.create_each([s.item for s in group]), strict=True):
                s.error = error

        self._in_turn(self._runs, _Slot(run), flush)

    def write(self, store: Store, work: Callable[[], T]) -> T:
        """Do `work` (store writes) and commit it durably before returning what it returned. Where the store's
        batch is one transaction (SQLite), concurrent callers' work shares one commit, each in a savepoint of
        its own: one that raises is undone alone and raises to its own caller; a failed commit raises to all.
        Elsewhere (Redis: each write is committed as it is made) `work` is done at once. Never call it holding
        the store (inside batch()): the writer's turn is taken before the store's lock."""
        if not store.batch_commits_once:
            return work()

        def flush(group: list[_Slot]) -> None:
            with store.batch():
                for s in group:
                    try:
                        with store.savepoint():
                            s.result = s.item()
                    except Exception as exc:  # (undone alone; the others stay)
                        s.error = exc

        return self._in_turn(self._work, _Slot(work), flush)  # type: ignore[no-any-return]

    def _in_turn(self, queue: list[_Slot], slot: _Slot, flush: Callable[[list[_Slot]], None]) -> Any:
        """Queue `slot`; whoever holds the writer's turn flushes every slot queued so far. Its result, or its
        error raised, once the flush that held it has returned."""
        with self._lock:
            queue.append(slot)
        with self._turn:
            if not slot.done:  # no writer took it: write it and everything queued behind it
                with self._lock:
                    group = queue[:]
                    queue.clear()
                try:
                    flush(group)
                except BaseException as exc:  # the store failed: none of the group is acknowledged
                    for s in group:
                        s.error = exc if isinstance(exc, Exception) else RuntimeError("the commit was interrupted")
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    for s in group:
                        s.done = True
        if slot.error is not None:
            raise slot.error
        return slot.result


class _Slot:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: Any) -> None:
        self.item = item  # a run to create, or the work to do
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


# From this many nodes on, the records the scheduler keeps (a CachedNode with its GPUs per node, a Candidate each) are
# millions of objects: see settle_heap.
BIG_CLUSTER = 10_000
_NODE_FIELDS = tuple(Node.model_fields)
_NODE_FIELDS_SET = all_fields(Node)  # the set compact_nodes shares
_SAMPLES: TypeAdapter[list[GpuSample]] = TypeAdapter(list[GpuSample])


def pack_samples(gpus: list[GpuSample]) -> bytes:
    """An agent's latest GPU sample as the scheduler keeps it until the next: its JSON, which the cyclic collector
    does not track. As GpuSample models (a dict, a fields-set and four lists each), 10,000 nodes' samples were
    ~600,000 tracked objects, replaced at every heartbeat: the collector's full passes walked them every few
    seconds, 0.6-1.5 s each with every thread stopped (bench/heartbeat.py --gpus 8 at 10,000 nodes)."""
    return _SAMPLES.dump_json(gpus)


class _NodeSlots:
    __slots__ = _NODE_FIELDS


class CachedNode(_NodeSlots):
    """A node as the node cache holds it: Node's fields in slots, read as a Node is (its attributes; model_copy
    and model_dump give a real Node's). Read-only: other holders share it (placing's candidates compare it by
    identity); a change is a model_copy(update=...) written to the store.

    Why not the parsed Node: pydantic keeps a model's fields in a dict, and 24 fields make it 832 bytes, past the
    512 bytes Python's small-object allocator serves. Each came from the C heap, between the blocks parsing freed
    around it (the row's JSON, the record's own fields-set), so none of those pages could go back: 100,000 cached
    nodes kept ~250 MiB more resident than they hold (bench/memory.py: 408 MiB with 20 fields, 690 with 24). In
    slots they are 24 pointers each, from the small-object allocator, and the parsed records are freed whole."""

    __slots__ = ()

    @classmethod
    def of(cls, node: Node | CachedNode) -> CachedNode:
        if isinstance(node, CachedNode):
            return node
        c = _NodeSlots()
        for k, v in node.__dict__.items():
            setattr(c, k, v)
        c.__class__ = cls  # (the same slots: filled writable, 2 µs a node, then read-only)
        return c  # type: ignore[return-value]

    def node(self) -> Node:
        """A real Node with these fields (the values shared, as a shallow copy's are)."""
        return Node.model_construct(_NODE_FIELDS_SET, **{k: getattr(self, k) for k in _NODE_FIELDS})

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Node:
        return self.node().model_copy(update=update, deep=deep)

    def model_dump(self, **kw: Any) -> dict[str, Any]:
        return self.node().model_dump(**kw)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a cached node is read-only (set {name} with model_copy(update=...))")

    def __repr__(self) -> str:
        return f"CachedNode(id={self.id!r}, name={self.name!r})"


def merge_nodes(nodes: list[Node], changed: list[Node], gone: set[str],
                pos: dict[str, int] | None = None) -> tuple[list[Node], dict[str, int]]:
    """`nodes` (in name order) with `changed` put in (new or replacing the node of that id) and the ids in `gone`
    taken out, in name order, and each id's position in it; every other node is the same object, no parsing.
    `pos`: each id's position in `nodes`. Nodes that only changed in place (a heartbeat's state, a drain, labels:
    almost every node write) are put where they were, in a copy of the list (O(nodes) in C: at 10,000 nodes a
    Python walk of the list took ~9 ms, and each node's first poll after a restart writes it)."""
    if pos is not None and not gone and all((i := pos.get(n.id)) is not None and nodes[i].name == n.name
                                            for n in changed):
        out = list(nodes)
        for n in changed:
            out[pos[n.id]] = n
        return out, pos
    by_id = {n.id: n for n in changed}
    drop = gone | by_id.keys()
    kept = [n for n in nodes if n.id not in drop] if drop else list(nodes)
    for n in sorted(by_id.values(), key=lambda n: n.name):
        bisect.insort(kept, n, key=lambda x: x.name)
    return kept, {n.id: i for i, n in enumerate(kept)}


def settle_heap() -> None:
    """Collect cyclic garbage once, then move every object alive to the collector's permanent generation
    (gc.freeze). The cyclic collector's full passes walk every tracked object: with 100,000 nodes in memory each
    took ~0.3 s, several per burst of placements. Frozen objects are still freed by reference counting when
    dropped; cycles among them wait for the next call, which unfreezes and collects first. Called when a big
    node list was loaded."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    trim_heap()


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc keeps what a big load freed: a book rebuilt or
    100,000 node records parsed left ~100 MB of freed memory in the process's RSS)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class SchedulerBase:
    def __init__(self, store: Store, notifier: Notifier, *, blob_exists: object = None, storage: object = None,
                 heartbeat_interval: float = 10.0, rng: random.Random | None = None) -> None:
        self.store = store
        self.notifier = notifier
        self._blob_exists = blob_exists
        self._storage = storage  # (owner, name) -> StorageObject | None: named storage (scheduler/storage.py)
        self.heartbeat_interval = heartbeat_interval
        # Fencing (runtime/fence.py): an agent's jobs die when its lease (renewed by each answered poll) runs out;
        # the node is written off only once the lease has certainly run out, with a slack for the guard to act
        # and for clocks, so a new attempt never starts while an old one may still run.
        # The slack: the guard's reaction (a tenth of a second; a container kill or a pod's grace is taken out of
        # what they are given) and the scheduler's own check cadence, which only adds to it. Half an interval,
        # at least 1 s: 25 s of lease at the 10 s default, 5 s at 2 s, 2 s at 1 s.
        self.heartbeat_timeout = 3 * heartbeat_interval  # a node silent for 3 intervals is OFFLINE
        self.lease = self.heartbeat_timeout - max(0.5 * heartbeat_interval, min(heartbeat_interval, 1.0))
        assert self.heartbeat_timeout >= self.lease + min(heartbeat_interval, 1.0)
        # (run ref, node) -> when a RUNNING placement was first missing from its node's polls (soft state)
        self._missing: dict[tuple[str, str], float] = {}
        self._idle_since: dict[str, float] = {}  # node with autostop -> since when it has had no run (clusters.py)
        self.rng = rng or random.Random()
        self._schedule_lock = threading.Lock()
        # Heartbeats are soft state (Store.heartbeat: in memory, or a Redis hash the replicas share): a durable
        # write per heartbeat would cap a 10,000-node cluster at the disk's fsync rate. Only ONLINE <-> OFFLINE
        # changes are persisted. After a restart every node gets one full timeout to check in again.
        self._started = time.time()
        # node -> when this process last heard from its agent (a poll, a report): proof that it was alive then.
        # A pass takes a node heard within half the timeout as online without reading its heartbeat from the
        # store (a round trip on Redis for every freed slot); anything older is read as before.
        self._heard: dict[str, float] = {}
        # Node records change rarely (join, drain, remove, offline); placement reads them for every launch.
        # Cached here as (checked at, "nodes" ticket, store's nodes_version, nodes), listed once; after that the
        # store's change feed (Store.nodes_since: checked at every "nodes" wake-up, which a shared store relays
        # from the other replicas, and every NODE_CACHE_S) brings the nodes written since, merged into a new list
        # in which every other node is the same object. Re-listing on a timer parsed every node every 2 s, and
        # re-listing on every change made a burst of joins quadratic (50,000 nodes joined at 197/s on Redis).
        # With each node's position in the list (merge_nodes) and the nodes whose agent is to stop: one tuple,
        # replaced whole (polls call nodes() from many threads).
        self._nodes: tuple[float, int, int, list[Node], dict[str, int], frozenset[str]] | None = None
        self._polls_refresh = threading.Lock()  # one poll at a time brings the cache up to date (agents_to_stop)
        # The same nodes with every GPU free, for "could it ever run" (placing.never_fits); rebuilt with the cache.
        # With its answers per request shape (a sweep submits one shape thousands of times).
        self._static: tuple[list[Node], list[Candidate], dict[Request, str | None]] | None = None
        # (notifier tickets, when) of the last pass that placed nothing: the next is skipped until they move.
        self._idle: tuple[tuple[int, int], float] | None = None
        # Each waiting request shape's verdict in the last pass: the counts shown with a queued run's reason.
        self._waiting: dict[Request, NoFit] = {}
        self._counted: dict[Request, str] = {}  # the same with its counts, computed when first shown
        self._reserved: dict[Request, frozenset[str]] = {}  # per waiting shape: nodes held by jobs ahead of it
        self._ranked: tuple[list[Node] | None, dict[Request, list[str]], bool] = (None, {}, False)  # placing._reservation
        # The queue by shape and the GPUs active runs hold (book.py), and the candidates built on it.
        self._book: Book | None = None
        self._book_at = 0.0
        # Runs this scheduler has just written (created, settled by a report), from any thread: the next pass
        # applies them to the book as written, and the change feed then leaves them out (Book.own). Bounded:
        # one dropped is only read back from the feed.
        self._fresh: collections.deque[Run] = collections.deque(maxlen=100_000)
        self._cands: Cands | None = None
        # The change feed after the book's seq as read with the pass lock (Store.pass_lock): (book, seq, answer)
        self._fed: tuple[Book, int, tuple[int, list[Run]]] | None = None
        self._group = GroupCommit()  # single submissions (create_run), registrations, first heartbeats share commits
        self.tally = Tally()
        # Told of each event of a run whose job has `notify:` targets, by the replica whose write made it
        # (scheduler/webhooks.py: it returns at once). None: no webhooks (tests of the scheduler alone).
        self.on_event: Callable[[Run, str, list[Any], str], None] | None = None
        self._teams: dict[str, tuple[float, Team | None]] = {}  # team_cached()
        # The agents' latest GPU samples (node -> (when, samples); soft state), and the GPUs busy outside the
        # scheduler last written on each node (agents.py).
        self._samples: dict[str, tuple[float, bytes]] = {}  # (pack_samples)
        self._outside: dict[str, list[int]] = {}
        # GPU series points not written yet (series key -> points, contract/series.py), the time of each series'
        # latest point, and since when each run's series has had none (flush_series writes them every FLUSH_S).
        self._series: dict[str, list[Point]] = {}
        self._series_at: dict[str, float] = {}
        self._series_lock = threading.Lock()
        self._idle_acted: set[tuple[str, int]] = set()  # (run, attempt) its utilization_policy acted on
        self._below: dict[tuple[str, int, int], float] = {}  # (run, attempt, rank) -> below the policy's floor since
        self._flagged: set[tuple[str, int, str, int]] = set()  # (run, attempt, node, GPU) said to use a GPU not its
        self._xids: dict[tuple[str, int], int] = {}  # (node, GPU) -> XID errors reported since this process started

    NODE_CACHE_S = 2.0

    def nodes(self) -> list[CachedNode]:
        cached, now = self._nodes, time.monotonic()
        ticket = self.notifier.ticket("nodes")
        if cached is not None and cached[1] == ticket and now - cached[0] <= self.NODE_CACHE_S:
            return cached[3]
        # Unchanged: the same list object, so what is built on it (placing's candidates) stays. Changed: the nodes
        # written since, applied to a new list in which every other node is the same object as before (what is
        # built on the list compares identities: a join costs the joined node, not every node).
        got = None if cached is None else self.store.nodes_since(cached[2])
        if cached is None or got is None or len(got[1]) + len(got[2]) > max(100, len(cached[3]) // 4):
            version = self.store.nodes_version()  # before listing: a write landing meanwhile moves it again
            nodes = [CachedNode.of(n) for n in self.store.list_nodes()]
            if len(nodes) >= BIG_CLUSTER:
                settle_heap()
            pos = {n.id: i for i, n in enumerate(nodes)}
            stop = frozenset(n.id for n in nodes if n.stop_agent)
        else:
            version, nodes, pos, stop = cached[2], cached[3], cached[4], cached[5]
            if got[0] != version:
                changed = [CachedNode.of(n) for n in got[1]]
                version, (nodes, pos) = got[0], merge_nodes(nodes, changed, got[2], pos)
                if got[2] & stop or any(n.stop_agent != (n.id in stop) for n in got[1]):
                    stop = (stop - got[2] - {n.id for n in got[1]}) | {n.id for n in got[1] if n.stop_agent}
        self._nodes = (now, ticket, version, nodes, pos, stop)
        return nodes

    def agents_to_stop(self) -> frozenset[str]:
        """Nodes whose agent is to exit once idle (Node.stop_agent): kept with the node cache, from what changed
        (a poll asks this; a scan of every node at each change cost ~7 ms at 10,000 nodes).

        One poll at a time brings the cache up to date; a poll that finds another doing it tells no agent to
        stop (the cache may not hold a write just made: a node needed again), and that agent is asked again at
        its next poll. Every poll re-listed the nodes itself when the cache was cold or far behind (a restart, a
        burst of joins): 64 at once re-listing 10,000 nodes held a Redis scheduler's first heartbeats to 108/s
        (92 s for 10,000 agents, bench/heartbeat.py)."""
        if not self._polls_refresh.acquire(blocking=False):
            return frozenset()
        try:
            self.nodes()
        finally:
            self._polls_refresh.release()
        assert self._nodes is not None
        return self._nodes[5]

    def _nodes_current(self) -> tuple[Any, ...] | None:
        """The node cache where nodes() would answer from it without reading the store; None otherwise."""
        cached = self._nodes
        if cached is None or cached[1] != self.notifier.ticket("nodes") or \
                time.monotonic() - cached[0] > self.NODE_CACHE_S:
            return None
        return cached

    def agents_to_stop_cached(self) -> frozenset[str] | None:
        """agents_to_stop() where the node cache is up to date and nothing has to be read for it; None otherwise."""
        cached = self._nodes_current()
        return None if cached is None else cached[5]

    def cached_node(self, node_id: str) -> CachedNode | None:
        """The node as the node cache holds it, where the cache is up to date (None: not cached, or read the
        store)."""
        cached = self._nodes_current()
        if cached is None or (i := cached[4].get(node_id)) is None:
            return None
        return cached[3][i]

    def _nodes_changed(self) -> None:
        """This process wrote a node: the next nodes() reads what moved (the store's feed), at once."""
        if self._nodes is not None:
            self._nodes = (-1e18, *self._nodes[1:])
        self.notifier.notify("nodes")

    def last_seen(self, node: Node, seen: dict[str, float] | None = None) -> float:
        beats = self.store.heartbeats() if seen is None else seen
        return max(node.last_seen, beats.get(node.id) or 0.0, self._started)

    @contextlib.contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """One run's read-modify-write at a time: across this process's threads and across replicas (the store's
        lock on that run alone), for writers that extend a list they read (warnings, artifacts, deliveries, the
        endpoint). Reports and stops take none: they decide inside Store.modify. Never one lock for all runs: a
        replica killed while it held a run's lock leaves it held until its TTL, and only that run's updates may
        wait for it (one process-wide lock taken first made every report, stop and poll of the surviving replica
        queue behind it, and agents' leases ran out)."""
        with self.store.lock(f"run:{run_id}"):
            yield

    def _rank_update(self, run_id: str, node_id: str, status: RunStatus, exit_code: int | None,
                     reason: str | None, attempt: int | None = None) -> Run:
        # No run lock: the report is decided on the run as stored and written with that state, as one
        # compare-and-set (Store.modify); a writer that got in between (another rank's report, a stop, a pass's
        # preemption) makes it decide again on the run as that one left it. On Redis a lock cost two round trips
        # of a freed slot's eight, and the read a third (the store remembers the run's last document).
        def change(run: Run) -> Run | None:
            if attempt is not None and attempt != run.attempt:
                raise Conflict(f"run {run_id} is on attempt {run.attempt}; attempt {attempt} was superseded")
            p = run.placement_on(node_id)
            if p is None:
                raise Conflict(f"run {run_id} is not placed on node {node_id}")
            if p.done or run.terminal or p.status == status:
                return None  # a resend, or a report about an attempt already settled
            reported = p.model_copy(update={"status": status, "exit_code": exit_code, "reason": reason})
            out = decide(run, run.job, [reported if q is p else q for q in run.placements])
            return run.changed(out.status, **out.fields)

        try:
            if status.terminal or status == RunStatus.LOST:
                before, run, passed = self._settle_freeing(run_id, change)
            else:
                (before, run), passed = self._settle(run_id, change), False
        except NotFound:
            raise NotFound(f"run {run_id} not found") from None
        if run is before:
            return run
        self.run_changed(run)
        if not passed:  # (a pass that ran with the write has placed what it could)
            self.kick()
        return run

    def _settle_freeing(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run, bool]:
        """_settle for a rank that ended (its GPUs may be freed). Returns (the run before, after, whether a
        scheduling pass ran after the write); placing.py places into the freed GPUs in the same commit."""
        return *self._settle(run_id, change), False

    def _settle(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run]:
        """The outcome policy (scheduler/outcome.py, in `change`) applied to the run's ranks as stored: the new
        state in one write. Returns (the run before, after: the same object where nothing was written)."""
        before, new = self.store.modify(run_id, change)
        if new is not before:
            self.wrote(new)
            self._settled(before, new)
        return before, new

    def _settled(self, before: Run, new: Run) -> None:
        """After a report's write (_settle): its log line, its event."""
        if new.status == RunStatus.QUEUED and new.attempt > before.attempt:
            log.info("run %s: %s", new.id, new.reason)
        self.moved(before, new)

    def wrote(self, *runs: Run) -> None:
        """Runs as a write of this scheduler's returned them: the next pass takes them into its book without
        reading them back (_sync_book)."""
        self._fresh.extend(runs)

    def moved(self, before: Run, after: Run) -> None:
        """After a write that may have moved a run: tell on_event of its event, if its job wants to hear of it
        (an attempt lost and requeued is "lost"; a state reached is started, finished, failed, killed, lost)."""
        if self.on_event is None:
            return
        targets, signer = after.job.notify, after.owner
        if not targets and after.team is not None:  # its team's default targets, signed with the team's secret
            team = self.team_cached(after.team)
            targets, signer = (team.notify if team is not None else None), f"team:{after.team}"
        if not targets:
            return
        if after.attempt > before.attempt:
            event = "lost" if any(p.status == RunStatus.LOST for p in before.placements) else None
        elif after.status != before.status:
            event = EVENTS.get(after.status)
        else:
            return
        if event is not None:
            self.on_event(after, event, targets, signer)

    TEAM_CACHE_S = 2.0

    def team_cached(self, name: str) -> Team | None:
        """A team as read at most TEAM_CACHE_S ago (each run's transitions ask for its team's webhook targets)."""
        now = time.monotonic()
        got = self._teams.get(name)
        if got is None or now - got[0] > self.TEAM_CACHE_S:
            if len(self._teams) > 10_000:
                self._teams.clear()
            got = self._teams[name] = (now, self.store.get_team(name))
        return got[1]

    def gpu_samples(self) -> dict[str, tuple[float, list[GpuSample]]]:
        """node -> (when, its latest GPU sample), as this scheduler process got them."""
        return {node_id: (at, _SAMPLES.validate_json(gpus)) for node_id, (at, gpus) in list(self._samples.items())}

    def xid_counts(self) -> dict[tuple[str, int], int]:
        """(node, GPU) -> XID (critical) errors its agent reported to this process."""
        return dict(self._xids)

    def add_point(self, key: str, point: Point) -> bool:
        """Buffer a GPU series point, unless the series has one from less than SAMPLE_S ago (agents poll more often
        than they sample). Written by the next flush_series."""
        return self.add_points([(key, point)]) == 1

    def add_points(self, points: list[tuple[str, Point]]) -> int:
        """add_point for each (key, point), under one lock (a poll brings a point per GPU). Returns how many were
        kept."""
        kept = 0
        with self._series_lock:
            at, buffered = self._series_at, self._series
            for key, point in points:
                last = at.get(key)
                if last is not None and point[0] - last < SAMPLE_S * 0.9:
                    continue
                at[key] = point[0]
                got = buffered.get(key)
                if got is None:
                    buffered[key] = [point]
                else:
                    got.append(point)
                kept += 1
        return kept

    def flush_series(self, now: float | None = None) -> int:
        """Write the buffered GPU series points to the store (every FLUSH_S, and when the scheduler stops): a crash
        loses at most that much of them (they are soft state, as heartbeats are). Returns the points written."""
        now = time.time() if now is None else now
        with self._series_lock:
            buffered, self._series = self._series, {}
            # (a series with no point for two flushes is forgotten: its next point starts it again)
            self._series_at = {k: t for k, t in self._series_at.items() if now - t < 2 * FLUSH_S}
            live = {tuple(k.split(":")[1:]) for k in self._series_at if k.startswith("run:")}
        self._below = {k: v for k, v in list(self._below.items()) if (k[0], str(k[1]), str(k[2])) in live}
        if buffered:
            rows = series_rows(buffered)
            written = 0
            try:
                for written in range(0, len(rows), SERIES_WRITE):  # (the store is free between the writes)
                    self.store.append_series(rows[written:written + SERIES_WRITE], now)
            except Exception:  # a store that cannot write now: what is not written waits for the next flush
                left = {r[0] for r in rows[written:]}  # (a series half written is written again: read once)
                with self._series_lock:
                    for key in left:
                        self._series[key] = buffered[key] + self._series.get(key, [])
                raise
        return sum(len(p) for p in buffered.values())

    def series(self, key: str, since: float, now: float | None = None) -> list[Point]:
        """A GPU series from `since`: minute means before the last hour, every point of the last hour (the store's,
        and those this process has not written yet)."""
        now = time.time() if now is None else now
        got: dict[int, bytes] = {}
        for tier, blocks in read_plan(since, now):
            got[tier.id] = self.store.read_series(key, tier.id, blocks)
        with self._series_lock:
            pending = pack(self._series.get(key, ()))  # (as the store will hold them: whole seconds, floats)
        return merge(since, now, unpack(got.get(COARSE.id, b"")), unpack(got.get(FINE.id, b"") + pending))

    def gpu_use(self, run: Run) -> dict[tuple[int, int], list[Point]]:
        """(attempt, rank) -> the series of the run's GPUs there (mean utilisation, memory used summed), from when
        the run was created."""
        ranks = {(a.attempt, p.rank) for a in run.attempts for p in a.placements if p.gpus}
        ranks |= {(run.attempt, p.rank) for p in run.placements if p.gpus}
        out = {}
        for attempt, rank in sorted(ranks):
            pts = self.series(run_key(run.id, attempt, rank), run.created_at)
            if pts:
                out[(attempt, rank)] = pts
        return out

    def record_delivery(self, run_id: str, delivery: Delivery) -> None:
        """Keep a webhook delivery on its run (the latest 20)."""
        with self.run_lock(run_id):
            run = self.store.get_run(run_id)
            if run is not None:
                self.store.update_run(run_id, deliveries=[*run.deliveries, delivery][-20:])

    def run_changed(self, run: Run) -> None:
        self.notifier.notify(f"run:{run.id}")  # (also moved by each batch of its log lines: log followers)
        for p in run.placements:
            self.notifier.notify(f"node:{p.node_id}")

    def kick(self) -> None:
        self.notifier.notify("schedule")

