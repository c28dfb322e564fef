"""The web dashboard (docs/dashboard.md): static pages served by the scheduler (scheduler/ui/: no build step,
nothing from a CDN) that use the same HTTP API as the CLI, plus a push stream of what changed.

Sign-in: POST /ui/session with an API key makes a session, a key of its own that expires (SESSION_TTL) and is
revoked at sign-out, held in an HttpOnly, SameSite=Strict cookie that page scripts cannot read. The Guard
(middleware.py) takes that cookie for /api/ requests and requires the session's CSRF token (auth.session_csrf) in
X-CSRF-Token on every action. A session sees exactly what its key sees through the API.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import access
from .. import auth as keys
from ..auth import SESSION_COOKIE, session_csrf, session_of
from ..contract.errors import Forbidden
from ..contract.models import Principal
from .deps import API, Ctx, auth, ctx

router = APIRouter(include_in_schema=False)
UI = Path(__file__).resolve().parent.parent / "ui"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
SESSION_TTL = 12 * 3600.0
STREAM_S = 600.0  # an event stream's longest life (events())
# Each event makes its page read the API (~0.5 ms of scheduler CPU): events of the cluster as a whole are spaced so
# that all open dashboards together make at most this many reads a second (1 s apart up to 50 dashboards, 2 s for
# 100): the scheduler's cost of dashboards stays bounded however many are open.
PAGE_READS_PER_S = 50.0
# Only our own scripts, styles and API: an injected <script> or inline handler does not run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "cache-control": "no-cache"}


@router.get("/")
def index() -> FileResponse:
    return FileResponse(UI / "index.html", media_type="text/html", headers=HEADERS)


class SignIn(BaseModel):
    api_key: str = Field(min_length=1, max_length=200)


def _who(c: Ctx, secret: str) -> Principal | None:
    who = keys.verify(c.store, secret) if secret else None
    return who if who is not None and access.is_person(who) else None


def _session(who: Principal, secret: str) -> dict[str, Any]:
    return {"owner": who.owner, "admin": who.admin, "csrf": session_csrf(secret), "expires_in": SESSION_TTL}


LINK = "dashboard sign-in link"  # the name of a one-time sign-in key (`fedml dashboard`)
LINK_TTL = 300.0


@router.post(f"{API}/ui/link")
def sign_in_link(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    """A one-time code that signs the caller in (`fedml dashboard` puts it in the address it opens): a key of the
    caller's that lasts LINK_TTL seconds and is revoked once used."""
    if not access.is_person(who):
        raise Forbidden("only an admin or user key signs in to the dashboard")
    _, code = keys.issue(c.store, name=LINK, scope=who.scope, owner=who.owner, ttl=LINK_TTL, parent=who.key_id,
                         team=who.team)
    return {"code": code, "expires_in": LINK_TTL}


@router.post("/ui/session")
def sign_in(body: SignIn, request: Request, c: Ctx = Depends(ctx)) -> JSONResponse:
    """An admin or user key in (or a one-time code from `fedml dashboard`), a session cookie out (node keys and
    join tokens sign nothing in)."""
    given = body.api_key.strip()
    who = _who(c, given)
    if who is None:
        return JSONResponse({"detail": "not a valid admin or user API key"}, status_code=401)
    used = keys.lookup(c.store, given)
    if used is not None and used.name == LINK:  # one time only
        keys.revoke(c.store, used, why="used to sign in")
    _, secret = keys.issue(c.store, name=f"dashboard session of {who.owner}", scope=who.scope, owner=who.owner,
                           ttl=SESSION_TTL, parent=(used.parent or used.id) if used is not None else None,
                           team=who.team)
    out = JSONResponse(_session(who, secret))
    out.set_cookie(SESSION_COOKIE, secret, max_age=int(SESSION_TTL), httponly=True, samesite="strict", path="/",
                   secure=request.url.scheme == "https")
    return out


