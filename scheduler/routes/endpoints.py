"""Serve endpoints: list, show, scale, delete; and the agents' replica reports."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..contract.models import Principal, ReplicaReport, Run, ScaleRequest
from ..gateway import Load
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=API)


def _view(c: Ctx, run: Run) -> dict[str, object]:
    ep = run.endpoint
    assert ep is not None
    names = {n.id: n.name for n in c.sched.nodes()}
    states = [{**r.model_dump(), "node": names.get(r.node_id, r.node_id)} for r in ep.states] \
        if ep.attempt == run.attempt else []
    load = c.endpoints.loads.get(run.id)
    return {"name": ep.name, "run_id": run.id, "status": run.status.value, "owner": run.owner,
            "replicas": ep.replicas, "min_replicas": ep.min_replicas, "max_replicas": ep.max_replicas,
            "autoscale": ep.autoscale, "ready": sum(1 for r in states if r["state"] == "ready"),
            "states": states, "node_id": run.node_id, "path": f"/inference/{ep.name}",
            "inflight": load.inflight if load else 0, "requests": load.total if load else 0,
            "traffic": (load or Load()).stats(),  # as this scheduler replica's gateway saw it
            "created_at": run.created_at, "reason": run.reason}


@router.get("/endpoints")
def list_endpoints(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> list[dict[str, object]]:
    return [_view(c, r) for r in c.endpoints.list(who)]


@router.get("/endpoints/{ref}")
def get_endpoint(ref: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, object]:
    return _view(c, c.endpoints.find(ref, who))


@router.post("/endpoints/{ref}/scale")
def scale_endpoint(ref: str, body: ScaleRequest, who: Principal = Depends(auth),
                   c: Ctx = Depends(ctx)) -> dict[str, object]:
    return _view(c, c.endpoints.scale(ref, who, body.replicas, body.min_replicas, body.max_replicas))


@router.delete("/endpoints/{ref}")
def delete_endpoint(ref: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, object]:
    run = c.sched.stop_run(c.endpoints.find(ref, who).id, who)
    c.endpoints.changed()
    return _view(c, run)


@router.put("/runs/{run_id}/replicas")
def report_replicas(run_id: str, body: ReplicaReport, node_id: str, who: Principal = Depends(auth),
                    c: Ctx = Depends(ctx)) -> dict[str, bool]:
    c.endpoints.report(run_id, body, node_id, who)
    return {"ok": True}
