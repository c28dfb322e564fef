"""Log shipping: tail a job's output files, number each line, send in batches until acknowledged.

Checkpoint after every acknowledged batch: (file offsets, next seq). An agent restarted from the checkpoint
re-reads and resends exactly the lines after it; the scheduler drops any it already has (by seq).
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from pathlib import Path

from scheduler.contract.models import LogBatch

from .client import AgentClient, Refused, Unreachable

MAX_LINE = 64 * 1024
MAX_BATCH_LINES = 20_000
MAX_BATCH_BYTES = 4 * 1024 * 1024
# An unterminated last line (a progress bar redrawn with "\r", a prompt) is shipped once it has waited this long,
# so a follower sees it live; what the job writes after it starts a new line.
PARTIAL_AFTER = 0.5
TRUNCATED = " [fedml: line truncated at 64 KiB]"
BULK = True  # split runs of plain lines at once (False: the per-line path alone, which tests compare it with)
# A batch that is not full (the job's output read to its end) is followed by the next no sooner than this after it
# was read: each batch costs a request, a commit on the scheduler and a checkpoint here, and a job printing fast was
# shipped in ~100 batches per 200,000 lines (now ~30-50: a quarter less CPU for the scheduler and the agent
# together). A line waits at most this long.
SHIP_EVERY = 0.02


class _Tail:
    """One output file. Lines end at "\n", "\r\n" or a lone "\r" (tqdm and other progress bars redraw with
    "\r": each redraw is a line of its own). A line longer than MAX_LINE is one line, cut and marked."""

    def __init__(self, stream: str, path: Path, offset: int) -> None:
        self.stream, self.path, self.offset = stream, path, offset  # offset: end of the last line shipped
        self._f = None
        self.refused = False
        self.skipping = False  # inside the rest of a truncated line: dropped up to its end
        self.cuts: set[int] = set()  # where partial lines were cut: a re-read (rewind) cuts them the same way
        self._partial: tuple[int, int, float] | None = None  # (offset, size, since) of an unterminated rest
        self._after_cr = False  # the last line ended with a "\r" at the end of what was read

    def rewind(self, offset: int) -> None:
        self.offset, self.skipping, self._partial, self._after_cr = offset, False, None, False

    def _refuse(self, why: str) -> tuple[list[str], int]:
        # A job replaced its log file with a symlink (to a file only the agent may read) or a fifo: say so once.
        self.refused = True
        return [f"[fedml agent] {self.stream} not shipped: {self.path.name}: {why}"], self.offset

    def read_lines(self, max_lines: int, max_bytes: int, final: bool) -> tuple[list[str], int]:
        """Lines after `offset` (and the unterminated rest when final, or once it has waited PARTIAL_AFTER),
        and the offset after the last byte they account for."""
        if self.refused:
            return [], self.offset
        if self._f is None:
            # The file may sit in a directory the job owns (container logs): never through a symlink or a fifo.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return [], self.offset
            except OSError as exc:
                return self._refuse(exc.strerror or str(exc))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return self._refuse("not a plain file")
            self._f = os.fdopen(fd, "rb")
        self._f.seek(self.offset)
        data = self._f.read(max_bytes)
        base, n, eof = self.offset, len(data), len(data) < max_bytes
        cuts = sorted(c - base for c in self.cuts if base < c <= base + n)
        out: list[str] = []
        pos = 0
        cr = -2  # the next "\r" at or after pos (-1: none left), found again only once pos has passed it: a fresh
        # search per line scanned the rest of the buffer for each line (quadratic: 200,000 lines took seconds)
        while len(out) < max_lines and pos < n:
            if cr != -1 and cr < pos:
                cr = data.find(b"\r", pos)
            if BULK and not self.skipping and not self._after_cr:
                # Whole lines before the next "\r" or cut, split at once: a Python step per line cost ~0.5 us,
                # 0.1 s of agent CPU for a 200,000-line job. ("\n" is never part of a UTF-8 sequence, so
                # decoding the block and splitting gives what decoding each line gives.)
                limit = cr if cr >= 0 else n
                limit = next((c for c in cuts if c > pos and c < limit), limit)
                last = data.rfind(b"\n", pos, limit)
                if last >= pos:
                    parts = data[pos:last].split(b"\n")
                    room = max_lines - len(out)
                    if len(parts) > room:
                        parts = parts[:room]
                        last = pos + sum(map(len, parts)) + room - 1
                    if max(map(len, parts)) <= MAX_LINE:
                        out.extend(data[pos:last].decode("utf-8", "replace").split("\n"))
                        pos = last + 1
                        continue
            nl = data.find(b"\n", pos)
            end = min(x for x in (nl, cr) if x >= 0) if nl >= 0 or cr >= 0 else n
            cut = next((c for c in cuts if pos < c <= end), None)
            if cut is not None and not self.skipping:  # a partial line shipped early: cut the same way again
                out.append(self._text(data[pos:cut]))
                pos = cut
                continue
            if end - pos > MAX_LINE and not self.skipping:  # one line, cut and marked; the rest is dropped
                out.append(self._text(data[pos:pos + MAX_LINE]) + TRUNCATED)
                pos += MAX_LINE
                self.skipping = True
                continue
            if end == n:  # no line end yet
                if self.skipping:
                    pos = n  # still inside the truncated line
                elif self._ripe(base + pos, n - pos, final, eof):
                    self.cuts.add(base + n)
                    if len(self.cuts) > 4096:
                        self.cuts = {c for c in self.cuts if c > base}
                    out.append(self._text(data[pos:n]))
                    pos = n
                break
            stop = end + 1
            if data[end] == 0x0D:  # "\r"
                if end + 1 == n and not (final and eof):
                    if end > pos and not self.skipping:  # the line is whole; whether "\n" follows is seen next
                        out.append(self._text(data[pos:end]))
                        self._after_cr = True
                    pos = stop
                    break
                if data[end + 1:end + 2] == b"\n":
                    stop = end + 2
                elif end == pos:  # a redraw starts with "\r": no empty line before it
                    pos = stop
                    continue
            elif end == pos and self._after_cr:  # the "\n" of a "\r\n" split across two reads
                self._after_cr = False
                pos = stop
                continue
            self._after_cr = False
            if self.skipping:
                self.skipping = False
            else:
                out.append(self._text(data[pos:end]))
            pos = stop
        self._after_cr = self._after_cr and pos == n
        return out, base + pos

    def _ripe(self, at: int, size: int, final: bool, eof: bool) -> bool:
        """Ship an unterminated rest now? At the end of the job, or once it has sat unchanged PARTIAL_AFTER."""
        if final and eof:
            return True
        now = time.monotonic()
        if self._partial is None or self._partial[:2] != (at, size):
            self._partial = (at, size, now)
            return False
        return eof and now - self._partial[2] >= PARTIAL_AFTER

    @staticmethod
    def _text(b: bytes) -> str:
        return b.decode("utf-8", "replace")

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
        self.caught_up = True  # the last pump() read every tail to its end (not stopped by a batch's size)
        self.rewinds = 0
        # (first seq, offsets) before each batch acknowledged: where to read again from if the scheduler turns
        # out to have fewer lines than it acknowledged. The checkpoint we started from is the oldest we know.
        self.marks: list[tuple[int, dict[str, int]]] = [(next_seq, dict(offsets or {}))] if next_seq else []

    def checkpoint(self) -> dict[str, object]:
        return {"offsets": {t.stream: t.offset for t in self.tails}, "next_seq": self.next_seq}

    def pump(self, final: bool = False) -> int:
        """Read what is there and ship it. Returns lines shipped (0: nothing new). Raises Unreachable."""
        # Columns, as LogBatch sends them: each read's lines share its time and its stream (a batch of one
        # stream's lines, the usual one, sends each once).
        lines: list[str] = []
        reads: list[tuple[float, str, int]] = []  # (time, stream, lines) of each read that gave lines
        ends: list[tuple[_Tail, int]] = []
        saved = [(t, t.skipping, t._after_cr) for t in self.tails]
        budget = MAX_BATCH_BYTES
        full = False
        for t in self.tails:
            got, end = t.read_lines(MAX_BATCH_LINES - len(lines), budget, final)
            if end != t.offset:
                ends.append((t, end))
            if got:
                reads.append((time.time(), t.stream, len(got)))
                lines.extend(got)
                budget -= sum(len(x) for x in got)
                full = full or len(lines) >= MAX_BATCH_LINES or budget < MAX_LINE + 4096
                budget = max(4096, budget)
        self.caught_up = not full
        if not lines:
            for t, end in ends:  # bytes that make no line (the rest of a truncated one, a "\n" after "\r")
                t.offset = end
            return 0
        mark = (self.next_seq, {t.stream: t.offset for t in self.tails})
        # (built, not validated: these are the agent's own values, and validating 20,000 lines cost as much as
        # sending them)
        if len(reads) == 1:
            ts: float | list[float] = reads[0][0]
            stream: str | list[str] = reads[0][1]
        else:
            ts = [x for now, _, n in reads for x in itertools.repeat(now, n)]
            stream = [x for _, name, n in reads for x in itertools.repeat(name, n)]
        batch = LogBatch.model_construct(rank=self.rank, attempt=self.attempt, first_seq=self.next_seq, text=lines,
                                         ts=ts, stream=stream)
        try:
            acked = self.client.send_logs(self.run_id, batch)
        except Refused as exc:
            if exc.status in (403, 404, 409):  # the run is gone, or its rank here has ended: nothing keeps these
                acked = self.next_seq + len(lines)
            else:
                self._restore(saved)
                raise Unreachable(str(exc)) from None
        except BaseException:
            self._restore(saved)
            raise
        if acked < self.next_seq + len(lines):
            # The scheduler has fewer lines than we numbered (a store that lost some, or a batch only partly
            # taken): never pretend. Read again from the last batch that started at or before what it has, and
            # resend; it drops by seq whatever it has already.
            self._restore(saved)
            self._rewind(acked)
            return 0
        self.marks.append(mark)
        if len(self.marks) > 1024:
            del self.marks[:512]
        for t, end in ends:
            t.offset = end
        self.next_seq = acked
        self.shipped += len(lines)
        return len(lines)

    def _restore(self, saved: list[tuple[_Tail, bool, bool]]) -> None:
        for t, skipping, after_cr in saved:
            t.skipping, t._after_cr = skipping, after_cr

    def _rewind(self, have: int) -> None:
        seq, offsets = next(((s, o) for s, o in reversed(self.marks) if s <= have), (0, {}))
        self.marks = [m for m in self.marks if m[0] < seq]
        for t in self.tails:
            t.rewind(offsets.get(t.stream, 0))
        self.next_seq = seq
        self.rewinds += 1

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
