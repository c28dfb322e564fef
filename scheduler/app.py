"""HTTP API (FastAPI). Routes stay thin: they authenticate, call the Scheduler, and shape answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fedml_cli import __version__

from .blobs import BlobError, BlobStore
from .models import LogBatch, Node, NodeInfo, PollRequest, PollResponse, Run, RunCreate, RunStatus, StatusReport
from .notify import Notifier
from .service import Rejected, Scheduler
from .store import SeqGap, Store

log = logging.getLogger("fedml.scheduler")

API = "/api/v1"


@dataclass
class Settings:
    token: str | None
    blob_dir: Path
    max_workspace_mb: int = 512
    poll_wait: float = 15.0
    heartbeat_timeout: float = 60.0


def create_app(store: Store, settings: Settings) -> FastAPI:
    notifier = Notifier()
    blobs = BlobStore(settings.blob_dir, max_bytes=settings.max_workspace_mb * 1024 * 1024,
                      max_unpacked_bytes=4 * settings.max_workspace_mb * 1024 * 1024)
    sched = Scheduler(store, notifier, blob_exists=blobs.has, poll_wait=settings.poll_wait,
                      heartbeat_timeout=settings.heartbeat_timeout)

    async def schedule_loop() -> None:
        while True:
            ticket = notifier.ticket("schedule")
            try:
                await run_in_threadpool(sched.schedule_pass)
            except Exception:  # keep placing whatever one bad pass did
                log.exception("schedule pass failed")
            await notifier.wait("schedule", ticket, 2.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(schedule_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="fedml launch scheduler", version=__version__, lifespan=lifespan)
    app.state.scheduler = sched
    app.state.store = store

    @app.exception_handler(Rejected)
    async def _rejected(_: Request, exc: Rejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(BlobError)
    async def _blob(_: Request, exc: BlobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def auth(request: Request) -> str:
        if settings.token is None:
            return "local"
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})
        return "local"

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return {"ok": True, "version": __version__}

    @app.get(f"{API}/info", dependencies=[Depends(auth)])
    def info() -> dict[str, object]:
        nodes = store.list_nodes()
        return {"version": __version__, "store": type(store).__name__, "nodes": len(nodes),
                "gpus": sum(len(n.gpus) for n in nodes)}

    # -- workspace blobs ---------------------------------------------------------------------------------
    @app.head(f"{API}/blobs/{{sha}}", dependencies=[Depends(auth)])
    def blob_head(sha: str) -> Response:
        return Response(status_code=200 if blobs.has(sha) else 404)

    @app.put(f"{API}/blobs/{{sha}}", dependencies=[Depends(auth)], status_code=201)
    async def blob_put(sha: str, request: Request) -> dict[str, object]:
        if blobs.has(sha):
            return {"sha256": sha, "stored": False}
        size = await blobs.put(sha, request.stream())
        return {"sha256": sha, "stored": True, "size": size}

    @app.get(f"{API}/blobs/{{sha}}", dependencies=[Depends(auth)])
    def blob_get(sha: str) -> Response:
        from fastapi.responses import FileResponse

        path = blobs.path(sha)
        if not path.is_file():
            raise HTTPException(404, f"blob {sha[:12]} not found")
        return FileResponse(path, media_type="application/gzip")

    # -- runs --------------------------------------------------------------------------------------------
    @app.post(f"{API}/runs", status_code=201)
    def create_run(body: RunCreate, owner: str = Depends(auth)) -> Run:
        return sched.create_run(body, owner=owner)

    @app.get(f"{API}/runs", dependencies=[Depends(auth)])
    def list_runs(status: list[RunStatus] | None = Query(default=None),
                  limit: int = Query(default=1000, ge=1, le=100_000)) -> list[Run]:
        return store.list_runs(status=status, limit=limit)

    @app.get(f"{API}/runs/{{run_id}}", dependencies=[Depends(auth)])
    def get_run(run_id: str) -> Run:
        return sched.get_run(run_id)

    @app.post(f"{API}/runs/{{run_id}}/stop", dependencies=[Depends(auth)])
    def stop_run(run_id: str) -> Run:
        return sched.stop_run(run_id)

    @app.get(f"{API}/runs/{{run_id}}/logs", dependencies=[Depends(auth)])
    async def read_logs(run_id: str, after: int = Query(default=-1, ge=-1),
                        tail: int | None = Query(default=None, ge=0), follow: bool = False,
                        rank: int | None = None) -> StreamingResponse:
        run = await run_in_threadpool(sched.get_run, run_id)
        if tail is not None:
            after = max(after, run.log_count - tail - 1)
        return StreamingResponse(_stream(run_id, after, follow, rank), media_type="application/x-ndjson")

    async def _stream(run_id: str, after: int, follow: bool, rank: int | None) -> AsyncIterator[bytes]:
        # NDJSON: one object per log line, then {"end": true, ...} once the run is over (or at once
        # without follow). Lines come before the end marker because agents ship every line before
        # they report the final status.
        key = f"run:{run_id}"
        seen_end = False
        while True:
            ticket = notifier.ticket(key)
            rows = await run_in_threadpool(store.read_logs, run_id, after, 5000, rank)
            if rows:
                after = rows[-1].pos
                yield ("\n".join(r.to_json() for r in rows) + "\n").encode()
                continue
            if seen_end:
                run = await run_in_threadpool(sched.get_run, run_id)
                end = {"end": True, "status": run.status.value, "exit_code": run.exit_code,
                       "reason": run.reason, "next": after + 1}
                yield (json.dumps(end) + "\n").encode()
                return
            run = await run_in_threadpool(sched.get_run, run_id)
            if run.terminal or not follow:
                seen_end = True  # one more read catches lines stored before the status changed
                continue
            await notifier.wait(key, ticket, 5.0)

    # -- agents ------------------------------------------------------------------------------------------
    @app.post(f"{API}/nodes/register", dependencies=[Depends(auth)])
    def register(info: NodeInfo, node_id: str | None = None) -> Node:
        return sched.register_node(info, node_id)

    @app.get(f"{API}/nodes", dependencies=[Depends(auth)])
    def list_nodes() -> list[Node]:
        return store.list_nodes()

    @app.post(f"{API}/nodes/{{node_id}}/poll", dependencies=[Depends(auth)])
    async def poll(node_id: str, body: PollRequest) -> PollResponse:
        key = f"node:{node_id}"
        ticket = notifier.ticket(key)
        resp = await run_in_threadpool(sched.poll_once, node_id, body.running)
        if resp.start or resp.stop or body.wait == 0:
            return resp
        await notifier.wait(key, ticket, min(body.wait, settings.poll_wait))
        return await run_in_threadpool(sched.poll_once, node_id, body.running)

    @app.post(f"{API}/runs/{{run_id}}/status", dependencies=[Depends(auth)])
    def report(run_id: str, body: StatusReport, node_id: str | None = None) -> Run:
        return sched.report(run_id, body, node_id)

    @app.post(f"{API}/runs/{{run_id}}/logs", dependencies=[Depends(auth)],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": LogBatch.model_json_schema()}}}})
    async def append_logs(run_id: str, request: Request) -> JSONResponse:
        # Parsed by pydantic straight from the JSON bytes: a batch holds thousands of lines.
        try:
            body = LogBatch.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_input=False)) from None
        return await run_in_threadpool(_append, run_id, body)

    def _append(run_id: str, body: LogBatch) -> JSONResponse:
        sched.get_run(run_id)
        try:
            nxt = store.append_logs(run_id, body.rank, body.first_seq, body.lines)
        except SeqGap as gap:
            return JSONResponse({"detail": f"log lines missing before seq {body.first_seq}",
                                 "next_seq": gap.expected}, status_code=409)
        notifier.notify(f"run:{run_id}")
        return JSONResponse({"next_seq": nxt})

    @app.get(f"{API}/runs/{{run_id}}/logs/next_seq", dependencies=[Depends(auth)])
    def next_seq(run_id: str, rank: int = 0) -> dict[str, int]:
        sched.get_run(run_id)
        return {"next_seq": store.next_seq(run_id, rank)}

    return app
