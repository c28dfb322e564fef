"""The store interface: everything the scheduler persists, behind one small surface.

SQLite (sqlite_store.py) is the embedded default; a Redis store implements the same methods for scale-out.
Every method that changes state has committed it durably when it returns, so an API handler that calls
it may acknowledge.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import gc
import itertools
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .contract import errors
from .contract.errors import Conflict
from .contract.models import UNSETTLED, ApiKey, LogBatch, LogRow, Node, Run, RunStatus, Team
from .notify import Notifier


class _Bulk:
    """`bulk()`: the cyclic garbage collector paused while many records are parsed at once (below)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._holds += 1
            if self._holds == 1:
                self._was_enabled = gc.isenabled()
                gc.disable()
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if self._holds == 0 and self._was_enabled:
                    gc.enable()


# Parsed records form no reference cycles (reference counting frees them), but every object allocated counts
# towards a collection, and the collector's full passes walk everything the scheduler holds: while 100,000 nodes
# were parsed it ran ~40 of them, 4 of the 5 seconds. Nested and concurrent uses share one pause.
bulk = _Bulk()

# Every field name of Node and GpuInfo: the set a parsed stored record has as its fields-set (compact_nodes).
_ALL_SET: dict[type, set[str]] = {}


def compact_nodes(nodes: list[Node]) -> list[Node]:
    """The same nodes, each sharing one fields-set object per model class (and its GPUs theirs) where it is the
    set of every field, as for a record parsed from the store. Pydantic keeps that set per instance: ~2.2 KB for
    Node's 19 fields, ~1 KB per GpuInfo, 60 % of a cached node (3.8 -> 1.4 KiB with one GPU, 7.5 -> 3.5 with
    eight). Sharing it changes nothing: assigning a field adds a name the set has already, and model_copy copies
    the set. Returns `nodes`."""
    for node in nodes:
        _share_fields_set(node)
        for g in node.gpus:
            _share_fields_set(g)
    return nodes


def all_fields(cls: type) -> set[str]:
    """The one set of every field name of `cls` that parsed records share (a parsed record's fields-set)."""
    full = _ALL_SET.get(cls)
    if full is None:
        full = _ALL_SET[cls] = set(cls.model_fields)  # type: ignore[attr-defined]
    return full


def _share_fields_set(m: Any) -> None:
    full = all_fields(type(m))
    if m.__pydantic_fields_set__ is not full and m.__pydantic_fields_set__ == full:
        object.__setattr__(m, "__pydantic_fields_set__", full)


class Created:
    """Runs this process created, each kept parsed beside the exact document it wrote, for the pass that places
    them: a placement soon after its submission (a sweep, a burst of them) takes its run from here instead of
    parsing the document read back (~35 us, a tenth of a placement at 10,000 nodes, and the garbage that makes
    the collector run).

    A kept run is used only where the document the write is judged on is the same text, and only as the base of
    Run.changed (a copy): it is never handed out, so nothing changes it; it is a copy of the run created, so
    nothing the creator does to its own changes it either. Bounded: MAX runs, none kept past AGE seconds (a run
    that waited longer is placed as a slot frees, where a parse is a small part of the pass)."""

    MAX = 8192  # ~12 KB each at most (the parsed job spec, shared with the creator's copy while it lives)
    AGE = 60.0

    def __init__(self) -> None:
        self._runs: dict[str, tuple[float, str, Run]] = {}  # run id -> (kept at, its document, the run parsed)
        self._lock = threading.Lock()  # (request threads create, the pass takes)

    def keep(self, run: Run, doc: str) -> None:
        """Keep `run`, just written as `doc`, if it is queued (only a queued run is placed)."""
        if run.status != RunStatus.QUEUED:
            return
        copy, now = run.model_copy(), time.monotonic()
        with self._lock:
            self._prune(now)
            if len(self._runs) < self.MAX:
                self._runs[run.id] = (now, doc, copy)

    def prune(self) -> None:
        """Forget the runs kept past AGE."""
        if self._runs:
            with self._lock:
                self._prune(time.monotonic())

    def _prune(self, now: float) -> None:
        runs, too_old = self._runs, now - self.AGE
        for run_id in [i for i, _ in itertools.takewhile(lambda kv: kv[1][0] < too_old, runs.items())]:
            del runs[run_id]  # (the oldest are first)

    def parsed(self, run_id: str, doc: str) -> Run:
        """The run whose stored document is `doc`: kept (and forgotten now), or parsed. Not to be changed: only
        the base of a copy (Run.changed)."""
        with self._lock:
            got = self._runs.pop(run_id, None)
        if got is not None and got[1] == doc:
            return got[2]
        return Run.model_validate_json(doc)

    def __len__(self) -> int:
        return len(self._runs)


