"""HTTP API (FastAPI). Routes stay thin: they authenticate, call the Scheduler, and shape answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from . import access
from . import auth as keys
from .blobs import BlobStore
from .contract import __version__
from .contract.errors import ApiError, BadRequest, Conflict, Invalid, NotFound, TooLarge, Unauthenticated, status_of
from .contract.models import (
    ApiKey,
    Artifact,
    JoinTokenCreate,
    LogBatch,
    Node,
    NodeInfo,
    NodeView,
    PollRequest,
    PollResponse,
    Principal,
    Registered,
    ReplicaReport,
    Run,
    RunCreate,
    RunStatus,
    ScaleRequest,
    StatusReport,
)
from .gateway import Endpoints, Gateway
from .service import Scheduler
from .store import SeqGap, Store

log = logging.getLogger("fedml.scheduler")

API = "/api/v1"
# Bounds for numbers the stores keep as integers (SQLite: 64-bit; Redis Lua: exact up to 2**53).
_MAX_ID = 2**31 - 1
_MAX_SEQ = 2**53 - 1


@dataclass
class Settings:
    blob_dir: Path
    max_workspace_mb: int = 512
    max_artifact_mb: int = 2048
    heartbeat_interval: float = 10.0
    max_request_kb: int = 1024  # any other request body (a job document, a report): 1 MiB
    max_log_batch_mb: int = 32
    max_inference_mb: int = 64
    listen: tuple[str, int] | None = None  # our own address: the gateway never proxies to it


def out_of_space(exc: BaseException) -> str | None:
    """Why, if `exc` says the store or the disk under it is full (None: another failure)."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"the disk is full ({exc.strerror or exc})"
    if isinstance(exc, sqlite3.Error) and ("full" in str(exc) or getattr(exc, "sqlite_errorcode", 0) == 13):
        return f"the store's disk is full (SQLite: {exc})"
    if type(exc).__module__.startswith("redis") and str(exc).startswith("OOM"):
        return f"Redis is out of memory ({str(exc)[:200]})"
    return None


class Health:
    """Degraded while the store cannot write (a full disk): writes answer 503 with the reason and /healthz says
    so, until a probe write succeeds again. Reads keep working."""

    def __init__(self) -> None:
        self.degraded: str | None = None
        self.since = 0.0

    def mark(self, why: str) -> None:
        if self.degraded is None:
            log.error("store degraded: %s; writes are refused with 503 until it can write again", why)
            self.since = time.time()
        self.degraded = why

    def clear(self) -> None:
        if self.degraded is not None:
            log.warning("store writable again after %.0f s: %s", time.time() - self.since, self.degraded)
        self.degraded = None


def _redis_errors() -> tuple[type[Exception], ...]:
    import sys

    if "redis" not in sys.modules:  # a SQLite scheduler never imports redis
        return ()
    import redis

    return (redis.exceptions.ResponseError,)


