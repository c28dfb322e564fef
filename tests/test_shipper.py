"""Unit tests of the agent's log shipper (agents/shipper.py) against an in-memory scheduler that numbers lines by
sequence the way the stores do (drops resends, refuses gaps): no processes, no HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agents import shipper as mod
from agents.shipper import Shipper
from scheduler.contract.models import LogBatch

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


class Scheduler:
    """Keeps lines by seq like Store.append_logs: a resend is dropped, a gap answers the seq it expects."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def send_logs(self, run_id: str, b: LogBatch) -> int:
        have = len(self.lines)
        if b.first_seq > have:
            return have  # the 409 with next_seq, as AgentClient.send_logs returns it
        self.lines.extend(text for i, (_, _, text) in enumerate(b.rows()) if b.first_seq + i >= have)
        return len(self.lines)


def ship(tmp_path: Path, data: bytes) -> list[str]:
    f = tmp_path / "out"
    f.write_bytes(data)
    s = Scheduler()
    sh = Shipper(s, "run-1", 0, {"stdout": f})  # type: ignore[arg-type]
    sh.drain()
    return s.lines


@pytest.mark.parametrize("data,lines", [
    (b"a\nb\n", ["a", "b"]),
    (b"a\r\nb\r\n", ["a", "b"]),
    (b"\rbar 1\rbar 2\rbar 3\n", ["bar 1", "bar 2", "bar 3"]),
    (b"\n\nx\n", ["", "", "x"]),
    (b"no newline at the end", ["no newline at the end"]),
    ("a\u2028b\n".encode(), ["a\u2028b"]),
])
def test_lines_end_at_newline_crlf_or_a_lone_cr(tmp_path: Path, data: bytes, lines: list[str]) -> None:
    assert ship(tmp_path, data) == lines


