"""SQLite store (WAL): the embedded default. One connection guarded by a lock; every write commits."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

from .contract.models import (
    TERMINAL,
    UNSETTLED,
    ApiKey,
    InvalidTransition,
    LogBatch,
    LogRow,
    Node,
    Run,
    RunStatus,
    Team,
)
from .contract.series import TIERS, expired_before
from .store import (
    DEFAULT_LOG_RETENTION,
    QUIET_FIELDS,
    TEXT_STREAM,
    AlreadyExists,
    Busy,
    Created,
    Cursor,
    GpuBusy,
    KeyCache,
    NotFound,
    QuotaFull,
    Sends,
    SeqGap,
    Snapshot,
    Store,
    bulk,
    compact_nodes,
    quota_charge,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    node_id TEXT,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0  -- the store's change counter at the run's last write (runs_changed_since)
);
-- (runs_status (status, priority, created_at) and runs_node (node_id, status) of older databases answered no query
-- any more, and each cost two pages written and synced at every run write that moves its status)
DROP INDEX IF EXISTS runs_status;
DROP INDEX IF EXISTS runs_node;
-- each_run's pages (the book's rebuild): the runs of one status in id order, not a walk past every finished run.
CREATE INDEX IF NOT EXISTS runs_status_id ON runs(status, id);
CREATE INDEX IF NOT EXISTS runs_seq ON runs(seq);
-- Pages of the newest runs (list_runs, the dashboard): no sort of every run per page.
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at, id);
CREATE INDEX IF NOT EXISTS runs_owner ON runs(owner, status);
-- The gateway's look-up of serving runs each second (endpoint_runs): the few runs with an endpoint, not a scan of
-- every queued and running one. (A partial index on json_extract(doc, '$.endpoint') did this, but SQLite parsed
-- the old and the new document at every run write to keep it: 8 of a placement's 18 us of UPDATE.)
DROP INDEX IF EXISTS runs_endpoint;
CREATE TABLE IF NOT EXISTS endpoint_runs (run_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_nodes (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (node_id, run_id)
) WITHOUT ROWID;
-- A run's write replaces its rows here: without this, each write scanned every active run's row (8,000 rows:
-- 0.3 ms, twice per freed slot).
CREATE INDEX IF NOT EXISTS run_nodes_run ON run_nodes(run_id);
-- A run's log, one row per chunk of up to _CHUNK_LINES consecutive lines of one (attempt, rank): a row per line
-- cost 1.8 us each to insert (0.4 s of scheduler CPU for a 200,000-line job). Positions pos..last are the
-- chunk's lines in order; seq is the first line's; ts holds a float64 per line; `stream` is the one stream of
-- every line with `text` the lines joined by newlines, or '' with `text` a JSON [streams, lines] (mixed
-- streams, or a line that holds a newline). See _pack/_unpack.
CREATE TABLE IF NOT EXISTS log_chunks (
    run_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    last INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts BLOB NOT NULL,
    stream TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (run_id, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_seq (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    next_seq INTEGER NOT NULL,
    PRIMARY KEY (run_id, attempt, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, ts REAL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0  -- meta 'nodes' at the node's last write (nodes_since)
);
CREATE INDEX IF NOT EXISTS nodes_seq ON nodes(seq);
-- Removed nodes: id -> meta 'nodes' at the removal (nodes_since tells a reader to drop them).
CREATE TABLE IF NOT EXISTS node_gone (id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
-- Who holds each GPU: (node, index) -> the unfinished run holding it (Run.gpu_claims), kept by every run write.
-- A placement's check is one look-up here (it parsed the placements of every run on the node).
CREATE TABLE IF NOT EXISTS gpu_claims (
    node_id TEXT NOT NULL,
    gpu INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (node_id, gpu)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gpu_claims_run ON gpu_claims(run_id);
CREATE TABLE IF NOT EXISTS teams (name TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
-- The GPUs each unfinished run holds against its team's quota (Run.quota_key), kept by every run write.
-- (quota_sum: the same summed per key, kept with it: a placement's check is one look-up, not a sum over the team's runs)
CREATE TABLE IF NOT EXISTS quota_held (run_id TEXT PRIMARY KEY, key TEXT NOT NULL, gpus INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_sum (key TEXT PRIMARY KEY, gpus INTEGER NOT NULL) WITHOUT ROWID;
-- GPU series (contract/series.py): a row per (series, tier, block) of packed points, appended to at each flush;
-- blocks past their tier's keep are dropped by block number (series_block).
CREATE TABLE IF NOT EXISTS series (
    key TEXT NOT NULL,
    tier INTEGER NOT NULL,
    block INTEGER NOT NULL,
    points BLOB NOT NULL,
    PRIMARY KEY (key, tier, block)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS series_block ON series(tier, block);
-- The runs of each sweep (Run.sweep.id), written with them: a sweep's status reads its runs alone.
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (sweep_id, run_id)
) WITHOUT ROWID;
-- Counters: 'nodes' moves with every write to the nodes table, by any process (Store.nodes_version); 'keys'
-- with every write to api_keys (the key cache, store.KeyCache);
-- 'claims' is 1 once gpu_claims holds every run's claims (a database older than the table gets them on open);
-- 'endpoints' likewise for endpoint_runs.
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (k, v) VALUES ('nodes', 0);
INSERT OR IGNORE INTO meta (k, v) VALUES ('claims', 0);
INSERT OR IGNORE INTO meta (k, v) VALUES ('endpoints', 0);
INSERT OR IGNORE INTO meta (k, v) VALUES ('keys', 0);
-- The keys version moves when a key changes or goes, not when one is added: KeyCache holds only keys found, so a
-- new one cannot make an entry wrong (an insert emptied the cache: 10,000 agents joining missed it at every poll).
DROP TRIGGER IF EXISTS keys_ins;
CREATE TRIGGER IF NOT EXISTS keys_upd AFTER UPDATE ON api_keys BEGIN UPDATE meta SET v = v + 1 WHERE k = 'keys'; END;
CREATE TRIGGER IF NOT EXISTS keys_del AFTER DELETE ON api_keys BEGIN UPDATE meta SET v = v + 1 WHERE k = 'keys'; END;
CREATE TRIGGER IF NOT EXISTS nodes_ins AFTER INSERT ON nodes BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'nodes';
    UPDATE nodes SET seq = (SELECT v FROM meta WHERE k = 'nodes') WHERE id = NEW.id;
    DELETE FROM node_gone WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS nodes_upd AFTER UPDATE OF id, name, doc ON nodes BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'nodes';
    UPDATE nodes SET seq = (SELECT v FROM meta WHERE k = 'nodes') WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS nodes_del AFTER DELETE ON nodes BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'nodes';
    INSERT OR REPLACE INTO node_gone (id, seq) VALUES (OLD.id, (SELECT v FROM meta WHERE k = 'nodes'));
END;
"""

