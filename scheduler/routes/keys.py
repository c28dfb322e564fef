"""API keys and node join tokens (admin only; secrets are shown once and stored hashed), and each owner's
webhook signing secret."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from .. import access
from .. import auth as keys
from ..contract.errors import Conflict, Invalid, NotFound
from ..contract.models import ApiKey, JoinTokenCreate, Principal
from .deps import API, Ctx, admin, auth, ctx

router = APIRouter(prefix=API)


def _public(k: ApiKey) -> dict[str, object]:
    return k.model_dump(exclude={"hash"})


@router.post("/keys", status_code=201)
def create_key(name: str = Query(min_length=1, max_length=100), scope: str = Query(default="user"),
               team: str | None = Query(default=None, max_length=40),
               who: Principal = Depends(admin), c: Ctx = Depends(ctx)) -> dict[str, object]:
    if scope not in ("admin", "user", "metrics"):
        raise Invalid("scope must be admin, user or metrics (node keys are issued at registration)")
    if name.startswith("team:"):
        raise Invalid("a key's name may not start with team: (a team's webhook secret is named so)")
    if team is not None and scope == "metrics":
        raise Invalid("a metrics key launches nothing: it belongs to no team")
    if team is not None and c.store.get_team(team) is None:
        raise NotFound(f"no team {team} (make it with `fedml team create {team}`)")
    if any(k.name == name and k.revoked_at is None and k.scope != "node" for k in c.store.list_keys()):
        raise Conflict(f"a key named {name} exists already")
    key, secret = keys.issue(c.store, name=name, scope=scope, owner={"user": name, "metrics": "metrics"}.get(scope, "admin"),
                             team=team)
    return {"key": _public(key), "secret": secret}


@router.get("/keys")
def list_keys(who: Principal = Depends(admin), c: Ctx = Depends(ctx)) -> list[dict[str, object]]:
    return [_public(k) for k in c.store.list_keys()]


@router.delete("/keys/{ref}")
def revoke_key(ref: str, who: Principal = Depends(admin), c: Ctx = Depends(ctx)) -> dict[str, object]:
    found = [k for k in c.store.list_keys() if ref in (k.id, k.name) and k.revoked_at is None]
    if not found:
        raise NotFound(f"no active key {ref}")
    if len(found) > 1:
        raise Conflict(f"{ref} names {len(found)} keys; use the key id")
    return _public(keys.revoke(c.store, found[0]))


@router.post("/tokens", status_code=201)
def create_token(body: JoinTokenCreate, who: Principal = Depends(admin), c: Ctx = Depends(ctx)) -> dict[str, object]:
    """A node join token (`fedml scheduler token create --node`): shown once, stored hashed."""
    for team in body.teams:
        if c.store.get_team(team) is None:
            raise NotFound(f"no team {team} (make it with `fedml team create {team}`)")
    key, secret = keys.issue_join(c.store, creator=who.owner, ttl=body.ttl, uses=body.uses, labels=body.labels,
                                  name=body.name, teams=body.teams)
    return {"key": _public(key), "secret": secret}


@router.get("/webhooks/secret")
def webhook_secret(owner: str | None = Query(default=None, max_length=100), who: Principal = Depends(auth),
                   c: Ctx = Depends(ctx)) -> dict[str, str]:
    """The key your runs' webhooks are signed with (an admin may ask for another owner's): a receiver checks
    X-Fedml-Signature = "sha256=" + hex HMAC-SHA256(secret, body)."""
    mine = owner or who.owner
    access.require_may_read_webhook_secret(who, mine)
    return {"owner": mine, "secret": c.webhooks.secret(mine), "header": "X-Fedml-Signature",
            "signature": "sha256=<hex HMAC-SHA256 of the request body, keyed by the secret>"}

