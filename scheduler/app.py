"""The scheduler's HTTP app: its state (scheduler, blobs, gateway), background loops, error mapping and
middleware. The routes live in scheduler/routes/, one router per noun."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from . import access
from .blobs import BlobStore
from .contract import __version__
from .contract.errors import ApiError, status_of
from .contract.models import Principal
from .contract.series import FLUSH_S
from .gateway import Endpoints, Gateway
from .middleware import Guard, Intercept
from .routes import blobs as blob_routes
from .routes import clusters, keys, logs, metrics, nodes, queue, runs, storage, sweeps, system, teams, ui
from .routes import endpoints as endpoint_routes
from .routes.deps import API, Ctx
from .routes.inference import PREFIX, Inference
from .service import Scheduler
from .storage import NamedStorage
from .store import Store
from .webhooks import Webhooks

log = logging.getLogger("fedml.scheduler")
# A request is matched against the routers in this order, one by one: agents' polls and reports (nodes) and log
# batches (logs) are most of the requests, so they come first (a poll matched 8th of 14 spent ~20 % of its time
# being routed); within nodes, polls and reports come first. No route matches another's paths
# (tests/test_routes.py), so the order changes nothing else.
ROUTERS = (nodes, logs, runs, system, blob_routes, storage, sweeps, clusters, endpoint_routes, keys, queue, metrics, teams,
           ui)

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
    webhook_allow: list[Any] = field(default_factory=list)  # networks webhooks may reach besides public ones
    # Seconds before a webhook's first retry (doubling): tests make it short.
    webhook_backoff: float = field(default_factory=lambda: float(os.environ.get("FEDML_WEBHOOK_BACKOFF", "1")))
    # Seconds GPU series points wait in memory before they are written (contract/series.py): tests make it short.
    series_flush: float = field(default_factory=lambda: float(os.environ.get("FEDML_SERIES_FLUSH_S", str(FLUSH_S))))


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
    blob_store = BlobStore(settings.blob_dir, max_bytes=settings.max_workspace_mb * 1024 * 1024,
                      max_unpacked_bytes=4 * settings.max_workspace_mb * 1024 * 1024)

    def blob_usable(sha: str, who: Principal) -> bool:  # a workspace a run may name: access.py decides
        return access.may_read_blob(who, owned_by=lambda owner: blob_store.owned_by(sha, owner),
                                    placed_here=lambda _node: False) and blob_store.has(sha)

    named = NamedStorage(settings.blob_dir)
    sched = Scheduler(store, notifier, blob_exists=blob_usable, storage=named.get,
                      heartbeat_interval=settings.heartbeat_interval)
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

    async def every(seconds: float, work: Callable[[], object], what: str) -> None:
        """Run `work` in the thread pool every `seconds`; a full store marks the scheduler degraded."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await run_in_threadpool(work)
            except Exception as exc:
                if (why := out_of_space(exc)) is not None:
                    health.mark(why)
                else:
                    log.exception("%s failed", what)

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

    eps = Endpoints(sched)
    eps.listen = settings.listen
    gateway = Gateway(eps)

    async def autoscale_loop() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                for name, old, new in await run_in_threadpool(eps.autoscale_pass):
                    log.info("endpoint %s: autoscaled %d -> %d replicas", name, old, new)
            except Exception:
                log.exception("autoscale pass failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(schedule_loop()), asyncio.create_task(autoscale_loop()),
                 asyncio.create_task(health_loop()),
                 asyncio.create_task(every(max(0.2, settings.heartbeat_interval / 2), sched.check_heartbeats,
                                           "heartbeat check")),
                 # GPU series points wait in memory at most this long (contract/series.py), then are written at once
                 asyncio.create_task(every(settings.series_flush, sched.flush_series, "writing GPU series")),
                 # fair share's usage, counted over the runs outside the passes (service/teams.py)
                 asyncio.create_task(every(sched.FAIR_REFRESH_S, sched.refresh_fair_usage, "counting fair-share usage"))]
        yield
        with contextlib.suppress(Exception):  # (a clean stop keeps the last minute of GPU series too)
            await run_in_threadpool(sched.flush_series)
        await gateway.close()
        hooks.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    hooks = Webhooks(settings.blob_dir / "webhook.key", sched.record_delivery, allow=settings.webhook_allow,
                     backoff=settings.webhook_backoff)
    sched.on_event = hooks.enqueue
    app = FastAPI(title="fedml launch scheduler", version=__version__, lifespan=lifespan)
    c = Ctx(store=store, settings=settings, sched=sched, notifier=notifier, blobs=blob_store, storage=named,
            endpoints=eps, gateway=gateway, health=health, webhooks=hooks)
    app.state.ctx = c
    app.state.scheduler = sched
    app.state.store = store

    @app.exception_handler(ApiError)  # the one place a refusal becomes an HTTP status (contract/errors.py)
    async def _refused(_: Request, exc: ApiError) -> JSONResponse:
        status = status_of(exc)
        return JSONResponse({"detail": str(exc)}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    async def _not_text(request: Request, exc: Exception) -> JSONResponse:
        # JSON's "\ud800" escapes decode to lone surrogates, which no store (nor pydantic) can encode: whatever
        # field held one, the request is refused before anything was written (the write raised this).
        if isinstance(exc, UnicodeEncodeError) or "surrogates not allowed" in str(exc):
            return JSONResponse({"detail": "the request holds a lone surrogate (a \\ud800-\\udfff escape), which is "
                                           "not text"}, status_code=422)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the scheduler's log"},
                            status_code=500)

    from pydantic_core import PydanticSerializationError

    app.add_exception_handler(UnicodeEncodeError, _not_text)
    app.add_exception_handler(PydanticSerializationError, _not_text)

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

    app.add_middleware(nodes.FastPoll, ctx=c, handlers=app.exception_handlers)  # (added first: behind the Guard)
    app.add_middleware(Guard, identify=c.identify, identify_cached=c.identify_cached, caps=[
        (re.compile(rf"^{API}/blobs/[^/]+$"), settings.max_workspace_mb * 1024 * 1024,
         f"archive is larger than the limit of {settings.max_workspace_mb} MiB; add large files to .gitignore or "
         f"raise --max-workspace-mb"),
        (re.compile(rf"^{API}/runs/[^/]+/artifacts$"), settings.max_artifact_mb * 1024 * 1024, ""),
        (re.compile(rf"^{API}/runs/[^/]+/logs$"), settings.max_log_batch_mb * 1024 * 1024, ""),
        (re.compile(rf"^{API}/runs/batch$"), 16 * settings.max_request_kb * 1024, ""),  # up to 1,000 job documents
    ], default_cap=settings.max_request_kb * 1024)
    app.add_middleware(Intercept, prefix=PREFIX, handler=Inference(c))
    for routes in ROUTERS:
        app.include_router(routes.router)
    return app
