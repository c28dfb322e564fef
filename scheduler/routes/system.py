"""/healthz (no key: load balancers probe it) and /api/v1/info."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..contract import __version__
from ..contract.models import Principal
from .deps import API, Ctx, auth, ctx

router = APIRouter()


@router.get("/healthz", response_model=None)
def healthz(c: Ctx = Depends(ctx)) -> dict[str, object] | JSONResponse:
    if c.health.degraded is not None:
        return JSONResponse({"ok": False, "version": __version__, "degraded": c.health.degraded,
                             "since": c.health.since}, status_code=503)
    return {"ok": True, "version": __version__}


@router.get(f"{API}/info")
def info(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, object]:
    nodes = c.store.list_nodes()
    return {"version": __version__, "store": type(c.store).__name__, "nodes": len(nodes),
            "gpus": sum(len(n.gpus) for n in nodes), "you": {"scope": who.scope, "owner": who.owner},
            "heartbeat_interval": c.settings.heartbeat_interval}
