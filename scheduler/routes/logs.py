"""Run logs: agents append batches (sequence-numbered, resent until acknowledged); anyone who may see the run
reads them as NDJSON, following until it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..contract.errors import Invalid
from ..contract.models import LogBatch, Principal
from ..store import SeqGap
from .deps import API, MAX_ID, MAX_SEQ, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/runs")


@router.get("/{run_id}/logs")
async def read_logs(run_id: str, after: int = Query(default=-1, ge=-1, le=MAX_SEQ),
                    tail: int | None = Query(default=None, ge=0, le=MAX_SEQ), follow: bool = False,
                    rank: int | None = Query(default=None, ge=0),
                    attempt: int | None = Query(default=None, ge=1, le=1_000_000),
                    format: Literal["ndjson", "text"] = "ndjson",
                    limit: int | None = Query(default=None, ge=1, le=5000),
                    who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> StreamingResponse:
    """NDJSON, one LogRow object per line and an end record; or, with format=text, the records for display
    (Store.read_logs_text: "pos TAB rank TAB o|e|f TAB line") and an "end TAB {json}" line; only one `rank`'s or
    one `attempt`'s lines when given. With `limit`: a window of at most that many lines after `after` and no end
    record (the dashboard's log view reads so)."""
    run = await run_in_threadpool(c.sched.get_run, run_id, who)
    if rank is not None and rank >= run.num_nodes:
        raise Invalid(f"run {run_id} has no rank {rank} (its ranks are 0..{run.num_nodes - 1})")
    if attempt is not None and tail is not None:
        raise Invalid("tail: not with attempt (read an attempt's lines from its start)")
    if tail is not None:  # the last N lines of that rank, not the last N lines filtered
        after = max(after, await run_in_threadpool(c.store.tail_after, run_id, tail, rank))
    read = partial(c.store.read_logs_text if format == "text" else c.store.read_logs_ndjson, attempt=attempt)
    if limit is not None:
        _, window = await run_in_threadpool(read, run_id, after, limit, rank)
        return Response(window, media_type="text/plain; charset=utf-8" if format == "text" else "application/x-ndjson")
    if format == "text":
        return StreamingResponse(_stream(c, run_id, after, follow, rank, read, b"end\t"),
                                 media_type="text/plain; charset=utf-8")
    return StreamingResponse(_stream(c, run_id, after, follow, rank, read, b""), media_type="application/x-ndjson")


async def _stream(c: Ctx, run_id: str, after: int, follow: bool, rank: int | None,
                  read: Callable[..., tuple[int, bytes]], end_mark: bytes) -> AsyncIterator[bytes]:
    # NDJSON: one object per log line, then {"end": true, ...} once the run is over (or at once without
    # follow). Lines come before the end marker because agents ship every line before they report the final
    # status.
    key = f"run:{run_id}"
    seen_end = False
    while True:
        ticket = c.notifier.ticket(key)
        after, chunk = await run_in_threadpool(read, run_id, after, 5000, rank)
        if chunk:
            yield chunk
            continue
        if seen_end:
            run = await run_in_threadpool(c.store.get_run, run_id)
            end = {"end": True, "status": run.status.value, "exit_code": run.exit_code,
                   "reason": run.reason, "next": after + 1}
            yield end_mark + (json.dumps(end) + "\n").encode()
            return
        run = await run_in_threadpool(c.store.get_run, run_id)
        if run.terminal or not follow:
            seen_end = True  # one more read catches lines stored before the status changed
            continue
        await c.notifier.wait(key, ticket, 5.0)


@router.post("/{run_id}/logs", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": LogBatch.model_json_schema()}}}})
async def append_logs(run_id: str, request: Request, who: Principal = Depends(auth),
                      c: Ctx = Depends(ctx)) -> JSONResponse:
    # Parsed by pydantic straight from the JSON bytes: a batch holds thousands of lines.
    try:
        body = LogBatch.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_input=False, include_context=False)) from None
    if not (0 <= body.rank <= MAX_ID and 0 <= body.attempt <= MAX_ID and body.first_seq + body.count() <= MAX_SEQ):
        raise Invalid("rank, attempt or first_seq out of range")
    return await run_in_threadpool(_append, c, run_id, body, who)


def _append(c: Ctx, run_id: str, body: LogBatch, who: Principal) -> JSONResponse:
    c.sched.check_log_writer(run_id, who, body.attempt, logs=True)
    try:
        nxt = c.store.append_log_batch(run_id, body)
    except SeqGap as gap:
        return JSONResponse({"detail": f"log lines missing before seq {body.first_seq}",
                             "next_seq": gap.expected}, status_code=409)
    c.sched.tally.add("log_lines", body.count())  # (received: a resent batch counts again)
    c.notifier.notify(f"run:{run_id}")
    return JSONResponse({"next_seq": nxt})


@router.get("/{run_id}/logs/next_seq")
def next_seq(run_id: str, attempt: int = Query(default=1, ge=0, le=MAX_ID),
             rank: int = Query(default=0, ge=0, le=MAX_ID), who: Principal = Depends(auth),
             c: Ctx = Depends(ctx)) -> dict[str, int]:
    c.sched.check_log_writer(run_id, who, attempt, logs=True)
    return {"next_seq": c.store.next_seq(run_id, attempt, rank)}
