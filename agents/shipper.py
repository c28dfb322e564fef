"""Log shipping: tail a job's output files, number each line, send in batches until acknowledged.

Checkpoint after every acknowledged batch: (file offsets, next seq). An agent restarted from the checkpoint
re-reads and resends exactly the lines after it; the scheduler drops any it already has (by seq).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from scheduler.models import LogBatch

from .client import AgentClient, Refused, Unreachable

MAX_LINE = 64 * 1024
MAX_BATCH_LINES = 20_000
MAX_BATCH_BYTES = 4 * 1024 * 1024


class _Tail:
    def __init__(self, stream: str, path: Path, offset: int) -> None:
        self.stream, self.path, self.offset = stream, path, offset  # offset: end of the last whole line
        self._f = None
        self.refused = False

    def _refuse(self, why: str) -> list[tuple[str, int]]:
        # A job replaced its log file with a symlink (to a file only the agent may read) or a fifo: say so once.
        self.refused = True
        return [(f"[fedml agent] {self.stream} not shipped: {self.path.name}: {why}", self.offset)]

    def read_lines(self, max_lines: int, max_bytes: int, final: bool) -> list[tuple[str, int]]:
        """Whole lines after `offset` (and the unterminated rest when final), with the offset after each."""
        if self.refused:
            return []
        if self._f is None:
            # The file may sit in a directory the job owns (container logs): never through a symlink or a fifo.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return []
            except OSError as exc:
                return self._refuse(exc.strerror or str(exc))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return self._refuse("not a plain file")
            self._f = os.fdopen(fd, "rb")
        self._f.seek(self.offset)
        data = self._f.read(max_bytes)
        out: list[tuple[str, int]] = []
        pos = 0
        while len(out) < max_lines:
            nl = data.find(b"\n", pos)
            if nl < 0 or nl - pos > MAX_LINE:
                rest = len(data) - pos
                if rest >= MAX_LINE or (final and rest > 0 and len(data) < max_bytes):
                    end = pos + min(rest, MAX_LINE)
                    out.append((data[pos:end].decode("utf-8", "replace"), self.offset + end))
                    pos = end
                    continue
                break
            out.append((data[pos:nl].rstrip(b"\r").decode("utf-8", "replace"), self.offset + nl + 1))
            pos = nl + 1
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Shipper:
    def __init__(self, client: AgentClient, run_id: str, rank: int, files: dict[str, Path],
                 offsets: dict[str, int] | None = None, next_seq: int = 0, attempt: int = 1) -> None:
        self.client, self.run_id, self.rank, self.attempt = client, run_id, rank, attempt
        self.tails = [_Tail(s, p, (offsets or {}).get(s, 0)) for s, p in files.items()]
        self.next_seq = next_seq
        self.shipped = 0

    def checkpoint(self) -> dict[str, object]:
        return {"offsets": {t.stream: t.offset for t in self.tails}, "next_seq": self.next_seq}

    def pump(self, final: bool = False) -> int:
        """Read what is there and ship it. Returns lines shipped (0: nothing new). Raises Unreachable."""
        lines: list[tuple[float, str, str]] = []
        ends: list[tuple[_Tail, int]] = []
        budget = MAX_BATCH_BYTES
        for t in self.tails:
            got = t.read_lines(MAX_BATCH_LINES - len(lines), budget, final)
            if got:
                now = time.time()
                lines.extend((now, t.stream, text) for text, _ in got)
                ends.append((t, got[-1][1]))
                budget = max(4096, budget - sum(len(x) for x, _ in got))
        if not lines:
            return 0
        batch = LogBatch(rank=self.rank, attempt=self.attempt, first_seq=self.next_seq, lines=lines)
        try:
            acked = self.client.send_logs(self.run_id, batch)
        except Refused as exc:
            if exc.status in (403, 404, 409):  # the run is gone, ended here, or no longer ours: nothing to keep
                acked = self.next_seq + len(lines)
            else:
                raise Unreachable(str(exc)) from None
        if acked < self.next_seq:
            # The scheduler knows fewer lines than we sent before: it lost them (a store without
            # durability). Nothing to resend from here; carry on from our numbering.
            acked = self.next_seq + len(lines)
        sent = acked - self.next_seq
        if sent < len(lines):
            # Partially acknowledged (should not happen): resend from the first line not acknowledged.
            return 0
        for t, end in ends:
            t.offset = end
        self.next_seq = acked
        self.shipped += len(lines)
        return len(lines)

    def drain(self) -> None:
        """Ship everything, including an unterminated last line. Retries until the scheduler has it."""
        delay = 0.2
        while True:
            try:
                while self.pump(final=True):
                    pass
                return
            except Unreachable:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        for t in self.tails:
            t.close()