def create_app(store: Store, settings: Settings) -> FastAPI:
    notifier = store.notifier()  # relayed between replicas when the store is shared (Redis)
    blobs = BlobStore(settings.blob_dir, max_bytes=settings.max_workspace_mb * 1024 * 1024,
                      max_unpacked_bytes=4 * settings.max_workspace_mb * 1024 * 1024)
    def blob_usable(sha: str, who: Principal) -> bool:
        return blobs.has(sha) if who.admin else blobs.owned_by(sha, who.owner)

    sched = Scheduler(store, notifier, blob_exists=blob_usable, heartbeat_interval=settings.heartbeat_interval)
    health = Health()

    async def schedule_loop() -> None:
        while True:
            ticket = notifier.ticket("schedule")
            try:
                await run_in_threadpool(sched.schedule_pass)
            except Exception as exc:  # keep placing whatever one bad pass did
                if (why := out_of_space(exc)) is not None:
                    health.mark(why)
                else:
                    log.exception("schedule pass failed")
            await notifier.wait("schedule", ticket, 2.0)

    async def heartbeat_loop() -> None:
        while True:
            await asyncio.sleep(max(0.2, settings.heartbeat_interval / 2))
            try:
                await run_in_threadpool(sched.check_heartbeats)
            except Exception as exc:
                if (why := out_of_space(exc)) is not None:
                    health.mark(why)
                else:
                    log.exception("heartbeat check failed")

    async def health_loop() -> None:
        # While degraded, try one small durable write a second; when it lands, writes are taken again and the
        # scheduler looks at its queue (reports the agents retried meanwhile settle their runs).
        while True:
            await asyncio.sleep(1.0)
            if health.degraded is None:
                continue
            try:
                await run_in_threadpool(store.probe_write)
            except Exception as exc:
                if out_of_space(exc) is None:
                    log.exception("store probe failed")
                continue
            health.clear()
            sched.kick()

    endpoints = Endpoints(sched)
    endpoints.listen = settings.listen
    gateway = Gateway(endpoints)

    async def autoscale_loop() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                for name, old, new in await run_in_threadpool(endpoints.autoscale_pass):
                    log.info("endpoint %s: autoscaled %d -> %d replicas", name, old, new)
            except Exception:
                log.exception("autoscale pass failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(schedule_loop()), asyncio.create_task(heartbeat_loop()),
                 asyncio.create_task(autoscale_loop()), asyncio.create_task(health_loop())]
        yield
        await gateway.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="fedml launch scheduler", version=__version__, lifespan=lifespan)
    app.state.scheduler = sched
    app.state.store = store

    @app.exception_handler(ApiError)  # the one place a refusal becomes an HTTP status (contract/errors.py)
    async def _refused(_: Request, exc: ApiError) -> JSONResponse:
        status = status_of(exc)
        return JSONResponse({"detail": str(exc)}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        why = out_of_space(exc)
        if why is None:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the scheduler's log"},
                                status_code=500)
        health.mark(why)
        return JSONResponse({"detail": f"{why}: nothing was changed; try again when space is freed"},
                            status_code=503, headers={"Retry-After": "5"})

    import sqlite3

    for kind in (OSError, sqlite3.Error, *_redis_errors()):
        app.add_exception_handler(kind, _storage)

    async def auth(request: Request) -> Principal:
        # _Guard verified the key before any of the body was read, and left the principal here. Async: reading it
        # must not cost a thread-pool hop on every request (the guard's look-up already took one).
        who = request.scope.get("fedml.principal")
        if who is None:
            status, detail, who = await run_in_threadpool(identify, request.headers.get("authorization", ""),
                                                          request.url.path)
            if who is None:
                raise HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
        return who

    async def admin(who: Principal = Depends(auth)) -> Principal:
        access.require_admin(who)
        return who

    def identify(header: str, path: str) -> tuple[int, str, Principal | None]:
        """(status, why, principal): the bearer key of a request, checked before its body is read."""
        scheme, _, given = header.partition(" ")
        key = keys.lookup(store, given.strip()) if scheme.lower() == "bearer" else None
        if key is not None and key.scope == "node" and key.revoked_why == "node removed":
            return 410, "this node was removed from the scheduler by an admin; its agent must not join again", None
        if not keys.usable(key):
            return 401, "missing, wrong or revoked API key", None
        assert key is not None
        if key.scope == "join" and path != f"{API}/nodes/register":
            return 403, "a join token only registers nodes", None
        return 200, "", Principal(scope=key.scope, owner=key.owner, key_id=key.id)

    app.add_middleware(_Guard, identify=identify, caps=[
        (re.compile(rf"^{API}/blobs/[^/]+$"), settings.max_workspace_mb * 1024 * 1024,
         f"archive is larger than the limit of {settings.max_workspace_mb} MiB; add large files to .gitignore or "
         f"raise --max-workspace-mb"),
        (re.compile(rf"^{API}/runs/[^/]+/artifacts$"), settings.max_artifact_mb * 1024 * 1024, ""),
        (re.compile(rf"^{API}/runs/[^/]+/logs$"), settings.max_log_batch_mb * 1024 * 1024, ""),
    ], default_cap=settings.max_request_kb * 1024)

    @app.get("/healthz", response_model=None)
    def healthz() -> dict[str, object] | JSONResponse:
        if health.degraded is not None:
            return JSONResponse({"ok": False, "version": __version__, "degraded": health.degraded,
                                 "since": health.since}, status_code=503)
        return {"ok": True, "version": __version__}

    @app.get(f"{API}/info")
    def info(who: Principal = Depends(auth)) -> dict[str, object]:
        nodes = store.list_nodes()
        return {"version": __version__, "store": type(store).__name__, "nodes": len(nodes),
                "gpus": sum(len(n.gpus) for n in nodes), "you": {"scope": who.scope, "owner": who.owner},
                "heartbeat_interval": settings.heartbeat_interval}

    # -- workspace blobs ---------------------------------------------------------------------------------
    # A blob is visible to the principals that uploaded its bytes (and admins): to anyone else, HEAD and GET
    # answer 404 whether it exists or not, and an upload of the same bytes is accepted (it proves possession).
    def _blob_visible(sha: str, who: Principal) -> bool:
        blobs.path(sha)  # 400 for a malformed name
        return access.may_read_blob(
            who, owned_by=lambda owner: blobs.owned_by(sha, owner),
            placed_here=lambda node_id: any(r.workspace_sha == sha for r in store.list_runs(
                status=[RunStatus.STARTING, RunStatus.RUNNING], node_id=node_id))) and blobs.has(sha)

    @app.head(f"{API}/blobs/{{sha}}")
    def blob_head(sha: str, who: Principal = Depends(auth)) -> Response:
        return Response(status_code=200 if _blob_visible(sha, who) else 404)

    @app.put(f"{API}/blobs/{{sha}}", status_code=201)
    async def blob_put(sha: str, request: Request, who: Principal = Depends(auth)) -> dict[str, object]:
        access.require_not_node(who, "upload")
        size, stored = await blobs.put(sha, request.stream(), who.owner)
        return {"sha256": sha, "stored": stored, "size": size}

    @app.get(f"{API}/blobs/{{sha}}")
    def blob_get(sha: str, who: Principal = Depends(auth)) -> Response:
        from fastapi.responses import FileResponse

        if not _blob_visible(sha, who):
            raise NotFound(f"blob {sha[:12]} not found")
        return FileResponse(blobs.path(sha), media_type="application/gzip")

    # -- runs --------------------------------------------------------------------------------------------
    @app.post(f"{API}/runs", status_code=201)
    def create_run(body: RunCreate, who: Principal = Depends(auth)) -> Run:
        run = sched.create_run(body, who)
        if run.endpoint is not None:
            endpoints.changed()
        return run

    @app.get(f"{API}/runs")
    def list_runs(status: list[RunStatus] | None = Query(default=None),
                  limit: int = Query(default=1000, ge=1, le=100_000), who: Principal = Depends(auth)) -> list[Run]:
        runs = sched.list_runs(who, status, limit)
        counts = store.log_counts([r.id for r in runs])
        for r in runs:
            r.log_count = counts.get(r.id, 0)
        return _named(runs)

    @app.get(f"{API}/runs/{{run_id}}")
    def get_run(run_id: str, who: Principal = Depends(auth)) -> Run:
        return _named([sched.get_run(run_id, who)])[0]

    def _named(runs: list[Run]) -> list[Run]:
        """Users named their nodes: give each run the names of the nodes it ran on (one lookup per node)."""
        names: dict[str, str] = {}
        for r in runs:
            ids = {p.node_id for p in r.placements} | {p.node_id for a in r.attempts for p in a.placements} | \
                {s.node_id for s in r.scores}
            for nid in ids:
                if nid not in names:
                    node = store.get_node(nid)
                    names[nid] = node.name if node is not None else nid
            r.node_names = {nid: names[nid] for nid in ids}
        return runs

    @app.put(f"{API}/runs/{{run_id}}/artifacts", status_code=201)
    async def put_artifacts(run_id: str, request: Request, sha256: str, rank: int = Query(default=0, ge=0),
                            attempt: int = Query(default=1, ge=1), files: int = Query(default=0, ge=0),
                            who: Principal = Depends(auth)) -> Run:
        """An agent keeps what a rank left in FEDML_ARTIFACT_DIR (a tar.gz named by its sha256). The bytes are
        always sent, even when a blob of that hash exists: naming a hash must not attach another user's blob."""
        await run_in_threadpool(sched.check_log_writer, run_id, who, attempt)
        size, _ = await blobs.put(sha256, request.stream(), f"node:{who.owner}",
                                  max_bytes=settings.max_artifact_mb * 1024 * 1024)
        art = Artifact(rank=rank, attempt=attempt, sha256=sha256, size=size, files=files)
        return await run_in_threadpool(sched.add_artifact, run_id, art, who)

    @app.get(f"{API}/runs/{{run_id}}/artifacts/{{rank}}")
    def get_artifacts(run_id: str, rank: int, who: Principal = Depends(auth)) -> Response:
        from fastapi.responses import FileResponse

        run = sched.get_run(run_id, who)
        arts = sorted((a for a in run.artifacts if a.rank == rank), key=lambda a: a.attempt)
        if not arts:
            raise NotFound(f"run {run_id} kept no artifacts for rank {rank}")
        return FileResponse(blobs.path(arts[-1].sha256), media_type="application/gzip",
                            filename=f"{run_id}-rank{rank}-artifacts.tar.gz")

    @app.post(f"{API}/runs/{{run_id}}/stop")
    def stop_run(run_id: str, who: Principal = Depends(auth)) -> Run:
        run = sched.stop_run(run_id, who)
        if run.endpoint is not None:
            endpoints.changed()
        return run

    @app.get(f"{API}/runs/{{run_id}}/logs")
    async def read_logs(run_id: str, after: int = Query(default=-1, ge=-1),
                        tail: int | None = Query(default=None, ge=0), follow: bool = False,
                        rank: int | None = Query(default=None, ge=0),
                        who: Principal = Depends(auth)) -> StreamingResponse:
        run = await run_in_threadpool(sched.get_run, run_id, who)
        if rank is not None and rank >= run.num_nodes:
            raise Invalid(f"run {run_id} has no rank {rank} (its ranks are 0.."
                                     f"{run.num_nodes - 1})")
        if tail is not None:  # the last N lines of that rank, not the last N lines filtered
            after = max(after, await run_in_threadpool(store.tail_after, run_id, tail, rank))
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
                run = await run_in_threadpool(store.get_run, run_id)
                end = {"end": True, "status": run.status.value, "exit_code": run.exit_code,
                       "reason": run.reason, "next": after + 1}
                yield (json.dumps(end) + "\n").encode()
                return
            run = await run_in_threadpool(store.get_run, run_id)
            if run.terminal or not follow:
                seen_end = True  # one more read catches lines stored before the status changed
                continue
            await notifier.wait(key, ticket, 5.0)

    # -- nodes -------------------------------------------------------------------------------------------
    @app.post(f"{API}/nodes/register")
    def register(info: NodeInfo, request: Request, who: Principal = Depends(auth)) -> Registered:
        """An agent joins (admin key or join token: a shared node; user key: a private one; gets a node key
        back) or comes back (with its node key)."""
        return sched.register_node(info, who, peer=request.client.host if request.client else None)

    @app.get(f"{API}/nodes")
    def list_nodes(who: Principal = Depends(auth)) -> list[NodeView]:
        access.require_not_node(who, "list nodes")
        return sched.node_views()

    @app.post(f"{API}/nodes/{{ref}}/drain")
    def drain(ref: str, undo: bool = False, who: Principal = Depends(auth)) -> Node:
        return sched.set_draining(ref, not undo, who)

    @app.delete(f"{API}/nodes/{{ref}}")
    def remove_node(ref: str, who: Principal = Depends(auth)) -> Node:
        return sched.remove_node(ref, who)

    @app.post(f"{API}/nodes/{{node_id}}/poll")
    async def poll(node_id: str, body: PollRequest, who: Principal = Depends(auth)) -> PollResponse:
        key = f"node:{node_id}"
        ticket = notifier.ticket(key)
        resp = await run_in_threadpool(sched.poll_once, node_id, body.running, who)
        if resp.start or resp.stop or body.wait == 0:
            return resp
        # Held at most half an interval: each answer renews the node's lease (2.5 intervals at most).
        await notifier.wait(key, ticket, min(body.wait, settings.heartbeat_interval / 2))
        return await run_in_threadpool(sched.poll_once, node_id, body.running, who)

    @app.post(f"{API}/runs/{{run_id}}/status")
    def report(run_id: str, body: StatusReport, node_id: str, who: Principal = Depends(auth)) -> Run:
        return sched.report(run_id, body, node_id, who)

    # -- endpoints and the inference gateway -------------------------------------------------------------
    def _endpoint_view(run: Run) -> dict[str, object]:
        ep = run.endpoint
        assert ep is not None
        states = [r.model_dump() for r in ep.states] if ep.attempt == run.attempt else []
        load = endpoints.loads.get(run.id)
        return {"name": ep.name, "run_id": run.id, "status": run.status.value, "owner": run.owner,
                "replicas": ep.replicas, "min_replicas": ep.min_replicas, "max_replicas": ep.max_replicas,
                "autoscale": ep.autoscale, "ready": sum(1 for r in states if r["state"] == "ready"),
                "states": states, "node_id": run.node_id, "path": f"/inference/{ep.name}",
                "inflight": load.inflight if load else 0, "requests": load.total if load else 0,
                "created_at": run.created_at, "reason": run.reason}

    @app.get(f"{API}/endpoints")
    def list_endpoints(who: Principal = Depends(auth)) -> list[dict[str, object]]:
        return [_endpoint_view(r) for r in endpoints.list(who)]

    @app.get(f"{API}/endpoints/{{ref}}")
    def get_endpoint(ref: str, who: Principal = Depends(auth)) -> dict[str, object]:
        return _endpoint_view(endpoints.find(ref, who))

    @app.post(f"{API}/endpoints/{{ref}}/scale")
    def scale_endpoint(ref: str, body: ScaleRequest, who: Principal = Depends(auth)) -> dict[str, object]:
        return _endpoint_view(endpoints.scale(ref, who, body.replicas, body.min_replicas, body.max_replicas))

    @app.delete(f"{API}/endpoints/{{ref}}")
    def delete_endpoint(ref: str, who: Principal = Depends(auth)) -> dict[str, object]:
        run = sched.stop_run(endpoints.find(ref, who).id, who)
        endpoints.changed()
        return _endpoint_view(run)

    @app.put(f"{API}/runs/{{run_id}}/replicas")
    def report_replicas(run_id: str, body: ReplicaReport, node_id: str, who: Principal = Depends(auth)) -> dict:
        endpoints.report(run_id, body, node_id, who)
        return {"ok": True}

    # The gateway checks keys in the event loop with a 1 s cache (a revoked key stops working within 1 s):
    # a sync dependency would cost a thread-pool hop and a store read on every inference request.
    verified: dict[str, tuple[float, Principal | None]] = {}

    def gateway_auth(header: str) -> Principal:
        scheme, _, given = header.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        now = time.monotonic()
        hit = verified.get(given)
        if hit is None or now - hit[0] > 1.0:
            if len(verified) > 10_000:
                verified.clear()
            who = keys.verify(store, given)
            hit = verified[given] = (now, who if who is None or who.scope != "join" else None)  # tokens only join
        if hit[1] is None:
            raise Unauthenticated("missing, wrong or revoked API key")
        return hit[1]

    async def inference(scope: dict, receive: Any, send: Any) -> None:
        """POST (or any method) /inference/NAME[/PATH] as a bare ASGI handler: FastAPI's routing, dependency
        and middleware layers cost more than the proxying itself (see bench/gateway.py)."""
        name, _, rest = scope["path"][len("/inference/"):].partition("/")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        chunks = []
        try:
            # The key first, then the body, bounded: an anonymous caller cannot make us buffer anything.
            lower = dict((k.lower(), v) for k, v in headers)
            who = gateway_auth(lower.get("authorization", ""))
            cap = settings.max_inference_mb * 1024 * 1024
            too_large = TooLarge(f"request body is larger than the limit of {settings.max_inference_mb} MiB")
            declared = lower.get("content-length") or "0"
            if not declared.isdigit():
                raise BadRequest("bad Content-Length")
            if int(declared) > cap:
                raise too_large
            size = 0
            while True:
                msg = await receive()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
                if not msg.get("more_body"):
                    break
            status, out, content = await gateway.forward(name, f"/{rest}" if rest else "", scope["method"], headers,
                                                         scope.get("query_string", b"").decode("latin-1"),
                                                         b"".join(chunks), who)
        except (ApiError, HTTPException) as exc:
            detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
            code = exc.status_code if isinstance(exc, HTTPException) else status_of(exc)
            data = json.dumps({"detail": detail}).encode()
            extra = [(b"www-authenticate", b"Bearer")] if code == 401 else []
            await send({"type": "http.response.start", "status": code, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
            await send({"type": "http.response.body", "body": data})
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out]
        if isinstance(content, bytes):
            raw.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
            return
        await send({"type": "http.response.start", "status": status, "headers": raw})
        async for chunk in content:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    app.add_middleware(_Intercept, prefix="/inference/", handler=inference)

    # -- API keys ----------------------------------------------------------------------------------------
    @app.post(f"{API}/keys", status_code=201)
    def create_key(name: str = Query(min_length=1, max_length=100), scope: str = Query(default="user"),
                   who: Principal = Depends(admin)) -> dict[str, object]:
        if scope not in ("admin", "user"):
            raise Invalid("scope must be admin or user (node keys are issued at registration)")
        if any(k.name == name and k.revoked_at is None and k.scope != "node" for k in store.list_keys()):
            raise Conflict(f"a key named {name} exists already")
        key, secret = keys.issue(store, name=name, scope=scope, owner=name if scope == "user" else "admin")
        return {"key": _public(key), "secret": secret}

    @app.get(f"{API}/keys")
    def list_keys(who: Principal = Depends(admin)) -> list[dict[str, object]]:
        return [_public(k) for k in store.list_keys()]

    @app.delete(f"{API}/keys/{{ref}}")
    def revoke_key(ref: str, who: Principal = Depends(admin)) -> dict[str, object]:
        found = [k for k in store.list_keys() if ref in (k.id, k.name) and k.revoked_at is None]
        if not found:
            raise NotFound(f"no active key {ref}")
        if len(found) > 1:
            raise Conflict(f"{ref} names {len(found)} keys; use the key id")
        return _public(keys.revoke(store, found[0]))

    def _public(k: ApiKey) -> dict[str, object]:
        return k.model_dump(exclude={"hash"})

    @app.post(f"{API}/tokens", status_code=201)
    def create_token(body: JoinTokenCreate, who: Principal = Depends(admin)) -> dict[str, object]:
        """A node join token (`fedml scheduler token create --node`): shown once, stored hashed."""
        key, secret = keys.issue_join(store, creator=who.owner, ttl=body.ttl, uses=body.uses, labels=body.labels,
                                      name=body.name)
        return {"key": _public(key), "secret": secret}

    @app.post(f"{API}/runs/{{run_id}}/logs",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": LogBatch.model_json_schema()}}}})
    async def append_logs(run_id: str, request: Request, who: Principal = Depends(auth)) -> JSONResponse:
        # Parsed by pydantic straight from the JSON bytes: a batch holds thousands of lines.
        try:
            body = LogBatch.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_input=False)) from None
        if not (0 <= body.rank <= _MAX_ID and 0 <= body.attempt <= _MAX_ID and body.first_seq + len(body.lines) <= _MAX_SEQ):
            raise Invalid("rank, attempt or first_seq out of range")
        return await run_in_threadpool(_append, run_id, body, who)

    def _append(run_id: str, body: LogBatch, who: Principal) -> JSONResponse:
        sched.check_log_writer(run_id, who, body.attempt, logs=True)
        try:
            nxt = store.append_logs(run_id, body.attempt, body.rank, body.first_seq, body.lines)
        except SeqGap as gap:
            return JSONResponse({"detail": f"log lines missing before seq {body.first_seq}",
                                 "next_seq": gap.expected}, status_code=409)
        notifier.notify(f"run:{run_id}")
        return JSONResponse({"next_seq": nxt})

    @app.get(f"{API}/runs/{{run_id}}/logs/next_seq")
    def next_seq(run_id: str, attempt: int = Query(default=1, ge=0, le=_MAX_ID), rank: int = Query(default=0, ge=0, le=_MAX_ID),
                 who: Principal = Depends(auth)) -> dict[str, int]:
        sched.check_log_writer(run_id, who, attempt, logs=True)
        return {"next_seq": store.next_seq(run_id, attempt, rank)}

    return app


