"""Runs: launch, list, read, stop, and what their ranks leave behind (artifacts)."""

from __future__ import annotations

import json
import re
import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from .. import access
from ..contract.errors import Invalid, NotFound
from ..contract.models import Artifact, Principal, Run, RunBatch, RunCreate, RunStatus
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/runs")
_RUNS = TypeAdapter(list[Run])


@router.post("", status_code=201, response_model=Run)
def create_run(body: RunCreate, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    # The run's JSON as pydantic writes it: a returned model is validated again and encoded field by field by
    # FastAPI, a tenth of a submission's cost.
    run = c.sched.create_run(body, who)
    if run.endpoint is not None:
        c.endpoints.changed()
    return Response(run.model_dump_json(), status_code=201, media_type="application/json")


@router.post("/batch", status_code=201, response_model=list[Run])
def create_runs(body: RunBatch, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    """Up to 1,000 runs validated together and written in one commit: a sweep costs one round trip and one
    fsync, not one each. An invalid run refuses the batch (its index is named) and nothing is written."""
    runs = c.sched.create_runs(body.runs, who)
    return Response(_RUNS.dump_json(runs), status_code=201, media_type="application/json")


LIST_FRESH_S = 1.0  # a list answer is reused while no run was written since and for at most this long
SCAN_MAX = 5000  # runs a filtered page (q) looks at before it answers with what it found and where to go on
CURSOR = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?),([A-Za-z0-9_.-]{1,64})$")


def _matches(run: Run, q: str) -> bool:
    """`q` in the run's id, name, owner, node names or labels (k=v), case-insensitive."""
    hay = [run.id, run.name, run.owner, *run.node_names.values(), *(f"{k}={v}" for k, v in run.job.labels.items())]
    return any(q in h.lower() for h in hay)


@router.get("", response_model=list[Run])
def list_runs(status: list[RunStatus] | None = Query(default=None),
              limit: int = Query(default=1000, ge=1, le=100_000),
              before: str | None = Query(default=None, max_length=80, description="created_at,id of the last run "
                                         "of the page before: the next page (X-Next-Before names it)"),
              q: str | None = Query(default=None, max_length=100, description="text in the id, name, owner, "
                                    "node names or labels"),
              node: str | None = Query(default=None, max_length=64, description="runs placed on this node"),
              mine: bool = Query(default=False, description="an admin's own runs only"),
              counts: bool = Query(default=False, description="add X-Run-Counts: how many runs the caller may see "
                                   "are in each state (JSON)"),
              who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    # Open dashboards all read the list each time runs change: the same question from many pages (the same
    # owner filter, states and limit) is answered once while no run was written since (the store's change
    # counter), and for a second at most (log counts move without it). 20 pages open cost the scheduler
    # 55 % of a core without this (bench/dashboard.py).
    owner = access.runs_listed_for(who) or (who.owner if mine else None)
    cursor = None
    if before is not None:
        if (m := CURSOR.match(before)) is None:
            raise Invalid("before: CREATED_AT,RUN_ID of a run (the X-Next-Before of the page before)")
        cursor = (float(m.group(1)), m.group(2))
    node_id = None
    if node is not None:
        found = next((n for n in c.sched.nodes() if node in (n.name, n.id)), None)
        if found is None:
            raise Invalid(f"node: no node {node} (`fedml node list`)")
        node_id = found.id
    key = (owner, tuple(sorted(s.value for s in status or [])), limit, cursor, q, node_id, counts)
    seq, now = c.store.runs_seq(), time.monotonic()
    hit = c.list_cache.get(key)
    if hit is not None and hit[0] == seq and now - hit[1] < LIST_FRESH_S:
        return Response(hit[2], media_type="application/json", headers=hit[3])
    needle = q.strip().lower() if q and q.strip() else None
    runs: list[Run] = []
    scanned, more = 0, False
    while True:  # a page; with `q`, pages of the store until `limit` match or SCAN_MAX were looked at
        page = c.sched.list_runs(who, status, limit if needle is None else min(1000, SCAN_MAX - scanned),
                                 before=cursor, node_id=node_id, owner=owner)
        if not page:
            break
        scanned += len(page)
        cursor = (page[-1].created_at, page[-1].id)
        got = c.named(page) if needle is not None else page
        runs += [r for r in got if needle is None or _matches(r, needle)]
        if needle is None:
            more = len(page) >= limit
            break
        if len(runs) >= limit or scanned >= SCAN_MAX:
            more = True
            if len(runs) > limit:
                runs = runs[:limit]
                cursor = (runs[-1].created_at, runs[-1].id)
            break
    lines = c.store.log_counts([r.id for r in runs])
    for r in runs:
        r.log_count = lines.get(r.id, 0)
    body = _RUNS.dump_json(c.named(runs))
    headers = {"x-next-before": f"{cursor[0]!r},{cursor[1]}"} if more and cursor is not None else {}
    if counts:  # (the dashboard's chips: with the page, one request per refresh rather than two)
        headers["x-run-counts"] = json.dumps(c.store.count_runs(access.runs_listed_for(who)), separators=(",", ":"))
    if len(c.list_cache) >= 256:  # (bounded: one entry per owner, states and limit asked lately)
        c.list_cache.clear()
    c.list_cache[key] = (seq, now, body, headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/{run_id}")
def get_run(run_id: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Run:
    return c.named([c.sched.get_run(run_id, who)])[0]


@router.post("/{run_id}/stop")
def stop_run(run_id: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Run:
    run = c.sched.stop_run(run_id, who)
    if run.endpoint is not None:
        c.endpoints.changed()
    return run


@router.post("/{run_id}/retry", status_code=201)
def retry_run(run_id: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Run:
    """A new run of an ended run's job (same workspace, environment and owner)."""
    return c.sched.retry_run(run_id, who)


@router.get("/{run_id}/metrics")
def run_metrics(run_id: str, name: list[str] | None = Query(default=None, max_length=100),
                who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, object]:
    """The metrics the run's job reported (`fedml.log`, or `FEDML_METRIC {...}` lines), per name, rank and
    attempt: [step, value, time] points, thinned to at most 1,000 a series (`name`: only those)."""
    return c.sched.run_metrics(run_id, who, set(name) if name else None)


@router.get("/{run_id}/env")
def run_env(run_id: str, rank: int = Query(default=0, ge=0, le=100_000), who: Principal = Depends(auth),
            c: Ctx = Depends(ctx)) -> dict[str, object]:
    """The variables the scheduler and the job file give that rank, secret-looking values hidden."""
    return {"rank": rank, "env": c.sched.run_env(run_id, who, rank),
            "note": "and the agent's own environment: PATH, locale, CUDA and NCCL settings"}


@router.put("/{run_id}/artifacts", status_code=201)
async def put_artifacts(run_id: str, request: Request, sha256: str, rank: int = Query(default=0, ge=0),
                        attempt: int = Query(default=1, ge=1), files: int = Query(default=0, ge=0),
                        who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Run:
    """An agent keeps what a rank left in FEDML_ARTIFACT_DIR (a tar.gz named by its sha256). The bytes are
    always sent, even when a blob of that hash exists: naming a hash must not attach another user's blob."""
    await run_in_threadpool(c.sched.check_log_writer, run_id, who, attempt)
    size, _ = await c.blobs.put(sha256, request.stream(), f"node:{who.owner}",
                                max_bytes=c.settings.max_artifact_mb * 1024 * 1024)
    art = Artifact(rank=rank, attempt=attempt, sha256=sha256, size=size, files=files)
    return await run_in_threadpool(c.sched.add_artifact, run_id, art, who)


@router.get("/{run_id}/artifacts/{rank}")
def get_artifacts(run_id: str, rank: int, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    run = c.sched.get_run(run_id, who)
    arts = sorted((a for a in run.artifacts if a.rank == rank), key=lambda a: a.attempt)
    if not arts:
        raise NotFound(f"run {run_id} kept no artifacts for rank {rank}")
    return FileResponse(c.blobs.path(arts[-1].sha256), media_type="application/gzip",
                        filename=f"{run_id}-rank{rank}-artifacts.tar.gz")