MISS = object()  # KeyCache.peek, Store.key_cached: the answer needs a read of the store


class KeyCache:
    """API keys by digest, remembered while the store's key version stays: every request is authenticated, and a
    look-up per request (10,000 agents heartbeating) cost a store read each (a Redis round trip; on SQLite a turn
    at the one connection every request thread queues for). The version (moved by every key write, by any
    process) is read at most every TTL seconds, so a revocation made elsewhere takes effect here within that time
    even if its wake-up is lost, and at once where it was made (changed())."""

    TTL = 1.0
    MAX = 100_000

    def __init__(self, version: Callable[[], int], read: Callable[[str], ApiKey | None]) -> None:
        self._version, self._read = version, read
        self._cache: dict[str, tuple[int, ApiKey]] = {}
        self._seen, self._checked = -1, 0.0

    def changed(self) -> None:
        """A key was written (here, or elsewhere: its wake-up): look the version up at the next request.
        Dropping the entry alone left a race: a request that had read the key before the revocation could put it
        back, tagged with the version not re-read yet, and it was used for up to a second."""
        self._cache.clear()
        self._checked = 0.0

    def peek(self, digest: str) -> ApiKey | None | object:
        """The key if the cache can answer without reading the store now (its version looked at within TTL,
        the key read under it); MISS otherwise (get() reads). Nothing is written: a request on the event loop asks
        this first, and only a miss costs a thread-pool hop."""
        if time.monotonic() - self._checked >= self.TTL:
            return MISS
        hit = self._cache.get(digest)
        return hit[1] if hit is not None and hit[0] == self._seen else MISS

    def get(self, digest: str) -> ApiKey | None:
        now = time.monotonic()
        if now - self._checked >= self.TTL:
            version = self._version()
            if version != self._seen:
                self._cache.clear()
                self._seen = version
            self._checked = now
        seen = self._seen  # an entry is good for the version seen before its read, not a later one
        hit = self._cache.get(digest)
        if hit is not None and hit[0] == seen:
            return hit[1]
        key = self._read(digest)
        if key is not None:
            if len(self._cache) > self.MAX:
                self._cache.clear()
            self._cache[digest] = (seen, key)
        return key


class NotFound(errors.NotFound, KeyError):
    """What the store does not hold: a NotFound (404) where it reaches a request."""


class AlreadyExists(Conflict, ValueError):
    """A run id, or a node name, that the store holds already: every store raises this one (nothing written);
    a Conflict (409) when a race the checks before it lost lets it reach a request."""


class Busy(Exception):
    """A Snapshot's read would have had to wait: nothing was read (ask the store itself, from a thread)."""


class Snapshot(abc.ABC):
    """What a poll reads, from the store's last commit, without waiting for a writer or another thread (Busy
    where it would have to): Store.snapshot()."""

    @abc.abstractmethod
    def node_runs(self, node_id: str, status: Iterable[RunStatus]) -> list[Run]:
        """list_runs(status=status, node_id=node_id) without a limit."""

    @abc.abstractmethod
    def get_node(self, node_id: str) -> Node | None: ...