# 3: runs.seq (the change feed); a version-2 database gains the column when opened. 4: log lines stored in chunks
# (log_chunks), and the nodes' change feed (nodes.seq, node_gone); a version-3 database gains them when opened.
SCHEMA_VERSION = 4

_CHUNK_LINES = 5000  # lines per log chunk at most: a follower reads 5,000 at a time


def _pack(stamps: float | list[float], streams: str | list[str], texts: list[str]) -> tuple[bytes, str, str]:
    """A chunk's (ts, stream, text) columns (see the log_chunks table) for its lines' texts, and their times and
    streams: one per line, or one for all."""
    n = len(texts)
    ts = (array("d", stamps) if isinstance(stamps, list) else array("d", (stamps,)) * n).tobytes()
    stream = streams[0] if isinstance(streams, list) else streams
    if stream and (not isinstance(streams, list) or streams.count(stream) == n):
        text = "\n".join(texts)
        if text.count("\n") == n - 1:  # no line holds a newline: the split gives them back
            return ts, stream, text
    per_line = streams if isinstance(streams, list) else [streams] * n
    return ts, "", json.dumps([per_line, texts], ensure_ascii=False)


def _unpack(ts: bytes, stream: str, text: str) -> tuple[list[float], str | list[str], list[str]]:
    """(timestamps, the one stream or a stream per line, lines) of a chunk."""
    stamps = array("d")
    stamps.frombytes(ts)
    if stream:
        return stamps.tolist(), stream, text.split("\n")
    streams, lines = json.loads(text)
    return stamps.tolist(), streams, lines


class _Segment(NamedTuple):
    """Consecutive lines of one chunk: positions pos.., seqs seq.."""

    pos: int
    rank: int
    attempt: int
    seq: int
    stamps: list[float]
    streams: str | list[str]  # one stream for every line, or one per line
    lines: list[str]

# Columns kept outside the JSON document because queries filter on them.
_RUN_COLUMNS = ("status", "node_id", "owner", "priority", "created_at")


