"""Redis store: the same interface as the SQLite store, shared by several scheduler replicas.

    python -m scheduler.server --store redis://HOST:6379/0[?prefix=fedml:] --home DIR --blob-dir SHARED

Every key is built in `Keys` and every Lua script is in redis_schema.py; the pub/sub relay is redis_notify.py.
A run is one JSON document; its indexes (by status, owner, node) and the GPUs it holds are changed by the Lua
script `PUT_RUN` in the same atomic step as the document, and only if the document is still the one the writer
read (compare-and-set). The script also refuses a placement naming a GPU another run holds, so two replicas can
never place the same run twice or hand one GPU to two runs, whatever their caches say. Logs are a Redis Stream
per run (entry id 0-(pos+1)), trimmed to the newest `log_retention` lines; heartbeats are a hash (soft state);
locks are redis-py locks with a TTL; wake-ups for long polls are relayed between replicas over pub/sub.

Durability is Redis's: run it with `appendonly yes` (and `appendfsync always` for "committed before
acknowledged" across a power loss, as the SQLite store gives).

A little over the usual size: it is one implementation of one interface (scheduler/store.py), method for
method beside the SQLite store; its keys and scripts and its pub/sub relay already live apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import hiredis
import redis

from .contract.models import TERMINAL, UNSETTLED, ApiKey, InvalidTransition, LogRow, Node, Run, RunStatus, Team
from .contract.series import TIERS
from .notify import Notifier
from .redis_notify import RelayNotifier
from .redis_schema import (
    APPEND_LOGS,
    APPEND_SERIES,
    CAS_FIELD,
    DEL_NODE,
    HEARTBEAT,
    HEARTBEAT_IF_SEEN,
    HEARTBEAT_UNLESS_OFFLINE,
    LOG_CHUNK,
    PUT_KEY,
    PUT_NODE,
    PUT_RUN,
    QUEUED_DOCS,
    RELEASE_LOCK,
    Keys,
    parse_url,
)
from .store import (
    DEFAULT_LOG_RETENTION,
    QUIET_FIELDS,
    AlreadyExists,
    Created,
    Cursor,
    GpuBusy,
    KeyCache,
    NotFound,
    PassLock,
    QuotaFull,
    Sends,
    SeqGap,
    Stale,
    Store,
    bulk,
    compact_nodes,
    quota_charge,
)

log = logging.getLogger("fedml.scheduler")

def _claims(run: Run | None) -> set[tuple[str, int]]:
    return set() if run is None else run.gpu_claims()


def _nodes_of(run: Run | None) -> set[str]:
    if run is None or run.status in TERMINAL:
        return set()
    return {p.node_id for p in run.placements}


class RedisStore(Store):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str | None = None,
                 log_retention: int = DEFAULT_LOG_RETENTION) -> None:
        super().__init__(log_retention)
        plain, url_prefix = parse_url(url)
        self.url = plain
        self.k = Keys(prefix if prefix is not None else url_prefix)
        self.r = redis.Redis.from_url(plain, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
                                      retry_on_timeout=True)
        self.r.ping()  # fail at start, with the reason, rather than at the first request
        self._put_run = self.r.register_script(PUT_RUN)
        self._release_lock = self.r.register_script(RELEASE_LOCK)
        self._queued_docs = self.r.register_script(QUEUED_DOCS)
        self._append = self.r.register_script(APPEND_LOGS)
        self._put_node = self.r.register_script(PUT_NODE)
        self._cas_field = self.r.register_script(CAS_FIELD)
        self._del_node = self.r.register_script(DEL_NODE)
        self._put_key = self.r.register_script(PUT_KEY)
        self._heartbeat = self.r.register_script(HEARTBEAT)
        self._heartbeat_if_seen = self.r.register_script(HEARTBEAT_IF_SEEN)
        self._heartbeat_unless_offline = self.r.register_script(HEARTBEAT_UNLESS_OFFLINE)
        self._append_series = self.r.register_script(APPEND_SERIES)
        self._locks = threading.local()
        self._notifier: RelayNotifier | None = None
        # The documents this process last read or wrote: a write expects them without reading again (a
        # placement right after the pass listed the queue costs one round trip, not two). A stale one only
        # costs a failed compare-and-set and a fresh read.
        self._docs_seen: dict[str, str] = {}
        self._created = Created()  # the runs created here, parsed, for their placement
        self._keys = KeyCache(lambda: int(self.r.get(self.k.keys_version) or 0), self._read_key)
        self._endpoints_ready = False  # the endpoints set is known to be built (endpoint_runs)
        self._aclient: tuple[Any, Any, Any] | None = None  # (event loop, its client, a script): poll_reads

    # -- runs --------------------------------------------------------------------------------------------
    def _put_call(self, old_doc: str, old: Run | None, new: Run, quiet: bool,
                  quota_limit: int | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of PUT_RUN (redis_schema.py) for writing `new` over `old_doc`."""
        k = self.k
        release = _claims(old) - _claims(new)
        claim = _claims(new) - _claims(old)
        serving = "" if new.endpoint is None else "-" if new.status not in UNSETTLED else "+"
        args: list[Any] = [new.id, old_doc, new.model_dump_json(), repr(new.created_at), k.gpus(""), k.node_runs(""),
                           k.endpoints, serving]
        for group in (sorted(_nodes_of(old)), sorted(_nodes_of(new)),
                      sorted(f"{n}\t{g}" for n, g in release), sorted(f"{n}\t{g}" for n, g in claim)):
            args += [len(group), *group]
        args += [6, k.quota_held, *quota_charge(old), *quota_charge(new), -1 if quota_limit is None else quota_limit]
        old_status = old.status.value if old else new.status.value
        return [k.run(new.id), k.runs, k.status(old_status), k.status(new.status.value), k.owner(new.owner),
                *(() if quiet else (k.changes, k.runs_seq))], args

    def _put(self, old_doc: str, old: Run | None, new: Run, quiet: bool = False,
             quota_limit: int | None = None) -> str:
        """Write `new` if the stored document is still `old_doc` ("" = must not exist), and return the document
        written. Raises _Conflict."""
        keys, args = self._put_call(old_doc, old, new, quiet, quota_limit)
        failed = self._said(self._puts([(keys, args)])[0], new, args[2])
        if failed is not None:
            raise failed
        return str(args[2])

    def _said(self, got: Any, new: Run, doc: str) -> Exception | None:
        """What PUT_RUN answered for writing `new` (as `doc`): None where written, else the error."""
        if isinstance(got, Exception):  # (a pipeline's: the command failed)
            return got
        got = got.decode() if isinstance(got, bytes) else got
        if got == "ok" or got.startswith("ok\t"):
            self._remember(new.id, doc)
            new._version = int(got[3:]) if got != "ok" else None
            return None
        if got == "exists":
            return AlreadyExists(f"run {new.id} exists already")
        if got == "conflict":
            self._docs_seen.pop(new.id, None)
            return _Conflict()
        if got.startswith("quota\t"):
            _, team, bucket, held, limit = got.split("\t")  # (the key is "team<TAB>bucket")
            return QuotaFull(f"{team}\t{bucket}", int(held), int(limit))
        _, node, gpu, holder = got.split("\t")
        return GpuBusy(node, int(gpu), holder)

    def create_run(self, run: Run) -> Run:
        if run.sweep is not None:  # with its sweep's set, in one transaction
            return self.create_runs([run])[0]
        doc = self._put("", None, run)
        self._created.keep(run, doc)
        return run

    def create_each(self, runs: list[Run]) -> list[Exception | None]:
        # One round trip: a pipeline of PUT_RUN calls, each atomic on its own (not a transaction: one run id
        # taken must not refuse the others).
        calls = [self._put_call("", None, run, False) for run in runs]
        got = self._puts(calls)
        out: list[Exception | None] = []
        for (_, args), run, g in zip(calls, runs, got, strict=True):
            said = g.decode() if isinstance(g, bytes) else g
            if isinstance(said, str) and said.startswith("ok\t"):
                self._remember(run.id, args[2])
                run._version = int(said[3:])
                self._created.keep(run, args[2])
                out.append(None)
            elif said == "exists":
                out.append(AlreadyExists(f"run {run.id} exists already"))
            elif isinstance(said, str) and said.startswith("busy\t"):
                _, node, gpu, holder = said.split("\t")
                out.append(GpuBusy(node, int(gpu), holder))
            else:
                out.append(g if isinstance(g, Exception) else RuntimeError(f"create run {run.id}: {said!r}"))
        return out

    def create_runs(self, runs: list[Run]) -> list[Run]:
        # All or none, also if this process dies half-way: the runs' keys are watched, none may exist, and the
        # writes go in one MULTI/EXEC (a run id taken meanwhile aborts it, and nothing is written).
        calls = [self._put_call("", None, run, False) for run in runs]
        with self.r.pipeline(transaction=True) as p:
            run_keys = [keys[0] for keys, _ in calls]
            p.watch(*run_keys)
            if p.exists(*run_keys):
                raise AlreadyExists("a run id of the batch exists already; nothing was written")
            p.multi()
            for keys, args in calls:
                self._put_run(keys=keys, args=args, client=p)
            for run in runs:
                if run.sweep is not None:
                    p.sadd(self.k.sweep(run.sweep.id), run.id)
            try:
                got = p.execute()
            except redis.WatchError:
                raise AlreadyExists("a run of the batch was written meanwhile; nothing was written") from None
        said = [g.decode() if isinstance(g, bytes) else g for g in got[:len(calls)]]  # (then the sweeps' SADDs)
        bad = [g for g in said if not (isinstance(g, str) and g.startswith("ok\t"))]
        if bad:  # cannot be: the keys were watched and absent
            raise RuntimeError(f"batch create: {bad[0]!r}")
        for (_, args), run, g in zip(calls, runs, said, strict=True):
            self._remember(run.id, args[2])
            run._version = int(g[3:])
            self._created.keep(run, args[2])
        return runs

    def _puts(self, calls: list[tuple[list[str], list[Any]]],
              let_go: tuple[list[str], list[Any]] | None = None) -> list[Any]:
        """PUT_RUN for each (KEYS, ARGV), in one round trip: each call's answer, or the error it met. Not through
        redis-py's script objects: a pipeline of those asks SCRIPT EXISTS first, a round trip more each time. A
        server that lost the script (restarted) answers NOSCRIPT without running the call: it is loaded and those
        calls are sent again. `let_go`: the pass lock's release (_let_go), sent in the same round trip."""
        return self._with_puts(calls, let_go=let_go)[0]

    def _with_puts(self, calls: list[tuple[list[str], list[Any]]], more: Sequence[tuple[Any, ...]] = (),
                   let_go: tuple[list[str], list[Any]] | None = None) -> tuple[list[Any], list[Any]]:
        """_puts's calls, then the commands `more` (raw: their replies as the server sent them), then the pass
        lock's release, in one round trip: (the calls' answers, those of `more`). Calls the server refused for
        want of the script are sent again once it is loaded; so is the release, alone."""
        return self._landed(self._send_puts(calls, more, let_go))

    def _send_puts(self, calls: list[tuple[list[str], list[Any]]], more: Sequence[tuple[Any, ...]] = (),
                   let_go: tuple[list[str], list[Any]] | None = None) -> _Flight:
        """_with_puts's commands sent, their replies left to read (_landed)."""
        sha = self._put_run.sha
        commands: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        commands.extend(more)
        if let_go is not None:
            commands.append(("EVALSHA", self._release_lock.sha, len(let_go[0]), *let_go[0], *let_go[1]))
        return self._pipe_send(commands, (calls, let_go))

    def _landed(self, flight: _Flight) -> tuple[list[Any], list[Any]]:
        """_with_puts's answer to what _send_puts sent."""
        calls, let_go = flight.what
        got = self._pipe_read(flight)
        if let_go is not None:
            *got, released = got
            if isinstance(released, redis.exceptions.NoScriptError):
                self._release_lock(keys=let_go[0], args=let_go[1])
        puts, rest = got[:len(calls)], got[len(calls):]
        lost = [i for i, g in enumerate(puts) if isinstance(g, redis.exceptions.NoScriptError)]
        if lost:
            self._put_run.sha = sha = self.r.script_load(PUT_RUN)
            again = self._pipe([("EVALSHA", sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in lost])
            for i, g in zip(lost, again, strict=True):
                puts[i] = g
        return puts, rest

    def _pipe(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Each command's reply as the server sent it (bytes, ints, lists, None: no redis-py callback), or the
        error it answered, all in one round trip. Packed by hiredis and read raw, not through redis-py's
        Pipeline, which encodes each argument in a Python call of its own and runs a callback per reply: for a
        pass's PUT_RUN calls (~30 arguments each) that was a fifth of a freed slot's own time."""
        return self._pipe_read(self._pipe_send(commands))

    def _pipe_send(self, commands: list[tuple[Any, ...]], what: Any = None) -> _Flight:
        """_pipe's first half: the commands sent on a connection taken from the pool, which the _Flight holds
        until _pipe_read has read their replies (a pass computes its next placements meanwhile)."""
        packed = b"".join([hiredis.pack_command(c) for c in commands])  # (before a connection is taken)
        flight = _Flight(self.r.connection_pool.get_connection(), len(commands), packed, what)
        if commands:
            try:
                flight.conn.send_packed_command([flight.packed])
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                flight.sent = False  # (sent again, on a new connection, when it is read)
            except BaseException:
                flight.conn.disconnect()
                self.r.connection_pool.release(flight.conn)
                raise
        return flight

    def _pipe_read(self, flight: _Flight) -> list[Any]:
        """_pipe's second half: the replies of what _pipe_send sent. A broken connection is dropped and the
        commands sent again on a new one, as redis-py's pipelines do (a PUT_RUN that had landed then answers
        "conflict", and is decided again over what it wrote)."""
        conn, n = flight.conn, flight.n

        def replies() -> list[Any]:
            out: list[Any] = []
            for _ in range(n):
                try:
                    out.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:  # (read whole: the next reply follows)
                    out.append(exc)
            return out

        def again() -> list[Any]:
            conn.send_packed_command([flight.packed])
            return replies()
        try:
            if not n:
                return []
            if flight.sent:
                try:
                    return replies()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    conn.disconnect()
            return conn.retry.call_with_retry(again, lambda _error: conn.disconnect())
        except BaseException:
            conn.disconnect()  # (replies may be left unread on it: never hand it to the next caller)
            raise
        finally:
            self.r.connection_pool.release(conn)

    DOCS_SEEN = 20_000  # run documents remembered (the newest used): ~2 KB each

    def _remember(self, run_id: str, doc: str) -> None:
        seen = self._docs_seen
        seen.pop(run_id, None)  # (to the end: the oldest used go first)
        seen[run_id] = doc
        if len(seen) > self.DOCS_SEEN:
            for old in list(itertools.islice(seen, len(seen) // 10)):
                del seen[old]

    def _read(self, run_id: str, fresh: bool = False, kept: bool = False) -> tuple[str, Run] | None:
        """(its document, the run): remembered unless `fresh`, else read. With `kept`, the run may be the one
        kept from its creation (Created): only the base of a copy, never handed out."""
        doc = None if fresh else self._docs_seen.get(run_id)
        if doc is None:
            raw = self.r.get(self.k.run(run_id))
            if raw is None:
                return None
            doc = raw.decode()
            self._remember(run_id, doc)
        return doc, self._created.parsed(run_id, doc) if kept else Run.model_validate_json(doc)

    QUEUED_AHEAD = 256  # documents read with a queued run this replica does not remember (a pass's commit)

    def _remember_queued(self, run_id: str) -> None:
        """Remember `run_id`'s document and those of the runs queued after it (QUEUED_DOCS): a pass placing the
        queue in order after a restart, or behind more queued runs than DOCS_SEEN, reads its runs' documents
        QUEUED_AHEAD at a time, not one round trip each."""
        got = self._queued_docs(keys=[self.k.status(RunStatus.QUEUED.value)],
                                args=[run_id, self.QUEUED_AHEAD, self.k.run("")])
        for i in range(0, len(got), 2):
            self._remember(got[i].decode(), got[i + 1].decode())

    def get_run(self, run_id: str, *, logs: bool = True) -> Run | None:
        if not logs:  # (one command: a pipeline of one costs its set-up, ~15 us, on every report's read)
            raw, pos = self.r.get(self.k.run(run_id)), []
        else:
            with self.r.pipeline(transaction=False) as p:
                p.get(self.k.run(run_id))
                p.get(self.k.log_pos(run_id))
                raw, *pos = p.execute()
        if raw is None:
            return None
        self._remember(run_id, raw.decode())
        run = Run.model_validate_json(raw)
        if logs:
            run.log_count = int(pos[0] or 0)
        return run

    def modify(self, run_id: str, change: Callable[[Run], Run | None], *, quiet: bool = False) -> tuple[Run, Run]:
        return self._modify(run_id, change, quiet)

    def _modify(self, run_id: str, change: Callable[[Run], Run | None], quiet: bool = False,
                quota_limit: int | None = None) -> tuple[Run, Run]:
        """Read (or remember), change, compare-and-set; again, on a fresh read, if another writer got in between."""
        for attempt in range(1000):
            doc, old, new = self._changed(run_id, change, fresh=attempt > 0)
            if new is None:
                return old, old
            try:
                self._put(doc, old, new, quiet, quota_limit)
                return old, new
            except _Conflict:
                continue
        raise RuntimeError(f"run {run_id}: too many concurrent writers")

    def _changed(self, run_id: str, change: Callable[[Run], Run | None],
                 fresh: bool = False, kept: bool = False) -> tuple[str, Run, Run | None]:
        """(the stored document, the run, the run changed): read, or remembered. Only a change to write is
        judged on a remembered copy: where `change` refuses it or finds nothing to write, the run is read again
        and judged on that (a copy another replica's write left stale must not refuse, nor skip, a change).
        `kept`: _read's (the run returned is not to be changed, nor handed out)."""
        got = self._read(run_id, fresh=fresh, kept=kept)
        if got is None:
            raise NotFound(run_id)
        doc, old = got
        if fresh:
            return doc, old, change(old)
        try:
            new = change(old)
        except Exception:
            new = None
        if new is not None:
            return doc, old, new
        self._docs_seen.pop(run_id, None)  # judged on a remembered copy: look again
        return self._changed(run_id, change, fresh=True)

    def sends(self) -> _Sends:
        return _Sends(self)

    def runs_seq(self) -> int:
        return int(self.r.get(self.k.runs_seq) or 0)

    def runs_changed_since(self, seq: int, limit: int = 100_000,
                           known: Mapping[str, int] | None = None) -> tuple[int, list[Run]]:
        got = self.r.zrangebyscore(self.k.changes, f"({seq}", "+inf", start=0, num=limit, withscores=True)
        return self._feed_page(seq, got, known)

    def _feed_page(self, seq: int, got: list[tuple[bytes, float]],
                   known: Mapping[str, int] | None) -> tuple[int, list[Run]]:
        """runs_changed_since's answer from its ZRANGEBYSCORE's: the runs not `known` read (MGET)."""
        if not got:
            return seq, []
        known = known or {}
        return int(got[-1][1]), self._docs([m.decode() for m, v in got if known.get(m.decode()) != int(v)])

    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        return self._modify(run_id, lambda run: run.changed(to, **fields), quota_limit=quota_limit)[1]

    def update_run(self, run_id: str, **fields: object) -> Run:
        return self._modify(run_id, lambda run: run.changed(**fields), quiet=fields.keys() <= QUIET_FIELDS)[1]

    def list_runs(self, *, status: Iterable[RunStatus] | None = None, node_id: str | None = None,
                  owner: str | None = None, limit: int = 1000, before: Cursor | None = None) -> list[Run]:
        statuses = None if status is None else {s.value for s in status}
        k = self.k
        if node_id is not None:
            ids = [m.decode() for m in self.r.smembers(k.node_runs(node_id))]
            return self._filtered(ids, statuses, owner, limit, before)
        # Newest first from the most selective index; filters applied after reading need every id.
        filtering = owner is not None and statuses is not None
        top = "+inf" if before is None else before[0]  # (inclusive: ties with the cursor are cut below)
        num = None if filtering else limit + (64 if before is not None else 0)
        sets = [k.status(s) for s in statuses] if statuses is not None else [k.owner(owner) if owner else k.runs]
        with self.r.pipeline(transaction=False) as p:
            for key in sets:
                p.zrevrangebyscore(key, top, "-inf", start=0 if num is not None else None, num=num, withscores=True)
            scored = [(m.decode(), score) for part in p.execute() for m, score in part]
        scored.sort(key=lambda pair: (-pair[1], _desc(pair[0])))
        if before is not None:
            scored = [(m, sc) for m, sc in scored if sc < before[0] or (sc == before[0] and m < before[1])]
        ids = [m for m, _ in scored]
        return self._filtered(ids if filtering else ids[:limit], statuses, owner, limit, before)

    def count_runs(self, owner: str | None = None) -> dict[str, int]:
        states = [s.value for s in RunStatus]
        with self.r.pipeline(transaction=False) as p:
            for st in states:  # an owner's: the size of the intersection of its set and the state's (ZINTERCARD)
                p.zcard(self.k.status(st)) if owner is None else p.zintercard(2, [self.k.status(st), self.k.owner(owner)])
            got = p.execute()
        return {st: int(n) for st, n in zip(states, got, strict=True) if n}

    def each_run(self, status: Iterable[RunStatus], page: int = 2000) -> Iterator[Run]:
        statuses = {s.value for s in status}
        with self.r.pipeline(transaction=False) as p:
            for s in statuses:
                p.zrange(self.k.status(s), 0, -1)
            ids = [m.decode() for part in p.execute() for m in part]
        for i in range(0, len(ids), page):
            for run in self._docs(ids[i:i + page]):
                if run.status.value in statuses:  # (moved meanwhile)
                    yield run

    def _filtered(self, ids: list[str], statuses: set[str] | None, owner: str | None, limit: int,
                  before: Cursor | None = None) -> list[Run]:
        runs = self._docs(ids)
        out = [r for r in runs if (statuses is None or r.status.value in statuses)
               and (owner is None or r.owner == owner) and (before is None or (r.created_at, r.id) < before)]
        out.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return out[:limit]

    def endpoint_runs(self) -> list[Run]:
        # From the endpoints set PUT_RUN keeps: the gateway asks every second, and reading every queued and running
        # run instead made an idle scheduler's CPU grow with its queue.
        if not self._endpoints_ready:  # once per process, not a round trip each second
            if not self.r.exists(self.k.endpoints_built):
                self._build_endpoints()
            self._endpoints_ready = True
        ids = [m.decode() for m in self.r.smembers(self.k.endpoints)]
        out: list[Run] = []
        for i in range(0, len(ids), 1000):
            for raw in self.r.mget([self.k.run(x) for x in ids[i:i + 1000]]):
                if raw is not None:
                    run = Run.model_validate_json(raw)
                    if run.endpoint is not None and run.status in UNSETTLED:
                        out.append(run)
        out.sort(key=lambda r: r.created_at, reverse=True)
        return out

    def _build_endpoints(self) -> None:
        """The endpoints set of a database written before it existed: every unsettled run read once."""
        with self.r.pipeline(transaction=False) as p:
            for s in UNSETTLED:
                p.zrange(self.k.status(s.value), 0, -1)
            ids = [m.decode() for part in p.execute() for m in part]
        for i in range(0, len(ids), 1000):
            for raw in self.r.mget([self.k.run(x) for x in ids[i:i + 1000]]):
                # Only runs with an endpoint are parsed. The run's own field is the document's last "endpoint" key:
                # user content (the job document) comes before it, and what follows it holds strings only.
                if raw is not None and not raw[raw.rfind(b'"endpoint":') + 11:].startswith(b"null"):
                    run = Run.model_validate_json(raw)
                    if run.endpoint is not None and run.status in UNSETTLED:
                        self.r.sadd(self.k.endpoints, run.id)
        self.r.set(self.k.endpoints_built, 1)

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        ids = [m.decode() for m in self.r.smembers(self.k.sweep(sweep_id))]
        return sorted(self._docs(ids), key=lambda r: r.created_at)

    def _docs(self, ids: list[str]) -> list[Run]:
        out: list[Run] = []
        for i in range(0, len(ids), 1000):
            out += self._parsed(self.r.mget([self.k.run(x) for x in ids[i:i + 1000]]))
        return out

    def _parsed(self, raws: list[bytes | None]) -> list[Run]:
        """The runs of documents as read (None: a run gone meanwhile), remembered."""
        out = []
        with bulk():
            for raw in raws:
                if raw is not None:
                    run = Run.model_validate_json(raw)
                    self._remember(run.id, raw.decode())
                    out.append(run)
        return out

    # -- logs --------------------------------------------------------------------------------------------
    def next_seq(self, run_id: str, attempt: int, rank: int) -> int:
        got = self.r.hget(self.k.log_seq(run_id), f"{attempt}:{rank}")
        return int(got or 0)

    def append_logs(self, run_id: str, attempt: int, rank: int, first_seq: int,
                    lines: list[tuple[float, str, str]]) -> int:
        k = self.k
        keys = [k.log_seq(run_id), k.log_pos(run_id), k.logs(run_id)]
        field = f"{attempt}:{rank}"
        if not lines:
            expected = self.next_seq(run_id, attempt, rank)
            if first_seq > expected:
                raise SeqGap(expected)
            return expected
        nxt = first_seq
        for start in range(0, len(lines), LOG_CHUNK):
            chunk = lines[start:start + LOG_CHUNK]
            encoded = [json.dumps([ts, stream, text, attempt], ensure_ascii=False) for ts, stream, text in chunk]
            nxt, gap = self._append(keys=keys, args=[field, rank, first_seq + start, self.log_retention, *encoded])
            if gap:
                raise SeqGap(int(nxt))
        return int(nxt)

    def read_logs(self, run_id: str, after: int = -1, limit: int = 5000,
                  rank: int | None = None, attempt: int | None = None) -> list[LogRow]:
        out: list[LogRow] = []
        key = self.k.logs(run_id)
        start = "-" if after < 0 else f"(0-{after + 1}"
        while len(out) < limit:
            want = limit - len(out)
            entries = self.r.xrange(key, min=start, max="+", count=want)
            for eid, fields in entries:
                r, s, payload = fields[b"d"].split(b" ", 2)
                if rank is not None and int(r) != rank:
                    continue
                ts, stream, text, its = json.loads(payload)
                if attempt is not None and its != attempt:
                    continue
                out.append(LogRow(int(eid.split(b"-")[1]) - 1, int(r), int(s), ts, stream, text, its))
            if len(entries) < want or (rank is None and attempt is None):
                break
            start = "(" + entries[-1][0].decode()
        return out

    def tail_after(self, run_id: str, n: int, rank: int | None = None) -> int:
        key = self.k.logs(run_id)
        if rank is None:
            got = self.r.xrevrange(key, count=n + 1)
            return int(got[n][0].split(b"-")[1]) - 1 if len(got) > n else -1
        seen, end = 0, "+"
        while True:
            entries = self.r.xrevrange(key, max=end, count=2000)
            for eid, fields in entries:
                if int(fields[b"d"].split(b" ", 1)[0]) == rank:
                    if seen == n:
                        return int(eid.split(b"-")[1]) - 1
                    seen += 1
            if len(entries) < 2000:
                return -1
            end = "(" + entries[-1][0].decode()

    def log_counts(self, run_ids: list[str]) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as p:
            for run_id in run_ids:
                p.get(self.k.log_pos(run_id))
            got = p.execute()
        return {run_id: int(pos) for run_id, pos in zip(run_ids, got, strict=True) if pos}

    # -- nodes -------------------------------------------------------------------------------------------
    def upsert_node(self, node: Node) -> Node:
        got = self._put_node(keys=[self.k.nodes, self.k.node_names, self.k.nodes_version, self.k.node_seq],
                             args=[node.id, node.name, node.model_dump_json()])
        if got in (b"taken", "taken"):
            raise AlreadyExists(f"a node named {node.name} exists already")
        return node

    def get_node(self, node_id: str) -> Node | None:
        raw = self.r.hget(self.k.nodes, node_id)
        return Node.model_validate_json(raw) if raw else None

    def node_by_name(self, name: str) -> Node | None:
        node_id = self.r.hget(self.k.node_names, name)
        return self.get_node(node_id.decode()) if node_id else None

    def nodes_version(self) -> int:
        return int(self.r.get(self.k.nodes_version) or 0)

    def nodes_since(self, version: int) -> tuple[int, list[Node], set[str]] | None:
        with self.r.pipeline(transaction=True) as p:  # the version and what moved it, as of one instant
            p.get(self.k.nodes_version)
            p.zrangebyscore(self.k.node_seq, f"({version}", "+inf")
            now, ids = p.execute()
        now = int(now or 0)
        if version > now:
            return None
        if not ids:
            return now, [], set()
        raws = self.r.hmget(self.k.nodes, ids)  # as they are now (a later write comes again next time)
        with bulk():
            changed = compact_nodes([Node.model_validate_json(raw) for raw in raws if raw])
        return now, changed, {i.decode() for i, raw in zip(ids, raws, strict=True) if not raw}

    def list_nodes(self) -> list[Node]:
        raws = self.r.hvals(self.k.nodes)
        with bulk():
            nodes = compact_nodes([Node.model_validate_json(raw) for raw in raws])
        return sorted(nodes, key=lambda n: n.name)

    def touch_node(self, node_id: str, ts: float) -> Node:
        for _ in range(1000):
            raw = self.r.hget(self.k.nodes, node_id)
            if raw is None:
                raise NotFound(node_id)
            node = Node.model_validate_json(raw)
            node.last_seen = ts
            node.state = "ONLINE"
            if self._cas_field(keys=[self.k.nodes, self.k.nodes_version, self.k.node_seq],
                               args=[node_id, raw, node.model_dump_json()]):
                return node
        raise RuntimeError(f"node {node_id}: too many concurrent writers")

    def delete_node(self, node_id: str) -> None:
        self._del_node(keys=[self.k.nodes, self.k.node_names, self.k.nodes_version, self.k.node_seq, self.k.seen],
                       args=[node_id])

    # -- API keys ----------------------------------------------------------------------------------------
    def put_key(self, key: ApiKey) -> None:
        got = self._put_key(keys=[self.k.keys, self.k.key_docs, self.k.keys_version],
                            args=[key.id, key.hash, key.model_dump_json()])
        if got == b"new":  # (no cache holds it: a mass join does not empty every replica's cache per node)
            return
        self._keys_changed()  # after the write: the next request re-reads the version the write moved
        if self._notifier is not None:
            self._notifier.notify("keys")  # other replicas drop their cached keys

    def _keys_changed(self) -> None:
        self._keys.changed()

    def key_by_hash(self, digest: str) -> ApiKey | None:
        return self._keys.get(digest)

    def key_cached(self, digest: str) -> ApiKey | None | object:
        return self._keys.peek(digest)

    def _read_key(self, digest: str) -> ApiKey | None:
        raw = self.r.hget(self.k.key_docs, digest)
        return ApiKey.model_validate_json(raw) if raw else None

    def list_keys(self) -> list[ApiKey]:
        keys = [ApiKey.model_validate_json(raw) for raw in self.r.hvals(self.k.key_docs)]
        return sorted(keys, key=lambda k: k.created_at)

    # -- teams -------------------------------------------------------------------------------------------
    def put_team(self, team: Team, *, new: bool = False) -> Team:
        doc = team.model_dump_json()
        if new:
            if not self.r.hsetnx(self.k.teams, team.name, doc):
                raise AlreadyExists(f"a team named {team.name} exists already")
        else:
            self.r.hset(self.k.teams, team.name, doc)
        return team

    def get_team(self, name: str) -> Team | None:
        raw = self.r.hget(self.k.teams, name)
        return None if raw is None else Team.model_validate_json(raw)

    def list_teams(self) -> list[Team]:
        return sorted((Team.model_validate_json(v) for v in self.r.hvals(self.k.teams)), key=lambda t: t.name)

    def delete_team(self, name: str) -> None:
        if not self.r.hdel(self.k.teams, name):
            raise NotFound(f"team {name} not found")

    # -- GPU series --------------------------------------------------------------------------------------
    def append_series(self, rows: list[tuple[str, int, int, bytes]], now: float) -> None:
        # A key per block: APPEND adds the points, and the key expires when its block is past the tier's keep.
        tiers = {t.id: t for t in TIERS}
        with self.r.pipeline(transaction=False) as p:
            for i in range(0, len(rows), 500):
                keys, args = [], []
                for key, tier, block, data in rows[i:i + 500]:
                    keys.append(self.k.series(key, tier, block))
                    args += [data, int((block + 1) * tiers[tier].block + tiers[tier].keep)]
                self._append_series(keys=keys, args=args, client=p)
            p.execute()

    def read_series(self, key: str, tier: int, blocks: range) -> bytes:
        if not blocks:
            return b""
        got = self.r.mget([self.k.series(key, tier, b) for b in blocks])
        return b"".join(g for g in got if g)

    # -- shared by the replicas ------------------------------------------------------------------------------
    def heartbeat(self, node_id: str, ts: float) -> float | None:
        got = self._heartbeat(keys=[self.k.seen, self.k.node_runs(node_id)], args=[node_id, repr(ts)])
        return float(got[0]) if got[0] else None

    def heartbeat_if_seen(self, node_id: str, ts: float) -> float | None:
        got = self._heartbeat_if_seen(keys=[self.k.seen, self.k.node_runs(node_id)], args=[node_id, repr(ts)])
        return float(got[0]) if got[0] else None

    def heartbeat_unless_offline(self, node_id: str, ts: float) -> bool:
        return bool(self._heartbeat_unless_offline(keys=[self.k.seen], args=[node_id, repr(ts)]))

    async def poll_reads(self, node_id: str, ts: float,
                         status: Iterable[RunStatus]) -> tuple[float | None, list[Run]] | None:
        # On the event loop with a client of its own (redis.asyncio): a poll's two round trips awaited there,
        # where handing the poll to a thread cost as much as the poll (scheduler/service/agents.py: poll_soon).
        client, script = self._async_client()
        got = await script(keys=[self.k.seen, self.k.node_runs(node_id)], args=[node_id, repr(ts)])
        before = float(got[0]) if got[0] else None
        ids = [m.decode() for m in got[1:]]
        if not before or not ids:
            return before, []
        wanted = {s.value for s in status}
        runs = [r for r in self._parsed(await client.mget([self.k.run(x) for x in ids])) if r.status.value in wanted]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)  # (as list_runs orders them)
        return before, runs

    def _async_client(self) -> tuple[Any, Any]:
        """The event loop's client and its HEARTBEAT_IF_SEEN script (one per loop: a client's connections belong
        to the loop that made them)."""
        loop = asyncio.get_running_loop()
        got = self._aclient
        if got is None or got[0] is not loop:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=30, socket_connect_timeout=5,
                                                  health_check_interval=30)
            got = self._aclient = (loop, client, client.register_script(HEARTBEAT_IF_SEEN))
        return got[1], got[2]

    def heartbeat_and_runs(self, node_id: str, ts: float, status: Iterable[RunStatus]) -> tuple[float | None, list[Run]]:
        # One script records the heartbeat and reads the node's run index; one MGET reads the runs.
        got = self._heartbeat(keys=[self.k.seen, self.k.node_runs(node_id)], args=[node_id, repr(ts)])
        ids = [m.decode() for m in got[1:]]
        return (float(got[0]) if got[0] else None), self._filtered(ids, {s.value for s in status}, None, 1_000_000)

    def heartbeats(self, node_ids: Iterable[str] | None = None) -> dict[str, float]:
        if node_ids is None:
            return {k.decode(): float(v) for k, v in self.r.hgetall(self.k.seen).items()}
        ids = list(node_ids)
        if not ids:
            return {}
        return {n: float(v) for n, v in zip(ids, self.r.hmget(self.k.seen, ids), strict=True) if v is not None}

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 5.0) -> Iterator[None]:
        held: dict[str, int] = self._locks.__dict__.setdefault("held", {})
        if held.get(name):  # re-entrant within a thread
            held[name] += 1
            try:
                yield
            finally:
                held[name] -= 1
            return
        lk = self.r.lock(self.k.lock(name), timeout=ttl, sleep=0.005, blocking_timeout=ttl + 5.0,
                         thread_local=False)
        if not lk.acquire():
            raise TimeoutError(f"could not take the lock {name} within {ttl + 5.0:.0f} s")
        held[name] = 1
        try:
            yield
        finally:
            held.pop(name, None)
            with contextlib.suppress(redis.exceptions.LockError):  # expired: another holder may have it now
                lk.release()

    FEED_PAGE = 10_000  # runs_changed_since's limit in a pass (service/placing.py: _sync_book)

    @contextlib.contextmanager
    def pass_lock(self, ttl: float, feed: tuple[int, Callable[[], Mapping[str, int]]] | None = None, *,
                  sends: Sends | None = None, wait: bool = True) -> Iterator[PassLock]:
        # The lock is taken (SET NX PX, as redis-py's Lock) in the round trip that writes `sends` and reads the
        # change feed, and let go (compare-and-delete, as redis-py's) in the round trip of the pass's last
        # placements: a report and the pass that places into the GPUs it frees cost two round trips, not five.
        held: dict[str, int] = self._locks.__dict__.setdefault("held", {})
        pending = sends.take() if isinstance(sends, _Sends) else []
        if held.get("schedule"):  # (re-entrant: held by this thread already)
            yield PassLock(True, None, sends.sent(pending) if isinstance(sends, _Sends) else {})
            return
        key, token = self.k.lock("schedule"), secrets.token_hex(16)

        more: list[tuple[Any, ...]] = [("SET", key, token, "NX", "PX", int(ttl * 1000))]
        if feed is not None:
            more.append(("ZRANGEBYSCORE", self.k.changes, f"({feed[0]}", "+inf", "WITHSCORES", "LIMIT", 0,
                         self.FEED_PAGE))
        puts, rest = self._with_puts([(keys, args) for _, keys, args, *_ in pending], more)
        sent = sends.answered(pending, puts) if isinstance(sends, _Sends) else {}
        if isinstance(rest[0], Exception) or not rest[0]:  # held elsewhere (or refused: the sends' answer stands)
            if not wait:
                yield PassLock(False, None, sent)
                return
            with self.lock("schedule", ttl):
                yield PassLock(True, None, sent)
            return
        held["schedule"] = 1
        self._locks.release = (key, token)
        try:
            page = None
            if feed is not None:
                if isinstance(rest[1], Exception):
                    raise rest[1]
                got = rest[1]  # (RESP3: [member, score] pairs; RESP2: member, score, member, ...)
                pairs = ([(m, float(v)) for m, v in got] if got and isinstance(got[0], list)
                         else list(zip(got[::2], map(float, got[1::2]), strict=True)))
                page = self._feed_page(feed[0], pairs, feed[1]())
            yield PassLock(True, page, sent)
        finally:
            held.pop("schedule", None)
            if getattr(self._locks, "release", None) is not None:  # (not let go with a send)
                self._locks.release = None
                self._release_lock(keys=[key], args=[token])

    def _let_go(self) -> tuple[list[str], list[Any]] | None:
        """The pass lock's release, to send with the pass's last placements (once)."""
        got = getattr(self._locks, "release", None)
        if got is None:
            return None
        self._locks.release = None
        return [got[0]], [got[1]]

    def notifier(self) -> Notifier:
        if self._notifier is None:
            self._notifier = RelayNotifier(self.r, self.k.channel)
            self._notifier.on_key["keys"] = self._keys_changed
        return self._notifier

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
        self._aclient = None  # (its connections close with it: they belong to its event loop, not this thread)
        self.r.close()

    # -- tests and tools ---------------------------------------------------------------------------------
    def wipe(self) -> int:
        """Delete every key under this store's prefix (tests; `fedml` never calls it). Returns how many."""
        n = 0
        batch: list[bytes] = []
        for key in self.r.scan_iter(match=self.k.p + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += self.r.delete(*batch)
                batch.clear()
        if batch:
            n += self.r.delete(*batch)
        return n


class _Flight:
    """Commands sent on a connection of the pool whose replies are yet to be read (RedisStore._pipe_send)."""

    __slots__ = ("conn", "n", "packed", "what", "sent")

    def __init__(self, conn: Any, n: int, packed: bytes, what: Any) -> None:
        self.conn, self.n, self.packed, self.what, self.sent = conn, n, packed, what, True  # (n: the commands)


class _Conflict(Exception):
    """The document changed between our read and our write."""


# What _Sends holds per change: the run as it will be written, PUT_RUN's KEYS and ARGV, how to make it again after
# a conflict (None: answer Stale), whether it is a note() (answered by nothing).
_Send = tuple[Run, list[str], list[Any], Callable[[], Run] | None, bool]


class _Sends(Sends):
    """A pass's transitions, judged on the documents this process holds (remembered, or read), written by one
    pipeline of PUT_RUN calls at send(): one round trip for them all. Each is its own compare-and-set, as
    transition()'s; one that finds its run changed since (a conflict) is made again over the new state, alone
    (a modify(): answered Stale)."""

    deferred = True

    def __init__(self, store: RedisStore) -> None:
        super().__init__(store)
        self.redis = store
        # (the document judged on, the run, the run changed, quiet, quota limit, redo, note): PUT_RUN's call (the
        # new document dumped) is made at take(), for all of them in one loop
        self.pending: list[tuple[str, Run, Run, bool, int | None, Callable[[], Run] | None, bool]] = []
        self.flying: tuple[_Flight, list[_Send]] | None = None  # sent with overlap=True, answers not read yet
        store._created.prune()  # (an idle scheduler holds no run created long ago)

    def _judged(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[str, Run, Run | None]:
        """RedisStore._changed, the documents of the runs queued after a run not remembered read with its own."""
        if run_id not in self.redis._docs_seen:
            self.redis._remember_queued(run_id)
        return self.redis._changed(run_id, change, kept=True)

    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        doc, old, new = self._judged(run_id, lambda run: run.changed(to, **fields))
        assert new is not None  # (Run.changed returns a run or raises)
        self.pending.append((doc, old, new, False, quota_limit,
                             lambda: self.redis.transition(run_id, to, quota_limit=quota_limit, **fields), False))
        return new

    def note(self, run_id: str, **fields: object) -> None:
        try:
            doc, old, new = self._judged(run_id, lambda run: run.changed(**fields))
        except NotFound:
            return
        assert new is not None  # (Run.changed returns a run or raises)
        self.pending.append((doc, old, new, fields.keys() <= QUIET_FIELDS, None,
                             lambda: self.redis.update_run(run_id, **fields), True))

    def modify(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run]:
        doc, old, new = self.redis._changed(run_id, change)
        if new is None:
            return old, old
        self.pending.append((doc, old, new, False, None, None, False))
        return old, new

    def take(self) -> list[_Send]:
        """The PUT_RUN calls of the changes made since the last take()."""
        pending, self.pending = self.pending, []
        put_call = self.redis._put_call
        return [(new, *put_call(doc, old, new, quiet, limit), redo, note)
                for doc, old, new, quiet, limit, redo, note in pending]

    def send(self, last: bool = False, *, overlap: bool = False) -> dict[str, Run | Exception]:
        out = self._land()
        if not self.pending:
            return out
        pending = self.take()
        store = self.redis
        calls = [(keys, args) for _, keys, args, *_ in pending]
        if overlap and not last:  # (Redis runs them while the pass makes its next placements)
            self.flying = (store._send_puts(calls), pending)
            return out
        return {**out, **self.answered(pending, store._puts(calls, store._let_go() if last else None))}

    def in_flight(self) -> set[str]:
        return set() if self.flying is None else {new.id for new, *_ in self.flying[1]}

    def abandon(self) -> None:
        try:
            self._land()
        except Exception:  # (the pass is failing already: its error is the one to tell)
            log.exception("the answers of a failed pass's last placements could not be read")
        self.pending.clear()

    def _land(self) -> dict[str, Run | Exception]:
        """The answers of what is in flight."""
        if self.flying is None:
            return {}
        (flight, pending), self.flying = self.flying, None
        return self.answered(pending, self.redis._landed(flight)[0])

    def sent(self, pending: list[_Send]) -> dict[str, Run | Exception]:
        return self.answered(pending, self.redis._puts([(keys, args) for _, keys, args, *_ in pending])) if pending else {}

    def answered(self, pending: list[_Send],
                 got: list[Any]) -> dict[str, Run | Exception]:
        """send()'s answer from PUT_RUN's answers to `pending`."""
        store = self.redis
        out: dict[str, Run | Exception] = {}
        for (new, _, args, redo, note), said in zip(pending, got, strict=True):
            failed = store._said(said, new, args[2])  # (ARGV[3]: the new document)
            if note:  # (answered by nothing: made again over a newer copy; a run gone is passed over)
                if isinstance(failed, _Conflict) and redo is not None:
                    with contextlib.suppress(NotFound):
                        redo()
                elif failed is not None and not isinstance(failed, NotFound):
                    log.warning("run %s: a note was not written: %s", new.id, failed)
                continue
            if isinstance(failed, _Conflict):  # written meanwhile by another: the transition again, over that
                if redo is None:
                    out[new.id] = Stale(f"run {new.id} was written since it was read")
                    continue
                try:
                    out[new.id] = redo()
                except (InvalidTransition, NotFound, GpuBusy, QuotaFull) as exc:
                    out[new.id] = exc
            elif failed is not None:
                out[new.id] = failed
        return out


def wipe_prefix(url: str) -> int:
    """Delete every key under the prefix of a redis:// URL (tests)."""
    store = RedisStore(url)
    try:
        return store.wipe()
    finally:
        store.close()


__all__ = ["RedisStore", "wipe_prefix"]


def _desc(member: str) -> tuple[int, ...]:
    """A sort key that orders ids from the highest down (newest first among runs created at the same instant)."""
    return tuple(-b for b in member.encode())