class SeqGap(Exception):
    """A log batch starts after the next expected sequence number: lines in between were never received."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        super().__init__(f"expected sequence {expected}")


class Stale(Exception):
    """A change judged on a copy of the run that another writer's write made stale: nothing was written (the
    caller decides again on the run as stored: Store.modify)."""


class GpuBusy(Exception):
    """A placement names a GPU that another run holds: the caller's view of the cluster was stale (another
    scheduler replica placed a run there meanwhile). Nothing was written."""

    def __init__(self, node_id: str, gpu: int, holder: str) -> None:
        self.node_id, self.gpu, self.holder = node_id, gpu, holder
        super().__init__(f"GPU {gpu} of node {node_id} is held by {holder}")


class QuotaFull(Exception):
    """A placement would take its team past its quota (Run.quota_key): another replica's placements used it
    meanwhile, or the caller's count was stale. Nothing was written."""

    def __init__(self, key: str, held: int, limit: int) -> None:
        self.key, self.held, self.limit = key, held, limit
        super().__init__(f"quota {key.replace(chr(9), ' ')}: {held} of {limit} GPUs held")


class Sends:
    """Transitions a scheduling pass makes one after another, each judged alone (its own compare-and-set),
    written by the latest when send() is called: Store.sends(). Here each is written at once (a local store:
    SQLite); a store across the network sends those made since the last send() together (Redis: one round trip
    for a pass's 256 placements, not one each)."""

    deferred = False  # whether transition() leaves the write to send() (the run it returns has no _version yet)

    def __init__(self, store: Store) -> None:
        self.store = store

    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        """Store.transition's run as it will be written. Raises what that does where it is known before the
        write (here: every error, nothing written); what is known only when written comes from send()."""
        return self.store.transition(run_id, to, quota_limit=quota_limit, **fields)

    def note(self, run_id: str, **fields: object) -> None:
        """update_run of fields placement does not read (QUIET_FIELDS: a queued run's reason), which nothing
        waits on: written here at once, where sends are deferred with the next send() (answered by nothing:
        made again over a newer copy, passed over for a run gone)."""
        with contextlib.suppress(NotFound):
            self.store.update_run(run_id, **fields)

    def modify(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run]:
        """Store.modify's (before, after) as it will be written. Unlike transition(), a change another writer
        got in before is not made again over the new state: send() answers Stale for it, nothing written."""
        return self.store.modify(run_id, change)

    def send(self, last: bool = False, *, overlap: bool = False) -> dict[str, Run | Exception]:
        """Write the transitions made since the last send(). Returns those that did not end as transition()
        returned them, by run id: the run as written (another writer changed it meanwhile: the transition was
        made again over its new state), or the error, nothing written (InvalidTransition, NotFound, GpuBusy,
        QuotaFull). `last`: the pass's last; under pass_lock(), a store may let the lock go with it.
        `overlap`: a store across the network may leave these in flight (sent, their answers not read: the pass
        makes its next placements meanwhile) until the next send(), which answers for them too; in_flight()
        names them. A send() without it, or the last, answers for everything."""
        return {}

    def in_flight(self) -> set[str]:
        """The run ids of the changes sent whose answers send() has not given yet (send(overlap=True))."""
        return set()

    def abandon(self) -> None:
        """A pass that failed: what is in flight is landed (no connection is left with unread answers) and what
        was not sent is dropped; nothing of it is answered."""


@dataclasses.dataclass
class PassLock:
    """What Store.pass_lock yields."""

    taken: bool  # the lock is held (False only with wait=False)
    feed: tuple[int, list[Run]] | None  # runs_changed_since's answer, read with the lock (None: not read)
    sent: dict[str, Run | Exception]  # the sends' answer (Sends.send)


def quota_charge(run: Run | None) -> tuple[str, int]:
    """(the quota key, GPUs it holds against it) of a run as stored ("", 0: none)."""
    if run is None or not run.quota_key:
        return "", 0
    return run.quota_key, len(run.gpu_claims())


# Run fields that placement does not read: a write of only these does not move the change counter (a blocked
# pass writes the queue's reason into every waiting run; the book need not read them all back).
QUIET_FIELDS = frozenset({"reason", "artifacts", "endpoint"})

# read_logs_text's stream letters (every other stream reads as "o", stdout).
TEXT_STREAM = {"stderr": "e", "fedml": "f"}
DEFAULT_LOG_RETENTION = 1_000_000  # log lines kept per run (the newest), in every store


Cursor = tuple[float, str]  # (created_at, id) of a run: list_runs pages go on after it