class SQLiteStore(Store):
    def __init__(self, path: str | Path, *, synchronous: str = "FULL",
                 log_retention: int = DEFAULT_LOG_RETENTION) -> None:
        super().__init__(log_retention)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._reader: _Snapshot | None = None  # snapshot()'s connection, opened at its first use
        self._reading = threading.Lock()
        self._keys = KeyCache(self._keys_version, self._read_key)
        # [transaction nesting, the last run seq given in the open transaction or 0, writes _Sends holds back in
        # it] (guarded by _lock)
        self._depth = [0, 0, 0]
        self._created = Created()  # the runs created here, parsed, for their placement
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, not only a crash of this process.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=30000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE name='runs'").fetchone()[0]
        if has_tables and version == 2:
            # One transaction: the column and the version together (a crash between them left a database whose
            # next start would add the column twice and fail); a column already there is not added again.
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
            self._db.execute("BEGIN IMMEDIATE")
            if "seq" not in columns:
                self._db.execute("ALTER TABLE runs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
            self._db.execute("PRAGMA user_version=3")
            self._db.execute("COMMIT")
            version = 3
        if has_tables and version == 3:
            # Before SCHEMA, whose index and triggers need nodes.seq (the triggers are made again with it). The
            # version moves once the log lines are chunks too (_chunk_old_logs): a crash in between does this
            # again, and a column already there is not added again.
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(nodes)")}
            self._db.execute("BEGIN IMMEDIATE")
            if "seq" not in columns:
                self._db.execute("ALTER TABLE nodes ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
            for trigger in ("nodes_ins", "nodes_upd", "nodes_del"):
                self._db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
            self._db.execute("COMMIT")
        if has_tables and version not in (3, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path} was written by another version of fedml launch (schema {version}, "
                               f"this one needs {SCHEMA_VERSION}); move it away to start afresh")
        self._db.executescript(SCHEMA)
        if has_tables and version == 3:
            self._chunk_old_logs()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self._db.execute("SELECT v FROM meta WHERE k='claims'").fetchone()[0] == 0:
            self._build_claims()
        if self._db.execute("SELECT v FROM meta WHERE k='endpoints'").fetchone()[0] == 0:
            with self._tx() as db:  # (with its mark, in one transaction)
                db.execute("INSERT OR IGNORE INTO endpoint_runs (run_id) SELECT id FROM runs "
                           "WHERE json_extract(doc, '$.endpoint') IS NOT NULL")
                db.execute("UPDATE meta SET v=1 WHERE k='endpoints'")

    def _build_claims(self) -> None:
        """gpu_claims from every unfinished run, in one transaction with its 'done' mark."""
        with self._tx() as db:
            db.execute("DELETE FROM gpu_claims")
            done = [s.value for s in TERMINAL]
            for (doc,) in db.execute(f"SELECT doc FROM runs WHERE status NOT IN ({','.join('?' * len(done))})",
                                     done).fetchall():
                run = Run.model_validate_json(doc)
                db.executemany("INSERT OR IGNORE INTO gpu_claims (node_id, gpu, run_id) VALUES (?,?,?)",
                               [(n, g, run.id) for n, g in run.gpu_claims()])
            db.execute("UPDATE meta SET v=1 WHERE k='claims'")

    def _chunk_old_logs(self) -> None:
        """A schema-3 database's log lines (a row each in table logs) as chunks, in one transaction with the new
        version: a crash leaves the old table and version, and the next open does it again."""
        with self._tx() as db:
            if db.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='logs'").fetchone()[0]:
                db.execute("DELETE FROM log_chunks")
                for (run_id,) in db.execute("SELECT DISTINCT run_id FROM logs").fetchall():
                    rows = db.execute("SELECT pos, attempt, rank, seq, ts, stream, line FROM logs WHERE run_id=? "
                                      "ORDER BY pos", (run_id,)).fetchall()
                    start = 0
                    for i in range(1, len(rows) + 1):  # a chunk ends where (attempt, rank) or the numbering breaks
                        if (i < len(rows) and i - start < _CHUNK_LINES and rows[i][1:3] == rows[start][1:3]
                                and rows[i][0] == rows[i - 1][0] + 1 and rows[i][3] == rows[i - 1][3] + 1):
                            continue
                        first, part = rows[start], rows[start:i]
                        packed = _pack([r[4] for r in part], [r[5] for r in part], [r[6] for r in part])
                        db.execute("INSERT INTO log_chunks (run_id, pos, last, attempt, rank, seq, ts, stream, text) "
                                   "VALUES (?,?,?,?,?,?,?,?,?)", (run_id, first[0], part[-1][0], first[1], first[2],
                                                                  first[3], *packed))
                        start = i
                db.execute("DROP TABLE logs")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- helpers -----------------------------------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self._db, self._lock, self._depth)

    def batch(self) -> _Tx:
        return self._tx()

    batch_commits_once = True

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        with self._tx() as db:
            name = f"sp{self._depth[0]}"
            db.execute(f"SAVEPOINT {name}")
            unsent = self._depth[2]
            try:
                yield
            except BaseException:
                db.execute(f"ROLLBACK TO {name}")
                db.execute(f"RELEASE {name}")
                self._depth[2] = unsent  # (a _Sends of the undone part is dropped with what it held back)
                raise
            db.execute(f"RELEASE {name}")

    @staticmethod
    def _run_row(run: Run) -> tuple[Any, ...]:
        doc = run.model_dump_json()
        return (run.id, run.status.value, run.node_id, run.owner, run.priority, run.created_at, doc)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot | None]:
        # A connection of its own, read-only: under WAL a reader sees the last commit and never waits for the
        # writer. The one connection under _lock would not do: a thread holding it can lose the interpreter for
        # milliseconds (a switch interval), and polls that found it taken went to threads, which took it in turn.
        if self.path == ":memory:" or not self._reading.acquire(blocking=False):  # (another thread reads: rare)
            yield None
            return
        try:
            if self._reader is None:
                try:
                    db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=0)
                    db.execute("PRAGMA query_only=ON")
                except sqlite3.Error:  # (a file that cannot be opened again: the store's own connection reads)
                    yield None
                    return
                self._reader = _Snapshot(db)
            yield self._reader
        finally:
            self._reading.release()

    def probe_write(self) -> None:
        with self._tx() as db:  # a committed write: a page in the WAL, as any real write needs
            db.execute("INSERT OR REPLACE INTO probe (k, ts) VALUES (1, ?)", (time.time(),))

    # -- runs --------------------------------------------------------------------------------------------
    def _next_seq(self, db: sqlite3.Connection) -> int:
        """The change counter for a write (inside its transaction: writers are serialised, so seqs commit in order;
        read once per transaction, counted on from there. A savepoint rolled back leaves a gap, which the change
        feed does not mind: it asks for what is past a seq.)"""
        seq = self._depth[1]
        if not seq:
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0])
        self._depth[1] = seq = seq + 1
        return seq

    def create_run(self, run: Run) -> Run:
        try:
            with self._tx() as db:
                self._check_gpus(db, run, run.gpu_claims())  # (a run is created queued: none, but the contract)
                seq = self._next_seq(db)
                row = self._run_row(run)
                db.execute("INSERT INTO runs (id, status, node_id, owner, priority, created_at, doc, seq) "
                           "VALUES (?,?,?,?,?,?,?,?)", (*row, seq))
                self._index(db, run)
                self._created.keep(run, row[6])
                if run.sweep is not None:
                    db.execute("INSERT INTO sweep_runs (sweep_id, run_id) VALUES (?,?)", (run.sweep.id, run.id))
                if run.endpoint is not None:
                    db.execute("INSERT INTO endpoint_runs (run_id) VALUES (?)", (run.id,))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"run {run.id} exists already") from None
        run._version = seq
        return run

    def _get(self, db: sqlite3.Connection, run_id: str) -> Run | None:
        row = db.execute("SELECT doc FROM runs WHERE id=?", (run_id,)).fetchone()
        return Run.model_validate_json(row[0]) if row else None

    def get_run(self, run_id: str, *, logs: bool = True) -> Run | None:
        with self._lock:
            run = self._get(self._db, run_id)
        if run is not None and logs:
            run.log_count = self._log_count(run_id)
        return run

    def _log_count(self, run_id: str) -> int:
        with self._lock:
            return self._next_pos(self._db, run_id)

    def list_runs(self, *, status: Iterable[RunStatus] | None = None, node_id: str | None = None,
                  owner: str | None = None, limit: int = 1000, before: Cursor | None = None) -> list[Run]:
        sql, args = self._runs_query(status, node_id, owner, limit, before)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        with bulk():
            return [Run.model_validate_json(r[0]) for r in rows]

    @staticmethod
    def _runs_query(status: Iterable[RunStatus] | None, node_id: str | None, owner: str | None, limit: int,
                    before: Cursor | None) -> tuple[str, list[Any]]:
        """list_runs' SQL and its arguments."""
        where: list[str] = []
        args: list[Any] = []
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [before[0], before[0], before[1]]
        if status is not None:
            st = [s.value for s in status]
            where.append(f"status IN ({','.join('?' * len(st))})")
            args += st
        if node_id is not None:
            where.append("id IN (SELECT run_id FROM run_nodes WHERE node_id=?)")
            args.append(node_id)
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        sql = "SELECT doc FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        return sql + " ORDER BY created_at DESC, id DESC LIMIT ?", [*args, limit]

    def count_runs(self, owner: str | None = None) -> dict[str, int]:
        sql = "SELECT status, COUNT(*) FROM runs" + (" WHERE owner=?" if owner is not None else "") + " GROUP BY status"
        with self._lock:
            return {st: int(n) for st, n in self._db.execute(sql, (owner,) if owner is not None else ())}

    def each_run(self, status: Iterable[RunStatus], page: int = 2000) -> Iterator[Run]:
        for st in {s.value for s in status}:
            last = ""
            while True:
                with self._lock:
                    rows = self._db.execute("SELECT id, doc FROM runs INDEXED BY runs_status_id WHERE status=? AND "
                                            "id > ? ORDER BY id LIMIT ?", (st, last, page)).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                with bulk():
                    runs = [Run.model_validate_json(r[1]) for r in rows]
                yield from runs

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        with self._lock:
            rows = self._db.execute("SELECT r.doc FROM sweep_runs s JOIN runs r ON r.id = s.run_id "
                                    "WHERE s.sweep_id=? ORDER BY r.created_at", (sweep_id,)).fetchall()
        return [Run.model_validate_json(r[0]) for r in rows]

    def endpoint_runs(self) -> list[Run]:
        marks = ",".join("?" * len(UNSETTLED))
        with self._lock:
            rows = self._db.execute(f"SELECT r.doc FROM endpoint_runs e JOIN runs r ON r.id = e.run_id "
                                    f"WHERE r.status IN ({marks}) ORDER BY r.created_at DESC",
                                    [s.value for s in UNSETTLED]).fetchall()
        return [Run.model_validate_json(r[0]) for r in rows]

    def runs_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0])

    def runs_changed_since(self, seq: int, limit: int = 100_000,
                           known: Mapping[str, int] | None = None) -> tuple[int, list[Run]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, id, doc FROM runs WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (seq, limit)).fetchall()
        known = known or {}
        with bulk():
            return (rows[-1][0] if rows else seq), [Run.model_validate_json(r[2]) for r in rows
                                                    if known.get(r[1]) != r[0]]

    def _write(self, db: sqlite3.Connection, run: Run, old: Run, *, quiet: bool = False) -> None:
        """Write `run` over `old` (the stored run it was made from)."""
        if (run.endpoint is None) != (old.endpoint is None):
            db.execute("DELETE FROM endpoint_runs WHERE run_id=?" if run.endpoint is None else
                       "INSERT OR IGNORE INTO endpoint_runs (run_id) VALUES (?)", (run.id,))
        if quiet:  # (no new seq: the change feed does not list it)
            db.execute("UPDATE runs SET doc=? WHERE id=?", (run.model_dump_json(), run.id))
            return
        seq = self._next_seq(db)
        if (run.owner, run.priority, run.created_at) == (old.owner, old.priority, old.created_at):
            # (set once, at creation: an UPDATE that names a column rewrites its index entries even unchanged,
            # pages written and synced at every commit: 27 -> 25 pages per freed slot)
            db.execute("UPDATE runs SET status=?, node_id=?, doc=?, seq=? WHERE id=?",
                       (run.status.value, run.node_id, run.model_dump_json(), seq, run.id))
        else:
            db.execute("UPDATE runs SET status=?, node_id=?, owner=?, priority=?, created_at=?, doc=?, seq=? "
                       "WHERE id=?", (*self._run_row(run)[1:], seq, run.id))
        run._version = seq
        if not old.terminal and old.placements:  # (a queued run has no rows in any)
            db.execute("DELETE FROM run_nodes WHERE run_id=?", (run.id,))
            db.execute("DELETE FROM gpu_claims WHERE run_id=?", (run.id,))
            if old.quota_key:
                self._unquota(db, run.id)
        self._index(db, run)

    @staticmethod
    def _index(db: sqlite3.Connection, run: Run) -> None:
        """The run's rows in run_nodes and gpu_claims (none: those of a finished run)."""
        if not run.terminal and run.placements:
            SQLiteStore._index_many(db, [run])

    @staticmethod
    def _index_many(db: sqlite3.Connection, runs: list[Run]) -> None:
        """_index of unfinished runs with placements, in one statement per table."""
        db.executemany("INSERT OR IGNORE INTO run_nodes (node_id, run_id) VALUES (?,?)",
                       [(p.node_id, run.id) for run in runs for p in run.placements])
        # (checked before: _check_gpus, or _Sends' look-up; a claim another run holds fails here, not taken)
        db.executemany("INSERT INTO gpu_claims (node_id, gpu, run_id) VALUES (?,?,?)",
                       [(n, g, run.id) for run in runs for n, g in run.gpu_claims()])
        held = [(run.id, *charge) for run in runs if (charge := quota_charge(run))[1]]
        if held:
            db.executemany("INSERT INTO quota_held (run_id, key, gpus) VALUES (?,?,?)", held)
            db.executemany("INSERT INTO quota_sum (key, gpus) VALUES (?,?) ON CONFLICT (key) DO UPDATE SET "
                           "gpus = gpus + excluded.gpus", [h[1:] for h in held])

    @staticmethod
    def _unquota(db: sqlite3.Connection, run_id: str) -> None:
        """The run's GPUs no longer count against its quota (its row in quota_held, and the key's sum)."""
        row = db.execute("SELECT key, gpus FROM quota_held WHERE run_id=?", (run_id,)).fetchone()
        if row is not None:
            db.execute("UPDATE quota_sum SET gpus = gpus - ? WHERE key=?", (row[1], row[0]))
            db.execute("DELETE FROM quota_held WHERE run_id=?", (run_id,))

    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        return self._modify(run_id, lambda run: run.changed(to, **fields), quota_limit=quota_limit)[1]

    def _check_gpus(self, db: sqlite3.Connection, run: Run, claims: set[tuple[str, int]]) -> None:
        """GpuBusy if another unfinished run holds one of `claims` (as the Redis store checks)."""
        for n, g in sorted(claims):
            row = db.execute("SELECT run_id FROM gpu_claims WHERE node_id=? AND gpu=?", (n, g)).fetchone()
            if row is not None and row[0] != run.id:
                raise GpuBusy(n, g, row[0])

    def sends(self) -> Sends:
        return _Sends(self)

    def update_run(self, run_id: str, **fields: object) -> Run:
        return self._modify(run_id, lambda run: run.changed(**fields), quiet=fields.keys() <= QUIET_FIELDS)[1]

    def modify(self, run_id: str, change: Callable[[Run], Run | None], *, quiet: bool = False) -> tuple[Run, Run]:
        return self._modify(run_id, change, quiet=quiet)

    def _modify(self, run_id: str, change: Callable[[Run], Run | None], *, quiet: bool = False,
                quota_limit: int | None = None) -> tuple[Run, Run]:
        with self._tx() as db:  # (the read and the write in one transaction: no other writer between them)
            run = self._get(db, run_id)
            if run is None:
                raise NotFound(run_id)
            new = change(run)
            if new is None:
                return run, run
            self._check_gpus(db, new, new.gpu_claims() - run.gpu_claims())
            if quota_limit is not None:
                key, gpus = quota_charge(new)
                row = db.execute("SELECT gpus FROM quota_sum WHERE key=?", (key,)).fetchone()
                others = (row[0] if row else 0) - (quota_charge(run)[1] if run.quota_key == key else 0)
                if others + gpus > quota_limit:
                    raise QuotaFull(key, int(others), quota_limit)
            self._write(db, new, run, quiet=quiet)
        return run, new

    # -- teams -------------------------------------------------------------------------------------------
    def put_team(self, team: Team, *, new: bool = False) -> Team:
        with self._tx() as db:
            try:
                db.execute(f"INSERT {'' if new else 'OR REPLACE '}INTO teams (name, doc) VALUES (?,?)",
                           (team.name, team.model_dump_json()))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"a team named {team.name} exists already") from None
        return team

    def get_team(self, name: str) -> Team | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM teams WHERE name=?", (name,)).fetchone()
        return Team.model_validate_json(row[0]) if row else None

    def list_teams(self) -> list[Team]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM teams ORDER BY name").fetchall()
        return [Team.model_validate_json(r[0]) for r in rows]

    def delete_team(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM teams WHERE name=?", (name,)).rowcount == 0:
                raise NotFound(f"team {name} not found")

    # -- GPU series --------------------------------------------------------------------------------------
    def append_series(self, rows: list[tuple[str, int, int, bytes]], now: float) -> None:
        with self._tx() as db:
            db.executemany("INSERT INTO series (key, tier, block, points) VALUES (?,?,?,?) ON CONFLICT "
                           "(key, tier, block) DO UPDATE SET points = CAST(points || excluded.points AS BLOB)", rows)
            # (|| makes text of blobs; the cast gives back the same bytes)
            for tier in TIERS:
                db.execute("DELETE FROM series WHERE tier=? AND block<?", (tier.id, expired_before(tier, now)))

    def read_series(self, key: str, tier: int, blocks: range) -> bytes:
        with self._lock:
            got = self._db.execute("SELECT points FROM series WHERE key=? AND tier=? AND block>=? AND block<? "
                                   "ORDER BY block", (key, tier, blocks.start, blocks.stop)).fetchall()
        return b"".join(r[0] for r in got)

    # -- logs --------------------------------------------------------------------------------------------
    def next_seq(self, run_id: str, attempt: int, rank: int) -> int:
        with self._lock:
            row = self._db.execute("SELECT next_seq FROM log_seq WHERE run_id=? AND attempt=? AND rank=?",
                                   (run_id, attempt, rank)).fetchone()
        return row[0] if row else 0

    def append_logs(self, run_id: str, attempt: int, rank: int, first_seq: int,
                    lines: list[tuple[float, str, str]]) -> int:
        if not lines:
            return self._append(run_id, attempt, rank, first_seq, [], "", [])
        stamps, streams, texts = (list(column) for column in zip(*lines, strict=True))
        return self._append(run_id, attempt, rank, first_seq, stamps, streams, texts)

    def append_log_batch(self, run_id: str, batch: LogBatch) -> int:
        if batch.text is None:  # (rows)
            return super().append_log_batch(run_id, batch)
        assert batch.ts is not None and batch.stream is not None  # (LogBatch checks: with text, both are given)
        return self._append(run_id, batch.attempt, batch.rank, batch.first_seq, batch.ts, batch.stream, batch.text)

    def _append(self, run_id: str, attempt: int, rank: int, first_seq: int, stamps: float | list[float],
                streams: str | list[str], texts: list[str]) -> int:
        """append_logs of columns: a text per line, and the times and streams of the lines (or one for all)."""
        with self._tx() as db:
            row = db.execute("SELECT next_seq FROM log_seq WHERE run_id=? AND attempt=? AND rank=?",
                             (run_id, attempt, rank)).fetchone()
            expected = row[0] if row else 0
            if first_seq > expected:
                raise SeqGap(expected)
            skip = expected - first_seq  # (lines it has already: a resend)
            fresh = len(texts) - skip
            if fresh <= 0:
                return expected
            pos = self._next_pos(db, run_id)
            chunks = []
            for i in range(skip, len(texts), _CHUNK_LINES):
                j = min(i + _CHUNK_LINES, len(texts))
                packed = _pack(stamps[i:j] if isinstance(stamps, list) else stamps,
                               streams[i:j] if isinstance(streams, list) else streams, texts[i:j])
                at = pos + i - skip
                chunks.append((run_id, at, at + j - i - 1, attempt, rank, first_seq + i, *packed))
            db.executemany("INSERT INTO log_chunks (run_id, pos, last, attempt, rank, seq, ts, stream, text) "
                           "VALUES (?,?,?,?,?,?,?,?,?)", chunks)
            nxt = expected + fresh
            cut = pos + fresh - self.log_retention  # positions below this are past the retention
            if cut > 0:  # whole chunks: a run keeps at least its newest log_retention lines
                db.execute("DELETE FROM log_chunks WHERE run_id=? AND pos<? AND last<?", (run_id, cut, cut))
            db.execute("INSERT INTO log_seq (run_id, attempt, rank, next_seq) VALUES (?,?,?,?) "
                       "ON CONFLICT(run_id, attempt, rank) DO UPDATE SET next_seq=excluded.next_seq",
                       (run_id, attempt, rank, nxt))
        return nxt

    @staticmethod
    def _next_pos(db: sqlite3.Connection, run_id: str) -> int:
        row = db.execute("SELECT last FROM log_chunks WHERE run_id=? ORDER BY pos DESC LIMIT 1", (run_id,)).fetchone()
        return 0 if row is None else row[0] + 1

    def _segments(self, run_id: str, after: int, limit: int, rank: int | None,
                  attempt: int | None = None) -> list[_Segment]:
        """The stored lines with pos > after (of `rank`), at most `limit`, as one segment per chunk. The rows
        are read under the lock, decoded outside it."""
        picked: list[tuple[tuple[Any, ...], int, int]] = []
        sql = "SELECT pos, last, attempt, rank, seq, ts, stream, text FROM log_chunks WHERE run_id=? AND pos>=?"
        with self._lock:
            row = self._db.execute("SELECT pos FROM log_chunks WHERE run_id=? AND pos<=? ORDER BY pos DESC LIMIT 1",
                                   (run_id, after + 1)).fetchone()  # the chunk holding after+1, if any
            args: list[Any] = [run_id, row[0] if row else after + 1]
            if rank is not None:
                sql += " AND rank=?"
                args.append(rank)
            if attempt is not None:
                sql += " AND attempt=?"
                args.append(attempt)
            cur = self._db.execute(sql + " ORDER BY pos", args)
            left = limit
            while left > 0:
                rows = cur.fetchmany(32)
                if not rows:
                    break
                for r in rows:
                    skip = max(0, after + 1 - r[0])
                    n = min(r[1] - r[0] + 1 - skip, left)
                    if n > 0:
                        picked.append((r, skip, n))
                        left -= n
                    if left <= 0:
                        break
            cur.close()
        out = []
        for (pos, _last, attempt, rk, seq, ts, stream, text), skip, n in picked:
            stamps, streams, lines = _unpack(ts, stream, text)
            if not isinstance(streams, str):
                streams = streams[skip:skip + n]
            out.append(_Segment(pos + skip, rk, attempt, seq + skip, stamps[skip:skip + n], streams,
                                lines[skip:skip + n]))
        return out

    def read_logs(self, run_id: str, after: int = -1, limit: int = 5000,
                  rank: int | None = None, attempt: int | None = None) -> list[LogRow]:
        rows: list[LogRow] = []
        for g in self._segments(run_id, after, limit, rank, attempt):
            streams = repeat(g.streams) if isinstance(g.streams, str) else g.streams  # (repeat: zip not strict)
            rows.extend(LogRow(g.pos + i, g.rank, g.seq + i, t, s, line, g.attempt)
                        for i, (t, s, line) in enumerate(zip(g.stamps, streams, g.lines, strict=False)))
        return rows

    def read_logs_ndjson(self, run_id: str, after: int = -1, limit: int = 5000,
                         rank: int | None = None, attempt: int | None = None) -> tuple[int, bytes]:
        rows = self.read_logs(run_id, after, limit, rank, attempt)
        if not rows:
            return after, b""
        return rows[-1].pos, ("\n".join([r.to_json() for r in rows]) + "\n").encode()

    def read_logs_text(self, run_id: str, after: int = -1, limit: int = 5000,
                       rank: int | None = None, attempt: int | None = None) -> tuple[int, bytes]:
        parts: list[str] = []
        last = after
        for g in self._segments(run_id, after, limit, rank, attempt):
            if isinstance(g.streams, str):  # one stream, no newline in a line (_pack): one format per line
                record = f"{{}}\t{g.rank}\t{TEXT_STREAM.get(g.streams, 'o')}\t{{}}\n".format
                parts.extend(map(record, range(g.pos, g.pos + len(g.lines)), g.lines))
            else:
                parts.extend(f"{g.pos + i}\t{g.rank}\t{TEXT_STREAM.get(s, 'o')}\t{line.replace(chr(10), ' ')}\n"
                             for i, (s, line) in enumerate(zip(g.streams, g.lines, strict=True)))
            last = g.pos + len(g.lines) - 1
        return last, "".join(parts).encode()

    def tail_after(self, run_id: str, n: int, rank: int | None = None) -> int:
        sql = "SELECT pos, last FROM log_chunks WHERE run_id=?" + (" AND rank=?" if rank is not None else "")
        args = (run_id, rank) if rank is not None else (run_id,)
        with self._lock:
            for pos, last in self._db.execute(sql + " ORDER BY pos DESC", args):
                if n <= last - pos:
                    return int(last - n)
                n -= last - pos + 1
        return -1

    def log_counts(self, run_ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for i in range(0, len(run_ids), 500):
                part = run_ids[i:i + 500]
                for run_id, top in self._db.execute(
                        f"SELECT run_id, MAX(last) FROM log_chunks WHERE run_id IN ({','.join('?' * len(part))}) "
                        "GROUP BY run_id", part):
                    out[run_id] = int(top) + 1
        return out

    # -- nodes -------------------------------------------------------------------------------------------
    def upsert_node(self, node: Node) -> Node:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO nodes (id, name, doc) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                           "name=excluded.name, doc=excluded.doc", (node.id, node.name, node.model_dump_json()))
        except sqlite3.IntegrityError:  # the name is another node's (UNIQUE)
            raise AlreadyExists(f"a node named {node.name} exists already") from None
        return node

    def get_node(self, node_id: str) -> Node | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM nodes WHERE id=?", (node_id,)).fetchone()
        return Node.model_validate_json(row[0]) if row else None

    def node_by_name(self, name: str) -> Node | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM nodes WHERE name=?", (name,)).fetchone()
        return Node.model_validate_json(row[0]) if row else None

    def nodes_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT v FROM meta WHERE k='nodes'").fetchone()[0])

    def nodes_since(self, version: int) -> tuple[int, list[Node], set[str]] | None:
        with self._lock:
            now = int(self._db.execute("SELECT v FROM meta WHERE k='nodes'").fetchone()[0])
            if version > now:
                return None
            rows = self._db.execute("SELECT doc FROM nodes WHERE seq > ?", (version,)).fetchall()
            gone = {r[0] for r in self._db.execute("SELECT id FROM node_gone WHERE seq > ?", (version,))}
        with bulk():
            return now, compact_nodes([Node.model_validate_json(r[0]) for r in rows]), gone

    def list_nodes(self) -> list[Node]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM nodes ORDER BY name").fetchall()
        with bulk():
            return compact_nodes([Node.model_validate_json(r[0]) for r in rows])

    def touch_node(self, node_id: str, ts: float) -> Node:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                raise NotFound(node_id)
            node = Node.model_validate_json(row[0])
            node.last_seen = ts
            node.state = "ONLINE"
            db.execute("UPDATE nodes SET doc=? WHERE id=?", (node.model_dump_json(), node_id))
        return node

    def delete_node(self, node_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM nodes WHERE id=?", (node_id,))

    # -- API keys ----------------------------------------------------------------------------------------
    def put_key(self, key: ApiKey) -> None:
        with self._tx() as db:
            new = db.execute("SELECT 1 FROM api_keys WHERE id=?", (key.id,)).fetchone() is None
            db.execute("INSERT INTO api_keys (id, hash, doc) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                       "hash=excluded.hash, doc=excluded.doc", (key.id, key.hash, key.model_dump_json()))
        if not new:  # (a new key is in no cache: see keys_ins in SCHEMA)
            self._keys.changed()  # after the commit: the next request re-reads the version the write moved

    def key_by_hash(self, digest: str) -> ApiKey | None:
        return self._keys.get(digest)

    def key_cached(self, digest: str) -> ApiKey | None | object:
        return self._keys.peek(digest)

    def _keys_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT v FROM meta WHERE k='keys'").fetchone()[0])

    def _read_key(self, digest: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM api_keys WHERE hash=?", (digest,)).fetchone()
        return ApiKey.model_validate_json(row[0]) if row else None

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM api_keys").fetchall()
        return sorted((ApiKey.model_validate_json(r[0]) for r in rows), key=lambda k: k.created_at)

    def close(self) -> None:
        with self._reading:
            if self._reader is not None:
                self._reader.db.close()
                self._reader = None
        with self._lock:
            self._db.close()


class _Snapshot(Snapshot):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _rows(self, sql: str, args: Iterable[Any]) -> list[Any]:
        try:
            return self.db.execute(sql, tuple(args)).fetchall()  # (all of it: the read ends with the statement)
        except sqlite3.OperationalError as exc:  # SQLITE_BUSY (busy_timeout 0: never waits), or worse
            raise Busy(str(exc)) from None

    def node_runs(self, node_id: str, status: Iterable[RunStatus]) -> list[Run]:
        sql, args = SQLiteStore._runs_query(status, node_id, None, 1_000_000, None)
        return [Run.model_validate_json(r[0]) for r in self._rows(sql, args)]

    def get_node(self, node_id: str) -> Node | None:
        rows = self._rows("SELECT doc FROM nodes WHERE id=?", (node_id,))
        return Node.model_validate_json(rows[0][0]) if rows else None


class _Sends(Sends):
    """A pass's placements, judged one by one as they are made (the run read and changed: InvalidTransition and
    NotFound at once), written together at send(): one statement per table for up to 256 of them, not five
    each. Only inside the pass's transaction (batch()): it holds the store's lock and SQLite's write lock from
    the reads to the writes, so what was read is what is overwritten. What is known only when written comes from
    send(): a GPU another run holds (GpuBusy), a team's quota full (QuotaFull), nothing written for that run.
    A change other than a queued run's placement, or one outside a transaction, is written at once."""

    deferred = True

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self.sqlite = store
        # run id -> (as it will be written, as read, how: to, quota limit, fields)
        self._pending: dict[str, tuple[Run, str, tuple[RunStatus, int | None, dict[str, object]]]] = {}
        self._failed: dict[str, Run | Exception] = {}
        store._created.prune()  # (an idle scheduler holds no run created long ago)

    def transition(self, run_id: str, to: RunStatus, *, quota_limit: int | None = None, **fields: object) -> Run:
        store = self.sqlite
        if run_id in self._pending:  # (its second change in the batch: over the first, written)
            self._flush()
        with store._lock:
            if store._depth[0] == 0:  # (no transaction holds what is read until it is written)
                return store.transition(run_id, to, quota_limit=quota_limit, **fields)
            row = store._db.execute("SELECT doc FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(run_id)
            run = store._created.parsed(run_id, row[0])  # (not to be changed: the base of the copy below)
        new = run.changed(to, **fields)
        if run.placements or run.terminal or new.terminal or not new.placements or \
                (new.owner, new.priority, new.created_at, new.endpoint is None) != \
                (run.owner, run.priority, run.created_at, run.endpoint is None):
            self._flush()  # (the rows it had, its columns or its endpoint change: the one-by-one write)
            return store.transition(run_id, to, quota_limit=quota_limit, **fields)
        self._pending[run_id] = (new, row[0], (to, quota_limit, fields))
        store._depth[2] += 1
        return new

    def note(self, run_id: str, **fields: object) -> None:
        if run_id in self._pending:
            self._flush()
        super().note(run_id, **fields)

    def modify(self, run_id: str, change: Callable[[Run], Run | None]) -> tuple[Run, Run]:
        self._flush()
        return super().modify(run_id, change)

    def send(self, last: bool = False, *, overlap: bool = False) -> dict[str, Run | Exception]:
        self._flush()
        failed, self._failed = self._failed, {}
        return failed

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        store = self.sqlite
        with store._tx() as db:
            if store._depth[0] == 1:  # (the transaction they were judged in has ended, undone: so are they)
                raise RuntimeError(f"{len(pending)} placements were held back in a transaction that has ended")
            store._depth[2] -= len(pending)
            claims = {run.id: run.gpu_claims() for run, _, _ in pending.values()}
            nodes = sorted({n for held in claims.values() for n, _ in held})
            taken: dict[tuple[str, int], str] = {}
            for i in range(0, len(nodes), 500):
                part = nodes[i:i + 500]
                taken.update(((n, g), r) for n, g, r in db.execute(
                    f"SELECT node_id, gpu, run_id FROM gpu_claims WHERE node_id IN ({','.join('?' * len(part))})",
                    part))
            sums: dict[str, int] = {}
            ok: list[Run] = []
            for run, _, (_, limit, _) in pending.values():
                busy = next(((n, g) for n, g in sorted(claims[run.id]) if taken.get((n, g), run.id) != run.id), None)
                if busy is not None:
                    self._failed[run.id] = GpuBusy(*busy, taken[busy])
                    continue
                if limit is not None:
                    key, gpus = quota_charge(run)
                    if key not in sums:
                        row = db.execute("SELECT gpus FROM quota_sum WHERE key=?", (key,)).fetchone()
                        sums[key] = row[0] if row else 0
                    if sums[key] + gpus > limit:
                        self._failed[run.id] = QuotaFull(key, int(sums[key]), limit)
                        continue
                    sums[key] += gpus
                taken.update(dict.fromkeys(claims[run.id], run.id))
                ok.append(run)
            rows = []
            for run in ok:
                run._version = store._next_seq(db)
                rows.append((run.status.value, run.node_id, run.model_dump_json(), run.version, run.id,
                             pending[run.id][1]))
            # (each over the document it was decided on: the pass itself may have written one of them since,
            # in this transaction; that one is decided again below, over what it wrote)
            if db.executemany("UPDATE runs SET status=?, node_id=?, doc=?, seq=? WHERE id=? AND doc=?",
                              rows).rowcount != len(rows):
                written = {r[0] for r in db.execute(
                    f"SELECT id FROM runs WHERE seq >= ? AND id IN ({','.join('?' * len(ok))})",
                    (ok[0].version, *(r.id for r in ok)))}
                redo = [r for r in ok if r.id not in written]
                ok = [r for r in ok if r.id in written]
            else:
                redo = []
            store._index_many(db, ok)
            for run in redo:
                run._version, run_id = None, run.id  # (not written as returned)
                to, limit, fields = pending[run_id][2]
                try:
                    self._failed[run_id] = store.transition(run_id, to, quota_limit=limit, **fields)
                except (InvalidTransition, NotFound, GpuBusy, QuotaFull) as exc:
                    self._failed[run_id] = exc


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store lock; ROLLBACK on error. Nested uses (inside `batch()`)
    join the outer transaction, which commits once."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock, depth: list[int]) -> None:
        self.db, self.lock, self.depth = db, lock, depth

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        if self.depth[0] == 0:
            self.depth[1] = 0  # (another process may have written since the last transaction)
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except BaseException:  # (another process held the write lock past the busy timeout)
                self.lock.release()  # kept, every other thread's store call would wait on it for ever
                raise
        self.depth[0] += 1
        return self.db

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.depth[0] -= 1
        try:
            if self.depth[0] == 0:
                unsent, self.depth[2] = self.depth[2], 0
                if unsent and not exc_type:  # (a pass that placed runs and did not write them: none of it stands)
                    self.db.execute("ROLLBACK")
                    raise RuntimeError(f"{unsent} placements made in a transaction were not sent before its commit")
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
