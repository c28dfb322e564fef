"""Workspace blobs, content-addressed. A blob is visible to the principals that uploaded its bytes (and admins,
and a node while a run using it, as its workspace, storage or an earlier attempt's artifacts, is placed there):
to anyone else HEAD and GET answer 404 whether it exists or not, and an upload of the same bytes is accepted (it
proves possession)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from .. import access
from ..contract.errors import NotFound
from ..contract.models import Principal, RunStatus
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/blobs")


def _visible(c: Ctx, sha: str, who: Principal) -> bool:
    c.blobs.path(sha)  # 400 for a malformed name
    return access.may_read_blob(
        who, owned_by=lambda owner: c.blobs.owned_by(sha, owner),
        # (a run's artifacts too: an attempt starts with what its rank left in the attempt before, docs/teams.md)
        placed_here=lambda node_id: any(r.workspace_sha == sha or any(m.sha256 == sha for m in r.mounts)
                                        or any(a.sha256 == sha for a in r.artifacts)
                                        for r in c.store.list_runs(status=[RunStatus.STARTING, RunStatus.RUNNING],
                                                                   node_id=node_id))) and c.blobs.has(sha)


@router.head("/{sha}")
def blob_head(sha: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    return Response(status_code=200 if _visible(c, sha, who) else 404)


@router.put("/{sha}", status_code=201)
async def blob_put(sha: str, request: Request, who: Principal = Depends(auth),
                   c: Ctx = Depends(ctx)) -> dict[str, object]:
    access.require_not_node(who, "upload")
    size, stored = await c.blobs.put(sha, request.stream(), who.owner)
    return {"sha256": sha, "stored": stored, "size": size}


@router.get("/{sha}")
def blob_get(sha: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Response:
    if not _visible(c, sha, who):
        raise NotFound(f"blob {sha[:12]} not found")
    return FileResponse(c.blobs.path(sha), media_type="application/gzip")
