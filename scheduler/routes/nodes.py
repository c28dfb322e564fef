"""Nodes: joining, listing, draining, removing; and the agent's side of the protocol (long poll, reports)."""

from __future__ import annotations

import inspect
import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .. import access
from ..contract.models import (
    Node,
    NodeInfo,
    NodeView,
    PollRequest,
    PollResponse,
    Principal,
    Registered,
    Run,
    StatusReport,
)
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=API)


# The agents' routes first: every heartbeat and report is matched against the routes above it, and they are
# most of the traffic (no route here matches another's paths: tests/test_routes.py).
@router.post("/nodes/{node_id}/poll")
async def poll(node_id: str, body: PollRequest, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> PollResponse:
    """(Answered by FastPoll below, in front of this route, for every body that parses: kept for the API's schema
    and for the bodies that do not.)"""
    return await answer_poll(c, node_id, body, who)


async def answer_poll(c: Ctx, node_id: str, body: PollRequest, who: Principal) -> PollResponse:
    key = f"node:{node_id}"
    ticket = c.notifier.ticket(key)
    # On the event loop where the poll needs no write and the store can be read at once, or awaited there
    # (poll_soon); in a thread otherwise.
    resp = await c.sched.poll_soon(node_id, body.running, who, body.gpus) or \
        await run_in_threadpool(c.sched.poll_once, node_id, body.running, who, body.gpus)
    if resp.start or resp.stop or body.wait == 0:
        return resp
    # Held at most half an interval: each answer renews the node's lease (2.5 intervals at most).
    await c.notifier.wait(key, ticket, min(body.wait, c.settings.heartbeat_interval / 2))
    return await c.sched.poll_soon(node_id, body.running, who) or \
        await run_in_threadpool(c.sched.poll_once, node_id, body.running, who)


POLL_PATH = re.compile(rf"^{API}/nodes/([^/]+)/poll$")


class FastPoll:
    """ASGI middleware behind the Guard (the key checked, the body capped): an agent's poll answered without
    FastAPI's routing, dependencies and response validation, which were most of a poll's CPU (every agent polls
    every interval). The same answer_poll as the route; an error goes to the app's own exception handlers, so it
    reads as the route's would. A body that does not parse is handed to the route, replayed, for FastAPI's 422."""

    def __init__(self, app: Any, ctx: Ctx, handlers: dict[Any, Any]) -> None:
        self.app, self.c, self.handlers = app, ctx, handlers

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        m = POLL_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        who = scope.get("fedml.principal")
        if m is None or who is None:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        data = b"".join(chunks)
        try:
            body = PollRequest.model_validate_json(data)
        except ValidationError:
            await self.app(scope, _replay(data), send)
            return
        try:
            resp = await answer_poll(self.c, m.group(1), body, who)
        except Exception as exc:
            handler = next((h for k in type(exc).__mro__ if (h := self.handlers.get(k)) is not None), None)
            if handler is None:
                raise
            answer = handler(Request(scope, receive), exc)
            answer = await answer if inspect.isawaitable(answer) else answer
            await answer(scope, receive, send)
            return
        out = resp.__pydantic_serializer__.to_json(resp)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(out)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


def _replay(data: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return receive


@router.post("/runs/{run_id}/status")
def report(run_id: str, body: StatusReport, node_id: str, who: Principal = Depends(auth),
           c: Ctx = Depends(ctx)) -> Run:
    return c.sched.report(run_id, body, node_id, who)


@router.post("/nodes/register")
def register(info: NodeInfo, request: Request, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Registered:
    """An agent joins (admin key or join token: a shared node; user key: a private one; gets a node key back)
    or comes back (with its node key)."""
    return c.sched.register_node(info, who, peer=request.client.host if request.client else None)


@router.get("/nodes")
def list_nodes(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> list[NodeView]:
    access.require_not_node(who, "list nodes")
    return c.sched.node_views()


@router.get("/nodes/{ref}/gpus")
def node_gpus(ref: str, since: float = Query(3600.0, ge=0, le=7 * 24 * 3600, description="seconds back"),
              who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    """Each GPU of the node over the last `since` seconds: every 5 s over the last hour, minute means before."""
    return c.sched.node_gpu_series(ref, time.time() - since, who)


@router.post("/nodes/{ref}/drain")
def drain(ref: str, undo: bool = False, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Node:
    return c.sched.set_draining(ref, not undo, who)


@router.delete("/nodes/{ref}")
def remove_node(ref: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Node:
    return c.sched.remove_node(ref, who)