@pytest.mark.parametrize("seed", range(40))
def test_bulk_splitting_gives_the_lines_the_per_line_path_gives(tmp_path: Path, seed: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Output written in random pieces (newlines, CRLF split across writes, lone CRs, empty lines, invalid
    UTF-8, lines over the cap), pumped between writes with small batches: the same lines, in the same batches'
    order, with and without the bulk split."""
    import random

    rng = random.Random(seed)
    atoms = [b"\n", b"\r\n", b"\r", b"abc", b"x" * 50, "\u00e9t\u00e9".encode(), b"\xe2\x82", b"\xff", b"",
             b"y" * (mod.MAX_LINE + 7), b"\n\n"]
    pieces = [b"".join(rng.choice(atoms) for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(1, 12))]

    def run(bulk: bool) -> list[str]:
        monkeypatch.setattr(mod, "BULK", bulk)
        monkeypatch.setattr(mod, "MAX_BATCH_LINES", rng2.randint(1, 50))
        f = tmp_path / f"out-{bulk}"
        f.write_bytes(b"")
        s = Scheduler()
        sh = Shipper(s, "run-1", 0, {"stdout": f})  # type: ignore[arg-type]
        for piece in pieces:
            with open(f, "ab") as out:
                out.write(piece)
            while sh.pump():
                pass
        sh.drain()
        return s.lines

    rng2 = random.Random(seed)
    slow = run(False)
    rng2 = random.Random(seed)
    assert run(True) == slow


def test_a_line_over_the_cap_is_one_line_marked_truncated(tmp_path: Path) -> None:
    got = ship(tmp_path, b"x" * (5 * mod.MAX_LINE) + b"\nnext\n")
    assert len(got) == 2 and got[0] == "x" * mod.MAX_LINE + mod.TRUNCATED and got[1] == "next"


def test_a_scheduler_that_lost_lines_gets_them_again(tmp_path: Path) -> None:
    """The store lost what it acknowledged (no durability): the shipper reads again from the last batch at or
    before the scheduler's position and resends; nothing is acknowledged that was not stored."""
    f = tmp_path / "out"
    f.write_bytes(b"")
    s = Scheduler()
    sh = Shipper(s, "run-1", 0, {"stdout": f})  # type: ignore[arg-type]
    for i in range(3):
        with open(f, "ab") as out:
            out.write(f"l{i}\n".encode())
        assert sh.pump() == 1
    del s.lines[1:]  # 3 shipped, 1 kept
    with open(f, "ab") as out:
        out.write(b"l3\n")
    assert sh.pump() == 0 and sh.rewinds == 1
    sh.drain()
    assert s.lines == ["l0", "l1", "l2", "l3"]



def test_a_batch_says_whether_the_output_was_read_to_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """caught_up: the worker waits SHIP_EVERY before the next batch only after one that read the job's output to
    its end (a fast printer's lines go in fewer, larger batches); after a batch cut at its size it goes on at once."""
    monkeypatch.setattr(mod, "MAX_BATCH_LINES", 3)
    f = tmp_path / "out"
    f.write_bytes(b"a\nb\nc\nd\n")
    s = Scheduler()
    sh = Shipper(s, "run-1", 0, {"stdout": f})  # type: ignore[arg-type]
    assert sh.pump() == 3 and not sh.caught_up  # (cut at its size: more is waiting)
    assert sh.pump() == 1 and sh.caught_up
    assert sh.pump() == 0 and sh.caught_up
    monkeypatch.setattr(mod, "MAX_BATCH_LINES", 1000)
    monkeypatch.setattr(mod, "MAX_BATCH_BYTES", 8192)
    with open(f, "ab") as out:
        out.write(b"x" * 5000 + b"\n" + b"y" * 5000 + b"\n" + b"z\n")
    assert sh.pump() == 1 and not sh.caught_up  # (cut at its bytes)
    sh.drain()
    assert s.lines == ["a", "b", "c", "d", "x" * 5000, "y" * 5000, "z"] and sh.caught_up

def test_a_partial_line_is_shipped_after_a_short_wait_and_cut_the_same_way_on_a_resend(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_bytes(b"progress 10%")
    s = Scheduler()
    sh = Shipper(s, "run-1", 0, {"stdout": f})  # type: ignore[arg-type]
    assert sh.pump() == 0  # not yet: it may be finished in a moment
    time.sleep(mod.PARTIAL_AFTER + 0.1)
    assert sh.pump() == 1 and s.lines == ["progress 10%"]
    with open(f, "ab") as out:
        out.write(b" done\nnext\n")
    sh.pump()
    assert s.lines == ["progress 10%", " done", "next"]
    s.lines.clear()  # everything lost: a full resend numbers the lines the same way
    with open(f, "ab") as out:
        out.write(b"last\n")
    while sh.pump() or sh.rewinds == 0:
        pass
    sh.drain()
    assert s.lines == ["progress 10%", " done", "next", "last"]


def test_reading_lines_is_linear_in_what_was_written(tmp_path: Path) -> None:
    """A search for the next "\\r" per line once scanned the rest of the buffer for every line: reading 200,000
    lines took 3.1 s instead of 0.2. Ten times the lines must cost about ten times the time (quadratic: 100x)."""
    def read_all(n: int) -> float:
        path = tmp_path / f"out-{n}"
        path.write_bytes(b"".join(b"line %d\n" % i for i in range(n)))
        tail, got = mod._Tail("stdout", path, 0), 0
        t0 = time.perf_counter()
        while True:
            lines, tail.offset = tail.read_lines(mod.MAX_BATCH_LINES, mod.MAX_BATCH_BYTES, True)
            if not lines:
                break
            got += len(lines)
        assert got == n
        return time.perf_counter() - t0
    small, big = read_all(20_000), read_all(200_000)
    assert big < 40 * small + 0.05, f"20,000 lines in {small:.3f} s, 200,000 in {big:.3f} s"


def test_an_agent_sends_rows_to_a_scheduler_that_knows_only_rows(tmp_path: Path) -> None:
    """A scheduler older than its agents refuses a batch of columns (422): the agent's client sends the same
    lines as rows, then and from then on; nothing is lost or numbered twice. Over real HTTP on loopback."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from agents.client import AgentClient

    got: list[dict[str, object]] = []

    class OldScheduler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            got.append(body)
            ok = "lines" in body and "text" not in body
            answer = {"next_seq": body["first_seq"] + len(body["lines"])} if ok else {"detail": [
                {"type": "missing", "loc": ["lines"], "msg": "Field required"}]}  # (what pydantic said there)
            data = json.dumps(answer).encode()
            self.send_response(200 if ok else 422)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldScheduler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        f = tmp_path / "out"
        f.write_bytes(b"one\ntwo\n")
        client = AgentClient(f"http://127.0.0.1:{server.server_address[1]}", "token")
        sh = Shipper(client, "run-1", 0, {"stdout": f})
        assert sh.pump() == 2
        with f.open("ab") as out:
            out.write(b"three\n")
        assert sh.pump() == 1 and sh.next_seq == 3
    finally:
        server.shutdown()
        server.server_close()
    assert ["text" in b for b in got] == [True, False, False]  # refused once, then rows only
    assert [[line[2] for line in b["lines"]] for b in got[1:]] == [["one", "two"], ["three"]]  # type: ignore[index]
    assert [b["first_seq"] for b in got] == [0, 0, 2]
