"""Named storage (`fedml storage ...`; scheduler/storage.py): a user's named files and directories, uploaded as
blobs (PUT /blobs/{sha}) and then named here. A user sees only their own names; an admin sees everyone's (and
reads one of another user's with ?owner=). A name can only be given to a blob its owner uploaded."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse

from .. import access
from ..contract.errors import BadRequest, NotFound
from ..contract.models import Principal, StorageObject, StoragePut
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/storage")
Name = Path(max_length=128)


def _owner(who: Principal, owner: str | None) -> str:
    access.require_not_node(who, "use storage")
    if owner is not None and owner != who.owner:
        access.require_admin(who, "only an admin reads another user's storage")
        return owner
    return who.owner


def _get(c: Ctx, who: Principal, name: str, owner: str | None) -> StorageObject:
    try:
        obj = c.storage.get(_owner(who, owner), name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if obj is None:
        raise NotFound(f"no storage object {name}")
    return obj


@router.get("")
def list_storage(everyone: bool = False, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> list[StorageObject]:
    access.require_not_node(who, "use storage")
    if everyone:
        access.require_admin(who, "only an admin lists everyone's storage")
    return c.storage.list(None if everyone else who.owner)


@router.get("/{name}")
def get_storage(name: str = Name, owner: str | None = Query(default=None, max_length=200),
                who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> StorageObject:
    return _get(c, who, name, owner)


@router.get("/{name}/data")
def get_storage_data(name: str = Name, owner: str | None = Query(default=None, max_length=200),
                     who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> FileResponse:
    obj = _get(c, who, name, owner)
    if not c.blobs.has(obj.sha256):
        raise NotFound(f"storage object {name}: its data is gone")
    return FileResponse(c.blobs.path(obj.sha256), media_type="application/gzip", filename=f"{name}.tar.gz")


@router.put("/{name}", status_code=201)
def put_storage(body: StoragePut, name: str = Name, who: Principal = Depends(auth),
                c: Ctx = Depends(ctx)) -> StorageObject:
    """Name an uploaded blob (replacing what the name held: runs launched before keep what they resolved)."""
    access.require_not_node(who, "use storage")
    if not (access.may_read_blob(who, owned_by=lambda owner: c.blobs.owned_by(body.sha256, owner),
                                 placed_here=lambda _node: False) and c.blobs.has(body.sha256)):
        raise BadRequest(f"blob {body.sha256[:12]} has not been uploaded (PUT /blobs/{{sha256}} first)")
    obj = StorageObject(**body.model_dump(), name=name, owner=who.owner, size=c.blobs.path(body.sha256).stat().st_size)
    try:
        return c.storage.put(obj)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


@router.delete("/{name}")
def delete_storage(name: str = Name, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> StorageObject:
    obj = _get(c, who, name, None)
    c.storage.delete(who.owner, name)
    return obj
