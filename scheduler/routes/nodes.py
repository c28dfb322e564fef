"""Nodes: joining, listing, draining, removing; and the agent's side of the protocol (long poll, reports)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
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
