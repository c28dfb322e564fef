"""Sweeps (`sweep:` in a job, `fedml launch --sweep`): one id for their runs, read, stopped and retried together."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Path, Query

from ..contract.models import Principal, Run
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/sweeps")


def summary(sweep_id: str, runs: list[Run]) -> dict[str, Any]:
    """The sweep as one row: its size, each point's latest run, and how many of those are in each state."""
    latest: dict[int, Run] = {}
    for run in runs:  # oldest first: a retry replaces its point's earlier run
        assert run.sweep is not None
        latest[run.sweep.index] = run
    first = runs[0]
    assert first.sweep is not None
    points = [latest[i] for i in sorted(latest)]
    counts = Counter(r.status.value for r in points)
    return {"id": sweep_id, "name": first.name, "owner": first.owner, "size": first.sweep.size,
            "max_parallel": first.sweep.max_parallel, "counts": dict(counts),
            "done": sum(1 for r in points if r.terminal), "created_at": first.created_at,
            "runs": [r.model_dump(mode="json") for r in points], "retried": len(runs) - len(points)}


@router.get("/{sweep_id}")
def get_sweep(sweep_id: str = Path(max_length=64), who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    return summary(sweep_id, c.named(c.sched.sweep(sweep_id, who)))


@router.post("/{sweep_id}/stop")
def stop_sweep(sweep_id: str = Path(max_length=64), who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    return summary(sweep_id, c.named(c.sched.stop_sweep(sweep_id, who)))


@router.post("/{sweep_id}/retry", status_code=201)
def retry_sweep(sweep_id: str = Path(max_length=64), all_points: bool = Query(default=False, alias="all"),
                who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    """Launch again the points whose latest run failed, was killed or lost (every ended point with all=true)."""
    again = c.sched.retry_sweep(sweep_id, who, all_points=all_points)
    out = summary(sweep_id, c.named(c.sched.sweep(sweep_id, who)))
    out["relaunched"] = [r.id for r in again]
    return out