@router.get("/ui/session")
def current(request: Request, c: Ctx = Depends(ctx)) -> JSONResponse:
    secret = session_of(request.headers.get("cookie", ""))
    who = _who(c, secret)
    if who is None:
        return JSONResponse({"detail": "not signed in"}, status_code=401)
    return JSONResponse(_session(who, secret))


@router.delete("/ui/session")
def sign_out(request: Request, c: Ctx = Depends(ctx)) -> JSONResponse:
    """Revoke the session's key (needs its CSRF token, as every action does) and drop the cookie."""
    secret = session_of(request.headers.get("cookie", ""))
    key = keys.lookup(c.store, secret) if secret else None
    if key is None or not hmac.compare_digest(request.headers.get("x-csrf-token", ""), session_csrf(secret)):
        return JSONResponse({"detail": "not signed in, or a wrong X-CSRF-Token"}, status_code=403)
    if key.revoked_at is None:
        keys.revoke(c.store, key, why="signed out")
    out = JSONResponse({"signed_out": True})
    out.delete_cookie(SESSION_COOKIE, path="/")
    return out


@router.get(f"{API}/events")
async def events(request: Request, run: str | None = Query(default=None, max_length=64),
                 who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> StreamingResponse:
    """Server-sent events for the pages open: `runs` when runs were created, placed or ended, `nodes` when
    nodes changed, `endpoints` when replicas or scales did, `run` when the given run changed. Each names what
    moved, not what it is: a page reads the API for that (so it shows only what its key may see). Bursts are
    coalesced: at most one event a second (fewer with many dashboards open: PAGE_READS_PER_S), four a second for
    the run's own state."""
    keys_watched = {"schedule": "runs", "nodes": "nodes", "endpoints": "endpoints",
                    **({f"run:{run}": "run"} if run else {})}
    seen = (await run_in_threadpool(c.sched.get_run, run, who)).updated_at if run else 0.0  # 404: not theirs

    async def stream() -> AsyncIterator[bytes]:
        c.event_streams += 1
        try:
            async for part in watch():
                yield part
        finally:
            c.event_streams -= 1

    async def watch() -> AsyncIterator[bytes]:
        nonlocal seen
        tickets = {k: c.notifier.ticket(k) for k in keys_watched}
        yield b"retry: 2000\n\n"
        # A stream lasts STREAM_S at most: the browser reconnects (retry), and the Guard checks the session again
        # (a revoked one then stops getting even these bare names).
        deadline = time.monotonic() + STREAM_S
        while time.monotonic() < deadline and not await request.is_disconnected():
            waits = [asyncio.ensure_future(c.notifier.wait(k, t, 15.0)) for k, t in tickets.items()]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            moved = {k for k, t in tickets.items() if c.notifier.ticket(k) != t}
            tickets = {k: c.notifier.ticket(k) for k in keys_watched}
            if run and f"run:{run}" in moved:  # also moved by its log lines: say "run" only when its state did
                got = await run_in_threadpool(c.store.get_run, run)
                if got is None or got.updated_at == seen:
                    moved.discard(f"run:{run}")
                else:
                    seen = got.updated_at
            if not moved:
                yield b": keep-alive\n\n"
                continue
            for k in sorted(moved):
                yield f"event: {keys_watched[k]}\ndata: {json.dumps({'what': keys_watched[k]})}\n\n".encode()
            # Coalesce: a busy cluster changes runs many times a second, and each event makes the page read.
            await asyncio.sleep(0.25 if run and f"run:{run}" in moved else
                                max(1.0, c.event_streams / PAGE_READS_PER_S))

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


@router.get("/ui/{asset}")  # (last: /ui/session above is not an asset)
def asset(asset: str) -> Response:
    if asset not in ASSETS:
        return Response(status_code=404)
    return FileResponse(UI / asset, media_type=ASSETS[asset], headers=HEADERS)
