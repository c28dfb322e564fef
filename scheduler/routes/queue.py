"""The queue: pending runs in the order passes consider them, each with why it waits, who is ahead of it and when
it may start (scheduler/service/queue.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from ..contract.models import Principal
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=API)


@router.get("/queue")
async def get_queue(limit: int = Query(default=100, ge=1, le=1000), mine: bool = False,
                    run: str | None = Query(default=None, max_length=64, description="only this run's standing"),
                    team: str | None = Query(default=None, max_length=40, description="only this team's runs"),
                    who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    """A user sees their own pending runs (those ahead of theirs counted by owner and GPUs); an admin sees all
    (`mine`: only the admin's own)."""
    return await run_in_threadpool(c.sched.queue, who, limit=limit, mine=mine, run=run, team=team)