class Store(abc.ABC):
    # -- runs --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_run(self, run: Run) -> Run: ...

    def create_runs(self, runs: list[Run]) -> list[Run]:
        """Create all of `runs` or none of them (AlreadyExists), also if the process dies half-way: one
        transaction (SQLite's batch()); a store whose batch() commits each write overrides this."""
        with self.batch():
            for run in runs:
                self.create_run(run)
        return runs

    def create_each(self, runs: list[Run]) -> list[Exception | None]:
        """Create each of `runs` on its own (one refused, AlreadyExists or GpuBusy, does not refuse the others),
        all in one durable commit or round trip where the store can: concurrent submissions share it
        (GroupCommit, scheduler/service/core.py). Returns, per run, None (written) or why not. In SQLite's
        batch() a refused INSERT undoes that statement only, and the rest commit together."""
        out: list[Exception | None] = []
        with self.batch():
            for run in runs:
                try:
                    self.create_run(run)
                    out.append(None)
                except (AlreadyExists, GpuBusy) as exc:
                    out.append(exc)
        return out

    @abc.abstractmethod
    def get_run(self, run_id: str, *, logs: bool = True) -> Run | None:
        """The run, with its stored log lines counted (Run.log_count) unless `logs` is False (a caller that
        does not show them: an agent's report)."""

    @abc.abstractmethod
    def list_runs(self, *, status: Iterable[RunStatus] | None = None, node_id: str | None = None,
                  owner: str | None = None, limit: int = 1000, before: Cursor | None = None) -> list[Run]:
        """Newest first; `before`: only runs older than that (created_at, id), the last of the page before."""

    def count_runs(self, owner: str | None = None) -> dict[str, int]:
        """How many runs (of `owner`) are in each state, from the stores' indexes (the dashboard's chips)."""
        out: dict[str, int] = {}
        for r in self.list_runs(owner=owner, limit=100_000_000):
            out[r.status.value] = out.get(r.status.value, 0) + 1
        return out

    def each_run(self, status: Iterable[RunStatus], page: int = 2000) -> Iterator[Run]:
        """Every run in `status`, in no set order, parsed a page at a time: not one moment's snapshot (a run
        written meanwhile may come in either state; the change feed, read from a seq taken before, settles it).
        Listing them all at once held every Run at once: ~2 GB of a scheduler rebuilding its book with 200,000
        queued and running runs."""
        yield from self.list_runs(status=status, limit=100_000_000)

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        """The runs of a sweep (Run.sweep.id), oldest first: each point's first run and any retries."""
        return sorted((r for r in self.list_runs(limit=100_000_000) if r.sweep is not None and r.sweep.id == sweep_id),
                      key=lambda r: r.created_at)

    def endpoint_runs(self) -> list[Run]:
        """Unsettled runs that serve an endpoint (the gateway's view). A store answers without parsing the other
        runs: with thousands queued, the gateway and the autoscaler look at this every half second."""
        return [r for r in self.list_runs(status=UNSETTLED, limit=1_000_000) if r.endpoint is not None]

    @abc.abstractmethod
    def runs_seq(self) -> int:
        """The store's run change counter: every run write (by any replica) takes the next value, except a
        write of QUIET_FIELDS alone."""

    @abc.abstractmethod
    def runs_changed_since(self, seq: int, limit: int = 100_000,
                           known: Mapping[str, int] | None = None) -> tuple[int, list[Run]]:
        """(the counter it read up to, the runs written after `seq` as they are now), oldest change first: the
        change feed an in-memory view of the queue and of held GPUs follows (scheduler/service/book.py). A run
        written again is listed once, by its last write. Runs are never deleted, so nothing is missed.

        `known`: run id -> the counter of a write of it the caller has applied already (Run._version of what a
        write returned). A run whose last write is that one is left out, unread and unparsed; the counter read
        up to still passes it."""

    @abc.abstractmethod
    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        """Move a run to `to` if the state machine allows it from its current state (compare-and-set),
        setting `fields` in the same write. Raises InvalidTransition or NotFound, and GpuBusy (writing
        nothing) when a placement it sets names a GPU that another unfinished placement holds. With
        `quota_limit`: QuotaFull (writing nothing) if the runs of its quota_key would hold more GPUs than that."""

    @abc.abstractmethod
    def update_run(self, run_id: str, **fields: object) -> Run:
        """Change fields other than status (reason, stop_requested...)."""

    @abc.abstractmethod
    def modify(self, run_id: str, change: Callable[[Run], Run | None], *, quiet: bool = False) -> tuple[Run, Run]:
        """One read-modify-write of a run, atomic: `change` gets the run as stored and returns it changed
        (Run.changed: the state machine's check is in it), or None for nothing to write; what it raises is
        raised, nothing written. Where another writer got in between, it is called again on the run as that one
        left it: it must decide from its argument alone (no run lock is needed around it). GpuBusy as
        transition(). Returns (the run as it was, the run as written: the same where nothing was)."""

    # -- logs --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def append_logs(self, run_id: str, attempt: int, rank: int, first_seq: int,
                    lines: list[tuple[float, str, str]]) -> int:
        """Store lines first_seq.. for (run, attempt, rank); lines below the next expected seq are duplicates
        and are dropped. Returns the next expected seq. Raises SeqGap if first_seq is beyond it. A run keeps
        at least its newest `log_retention` lines: older ones may be dropped (positions are never reused)."""

    def append_log_batch(self, run_id: str, batch: LogBatch) -> int:
        """append_logs of a batch as an agent sent it (LogBatch: columns, or rows); a store that keeps lines as
        columns takes the columns as they are."""
        return self.append_logs(run_id, batch.attempt, batch.rank, batch.first_seq, batch.rows())

    @abc.abstractmethod
    def read_logs(self, run_id: str, after: int = -1, limit: int = 5000,
                  rank: int | None = None, attempt: int | None = None) -> list[LogRow]:
        """Lines with pos > after, in order (of that rank, of that attempt)."""

    def read_logs_ndjson(self, run_id: str, after: int = -1, limit: int = 5000,
                         rank: int | None = None, attempt: int | None = None) -> tuple[int, bytes]:
        """The same lines as NDJSON records (LogRow.to_json), ready to send: (the last position read, else
        `after`; the bytes, each record ending in a newline). A store may build them without a LogRow each."""
        rows = self.read_logs(run_id, after, limit, rank, attempt)
        if not rows:
            return after, b""
        return rows[-1].pos, ("\n".join(r.to_json() for r in rows) + "\n").encode()

    def read_logs_text(self, run_id: str, after: int = -1, limit: int = 5000,
                       rank: int | None = None, attempt: int | None = None) -> tuple[int, bytes]:
        """The same lines as text records for display, ready to send: "pos<TAB>rank<TAB>S<TAB>line\n" with S
        "e" (stderr), "f" (the scheduler's own lines) or "o" (anything else). A newline inside a stored line is
        sent as a space (agents split output at newlines; the NDJSON form keeps such a line exactly). Decoding a
        record is a split, not a JSON parse: `fedml logs` reads a finished run much faster."""
        rows = self.read_logs(run_id, after, limit, rank, attempt)
        if not rows:
            return after, b""
        return rows[-1].pos, "".join(f"{r.pos}\t{r.rank}\t{TEXT_STREAM.get(r.stream, 'o')}\t"
                                     f"{r.line.replace(chr(10), ' ')}\n" for r in rows).encode()

    @abc.abstractmethod
    def next_seq(self, run_id: str, attempt: int, rank: int) -> int: ...

    @abc.abstractmethod
    def tail_after(self, run_id: str, n: int, rank: int | None = None) -> int:
        """The position to read after for the last `n` lines (of `rank`, if given): -1 if there are fewer."""

    @abc.abstractmethod
    def log_counts(self, run_ids: list[str]) -> dict[str, int]:
        """Lines stored per run, for lists (what get_run puts in Run.log_count)."""

    # -- nodes -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def upsert_node(self, node: Node) -> Node: ...

    @abc.abstractmethod
    def get_node(self, node_id: str) -> Node | None: ...

    @abc.abstractmethod
    def list_nodes(self) -> list[Node]: ...

    @abc.abstractmethod
    def nodes_version(self) -> int:
        """A counter every node write moves (join, change, state, removal; by any process or replica): a reader
        that saw the same value before it listed the nodes holds them all as they are (heartbeats aside: soft
        state, Store.heartbeat). One small read: a cache of the nodes is checked, not re-listed."""

    def nodes_since(self, version: int) -> tuple[int, list[Node], set[str]] | None:
        """The nodes' change feed: (the version now, the nodes written after `version` as they are now, the ids
        of those removed after it). A cache of the nodes as they were at `version` applies these instead of
        listing every node again (a join or a drain at 100,000 nodes re-parsed them all: seconds). None when the
        store cannot tell (this default; a version the store has not reached): list them all."""
        return None

    @abc.abstractmethod
    def node_by_name(self, name: str) -> Node | None: ...

    @abc.abstractmethod
    def touch_node(self, node_id: str, ts: float) -> Node:
        """Record a heartbeat; an OFFLINE node becomes ONLINE. Returns the node. Raises NotFound."""

    @abc.abstractmethod
    def delete_node(self, node_id: str) -> None: ...

    # -- API keys ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    def key_by_hash(self, digest: str) -> ApiKey | None: ...

    def key_cached(self, digest: str) -> ApiKey | None | object:
        """key_by_hash's answer if it needs no read of the store now (no I/O: safe on the event loop), else MISS."""
        return MISS

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    def batch(self) -> Any:
        """Group several writes so they cost one durable commit (SQLite: one transaction). It promises no
        atomicity across them (Redis commits each write as it comes): callers that need two changes to be seen
        together make them one write (a transition with its fields)."""
        return contextlib.nullcontext()

    def sends(self) -> Sends:
        """Transitions sent together (see Sends): for a pass that places many runs."""
        return Sends(self)

    # Whether batch() is one transaction (SQLite): its writes commit together, at its end, and savepoint()
    # works in it. A report that frees GPUs is then committed with the placements into them, one durable
    # commit per freed slot instead of two (service/placing.py: _settle_freeing).
    batch_commits_once = False

    def savepoint(self) -> Any:
        """Inside batch(), where batch_commits_once: the writes made in it are undone if it raises (the
        exception goes on), and the batch's other writes stay."""
        raise NotImplementedError(f"{type(self).__name__} has no savepoints")

    # -- teams (docs/teams.md) -------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_team(self, team: Team, *, new: bool = False) -> Team:
        """Write a team; with `new`, AlreadyExists if one of that name exists (checked in the same step)."""

    @abc.abstractmethod
    def get_team(self, name: str) -> Team | None: ...

    @abc.abstractmethod
    def list_teams(self) -> list[Team]:
        """Every team, by name."""

    @abc.abstractmethod
    def delete_team(self, name: str) -> None:
        """NotFound if there is none."""

    # -- GPU series (contract/series.py: tiers of blocks of packed points) ------------------------------------
    @abc.abstractmethod
    def append_series(self, rows: list[tuple[str, int, int, bytes]], now: float) -> None:
        """Append each (key, tier, block, packed points) to that block, in one write, and drop the blocks past
        their tier's keep (as of `now`)."""

    @abc.abstractmethod
    def read_series(self, key: str, tier: int, blocks: range) -> bytes:
        """The packed points of `key`'s blocks `blocks` of `tier`, in block order (missing blocks: nothing)."""

    # -- what scheduler replicas sharing this store must agree on ------------------------------------------
    # Defaults serve a store that one scheduler process owns (SQLite): state and locks of this instance.
    # A store shared by several replicas (Redis) keeps these where every replica sees them.
    def __init__(self, log_retention: int = DEFAULT_LOG_RETENTION) -> None:
        if log_retention < 1:
            raise ValueError("log_retention: at least 1 line per run")
        self.log_retention = log_retention
        self._soft = threading.Lock()
        self._seen: dict[str, float] = {}
        self._stripes = tuple(threading.RLock() for _ in range(64))

    def heartbeat(self, node_id: str, ts: float) -> float | None:
        """Record a heartbeat (soft state: fast, not durable). Returns the one before (None: none since
        this store was opened; 0.0: the node was marked OFFLINE since)."""
        with self._soft:
            before = self._seen.get(node_id)
            self._seen[node_id] = ts
        return before

    def heartbeat_if_seen(self, node_id: str, ts: float) -> float | None:
        """`heartbeat`, but only for a node with a heartbeat already (not None, not 0.0: marked OFFLINE since),
        in one step: returns the one before, and a falsy one means nothing was recorded (the first heartbeat
        persists the node's state: a write, not this). Used with snapshot()."""
        with self._soft:
            before = self._seen.get(node_id)
            if before:
                self._seen[node_id] = ts
        return before

    def heartbeat_unless_offline(self, node_id: str, ts: float) -> bool:
        """`heartbeat`, unless the node is marked OFFLINE (0.0), in one step; whether it was recorded. For a
        registration, just written with the node ONLINE: its agent was heard from, so its first poll need not
        write that again. A node marked OFFLINE meanwhile (a sweep racing a re-registration) stays marked: its
        next poll persists ONLINE, as any node's coming back does."""
        with self._soft:
            if self._seen.get(node_id) == 0.0:
                return False
            self._seen[node_id] = ts
        return True

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot | None]:
        """Reads that never wait (Snapshot), for the block: an event loop reads itself instead of handing a
        short read to a thread (the hand-off was half of a heartbeat's cost). None where there are none (here: a
        store over the network waits for its answers)."""
        yield None

    async def poll_reads(self, node_id: str, ts: float,
                         status: Iterable[RunStatus]) -> tuple[float | None, list[Run]] | None:
        """heartbeat_if_seen, and the node's runs in `status` (as heartbeat_and_runs lists them; none where the
        heartbeat was not recorded), awaited on the event loop: a poll's reads where snapshot() has none (a store
        over the network waits for its answers; an event loop awaits them instead of handing the poll to a
        thread). None where the store has no such reads (here: the poll reads a snapshot, or in a thread)."""
        return None

    def heartbeat_and_runs(self, node_id: str, ts: float, status: Iterable[RunStatus]) -> tuple[float | None, list[Run]]:
        """A poll's two reads as one call: record the heartbeat (as `heartbeat`) and list the node's runs in
        `status` (as `list_runs(status=..., node_id=...)`). A shared store answers both in one round trip."""
        return self.heartbeat(node_id, ts), self.list_runs(status=status, node_id=node_id, limit=1_000_000)

    def heartbeats(self, node_ids: Iterable[str] | None = None) -> dict[str, float]:
        """The latest heartbeat of every node, or of `node_ids` only (a pass asks for the few it looks at)."""
        with self._soft:
            if node_ids is None:
                return dict(self._seen)
            return {n: t for n in node_ids if (t := self._seen.get(n)) is not None}

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 5.0) -> Iterator[None]:
        """Hold `name` against every scheduler sharing this store (re-entrant within a thread). A shared
        store's lock expires `ttl` seconds after it was taken (its holder may have died); a waiter gives up
        with TimeoutError after ttl + 5 s."""
        with self._stripes[zlib.crc32(name.encode()) % len(self._stripes)]:
            yield

    @contextlib.contextmanager
    def pass_lock(self, ttl: float, feed: tuple[int, Callable[[], Mapping[str, int]]] | None = None, *,
                  sends: Sends | None = None, wait: bool = True) -> Iterator[PassLock]:
        """lock("schedule", ttl) for one scheduling pass, first sending `sends` (its answer: PassLock.sent).
        wait=False: where another holds it, do not wait (PassLock.taken False). `feed` = (seq, known): a store
        whose reads are round trips may read runs_changed_since(seq, known=known()) in the same round trip
        (PassLock.feed; else None: the pass reads the feed itself), after the sends are written, and may let
        the lock go in the round trip of the pass's last Sends.send(last=True)."""
        sent = sends.send() if sends is not None else {}
        stripe = self._stripes[zlib.crc32(b"schedule") % len(self._stripes)]  # (lock()'s)
        if not stripe.acquire(blocking=wait):
            yield PassLock(False, None, sent)
            return
        try:
            yield PassLock(True, None, sent)
        finally:
            stripe.release()

    def notifier(self) -> Notifier:
        """Wake-ups for long polls and log followers; a shared store relays them between replicas."""
        return Notifier()

    def probe_write(self) -> None:
        """One small durable write (raises what a real write would): is the store writable again?"""
        with self.lock("probe", ttl=5.0):
            pass

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