class _TooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware for /api/: the bearer key is checked before a byte of the body is read, and the body is
    capped per route (by Content-Length at once, and by counting as it streams). Everything else passes."""

    def __init__(self, app: Any, identify: Any, caps: list[tuple[re.Pattern[str], int, str]], default_cap: int) -> None:
        self.app, self.identify, self.caps, self.default_cap = app, identify, caps, default_cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API + "/"):
            await self.app(scope, receive, send)
            return
        authorization, length = "", ""
        for k, v in scope["headers"]:  # ASGI servers give header names lower-cased
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"content-length":
                length = v.decode("latin-1")
        status, detail, who = await run_in_threadpool(self.identify, authorization, scope["path"])
        if who is None:
            await _answer(send, status, detail)
            return
        scope["fedml.principal"] = who
        cap, why = next(((c, m) for pattern, c, m in self.caps if pattern.match(scope["path"])), (self.default_cap, ""))
        why = why or f"request body is larger than the limit of {_size(cap)} for {scope['path']}"
        if length and not length.isdigit():
            await _answer(send, 400, "bad Content-Length")
            return
        declared = int(length or 0)
        if declared > cap:
            await _answer(send, 413, why)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > cap:
                raise _TooLarge
            return msg

        async def watched(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await _answer(send, 413, why)


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


async def _answer(send: Any, status: int, detail: str) -> None:
    data = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _Intercept:
    """ASGI middleware: requests under `prefix` go straight to `handler`, everything else to the app."""

    def __init__(self, app: Any, prefix: str, handler: Any) -> None:
        self.app, self.prefix, self.handler = app, prefix, handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)
