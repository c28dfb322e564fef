"""The typed client (fedml_cli.client): sync and async over a real local scheduler and agent, typed answers,
errors named after the CLI's exit codes, and reads (not writes) retried after a transport error against a real
socket that drops connections."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedml_cli.client import AsyncClient, Client, CliError, Invalid, NotFound, Unreachable
from fedml_cli.errors import FAILED, NOT_FOUND, USAGE, Failed
from scheduler.contract.models import Run, RunStatus

from .conftest import Fedml, write_job


@pytest.fixture
def env(fedml: Fedml) -> Iterator[Fedml]:
    """This process talks to the test's own local scheduler (FEDML_HOME), as the `fedml` command would."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(fedml.env())
    try:
        yield fedml
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_errors_are_named_after_exit_codes() -> None:
    assert type(CliError("x", NOT_FOUND)) is NotFound and isinstance(NotFound("x"), CliError)
    assert NotFound("x").code == NOT_FOUND and Invalid("x").code == USAGE and Failed("x").code == FAILED
    assert type(CliError("x")) is Failed and type(CliError("x", 7)) is CliError


def test_the_typed_client_launches_follows_and_reads(env: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path / "j", 'for i in 1 2 3; do echo "line $i"; done')
    with Client() as c:
        run = c.launch(str(job))
        assert isinstance(run, Run) and run.status == RunStatus.QUEUED
        lines = [r.line for r in c.logs(run.id, follow=True)]
        assert lines == ["line 1", "line 2", "line 3"]
        done = c.wait(run.id, timeout=60)
        assert done.status == RunStatus.FINISHED and done.exit_code == 0
        assert run.id in [r.id for r in c.runs()]
        assert [r.line for r in c.logs(run.id, tail=1)] == ["line 3"]
        assert [n.name for n in c.nodes()] and all(n.state == "ONLINE" for n in c.nodes())
        with pytest.raises(NotFound):
            c.run("run-0000000000000000")
        bad = tmp_path / "bad.yaml"
        bad.write_text("job: echo\ncomputing:\n  minimum_num_gpus: lots\n")
        with pytest.raises(Invalid, match="bad.yaml:3"):
            c.launch(str(bad))
        slow = c.launch(str(write_job(tmp_path / "s", "sleep 60")))
        with pytest.raises(Failed, match="still"):
            c.wait(slow.id, timeout=0.3)
        assert c.stop(slow.id).stop_requested or c.run(slow.id).status == RunStatus.KILLED

    async def main() -> tuple[list[str], RunStatus, list[str]]:
        async with AsyncClient() as a:
            started = await a.launch(str(job))
            got = [r.line async for r in a.logs(started.id, follow=True)]
            ended = await a.wait(started.id, timeout=60)
            try:
                await a.run("run-0000000000000000")
            except NotFound as exc:
                missing = [type(exc).__name__]
            return got, ended.status, missing

    got, status, missing = asyncio.run(main())
    assert got == ["line 1", "line 2", "line 3"] and status == RunStatus.FINISHED and missing == ["NotFound"]


def _dropping_server(drops: int) -> tuple[str, list[int], threading.Event]:
    """An HTTP server on loopback that closes the first `drops` connections without answering, then answers
    every request with `[]`. Returns (url, a one-item list counting connections, a stop event)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    seen, stop = [0], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            seen[0] += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                except OSError:
                    continue
                if seen[0] <= drops:
                    continue  # closed without a byte: a transport error for the client
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                             b"connection: close\r\n\r\n[]")
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", seen, stop


def test_reads_are_retried_after_a_dropped_connection_and_writes_are_not() -> None:
    url, seen, stop = _dropping_server(drops=2)
    try:
        c = Client(url, "k", retries=3)
        assert c.api.get("/runs") == []  # two dropped, the third answered
        assert seen[0] == 3
        url2, seen2, stop2 = _dropping_server(drops=1)
        try:
            with pytest.raises(Unreachable):
                Client(url2, "k", retries=3).api.post("/runs", json={})  # a write: never sent twice
            assert seen2[0] == 1
        finally:
            stop2.set()
        url3, seen3, stop3 = _dropping_server(drops=10)
        try:
            with pytest.raises(Unreachable, match="3 tries"):
                Client(url3, "k", retries=3).api.get("/runs")
            assert seen3[0] == 3
        finally:
            stop3.set()
    finally:
        stop.set()
