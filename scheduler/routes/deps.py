"""What routes depend on: the app's context (store, scheduler, blobs, gateway...), the caller's principal, and
the bounds on numbers the stores keep."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from .. import access
from .. import auth as keys
from ..contract.models import ApiKey, Principal, Run
from ..store import MISS

if TYPE_CHECKING:
    from ..app import Health, Settings
    from ..blobs import BlobStore
    from ..gateway import Endpoints, Gateway
    from ..notify import Notifier
    from ..service import Scheduler
    from ..storage import NamedStorage
    from ..store import Store

API = "/api/v1"
# Bounds for numbers the stores keep as integers (SQLite: 64-bit; Redis Lua: exact up to 2**53).
MAX_ID = 2**31 - 1
MAX_SEQ = 2**53 - 1


@dataclass
class Ctx:
    store: Store
    settings: Settings
    sched: Scheduler
    notifier: Notifier
    blobs: BlobStore
    storage: NamedStorage
    endpoints: Endpoints
    gateway: Gateway
    health: Health
    list_cache: dict[tuple[object, ...], tuple[int, float, bytes, dict[str, str]]] = field(default_factory=dict)  # routes/runs.py
    event_streams: int = 0  # dashboards' event streams open now (routes/ui.py)
    webhooks: Any = None  # scheduler/webhooks.py (the owner's signing secret: routes/keys.py)

    def identify(self, header: str, path: str) -> tuple[int, str, Principal | None]:
        """(status, why, principal): the bearer key of a request, checked before its body is read."""
        scheme, _, given = header.partition(" ")
        return self._judge(keys.lookup(self.store, given.strip()) if scheme.lower() == "bearer" else None, path)

    def identify_cached(self, header: str, path: str) -> tuple[int, str, Principal | None] | None:
        """identify's answer where the key cache holds the key (no I/O: on the event loop, no thread-pool hop);
        None where it takes a read of the store (identify, in a thread)."""
        scheme, _, given = header.partition(" ")
        key = keys.lookup_cached(self.store, given.strip()) if scheme.lower() == "bearer" else None
        return None if key is MISS else self._judge(key, path)  # type: ignore[arg-type]

    @staticmethod
    def _judge(key: ApiKey | None, path: str) -> tuple[int, str, Principal | None]:
        if key is not None and key.scope == "node" and key.revoked_why == "node removed":
            return 410, "this node was removed from the scheduler by an admin; its agent must not join again", None
        if not keys.usable(key):
            return 401, "missing, wrong or revoked API key", None
        assert key is not None
        if key.scope == "join" and path != f"{API}/nodes/register":
            return 403, "a join token only registers nodes", None
        if key.scope == "metrics":  # (GET /metrics checks its own key: it is not under the API)
            return 403, "a metrics key only reads /metrics", None
        return 200, "", Principal(scope=key.scope, owner=key.owner, key_id=key.id, team=key.team)

    def named(self, runs: list[Run]) -> list[Run]:
        """Users named their nodes: give each run the names of the nodes it ran on (one lookup per node)."""
        names: dict[str, str] = {}
        now = time.time()
        for r in runs:
            ids = {p.node_id for p in r.placements} | {p.node_id for a in r.attempts for p in a.placements} | \
                {s.node_id for s in r.scores}
            for nid in ids:
                if nid not in names:
                    node = self.store.get_node(nid)
                    names[nid] = node.name if node is not None else nid
            r.node_names = {nid: names[nid] for nid in ids}
            r.spent = r.spend(now)
        return runs


async def ctx(request: Request) -> Ctx:
    # Async: a plain function dependency is run in the thread pool, a hop per request for an attribute read.
    return request.app.state.ctx  # type: ignore[no-any-return]


async def auth(request: Request, c: Ctx = Depends(ctx)) -> Principal:
    # The guard middleware verified the key before any of the body was read, and left the principal here. Async:
    # reading it must not cost a thread-pool hop on every request (the guard's look-up already took one).
    who = request.scope.get("fedml.principal")
    if who is None:
        status, detail, who = await run_in_threadpool(c.identify, request.headers.get("authorization", ""),
                                                      request.url.path)
        if who is None:
            raise HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    return who  # type: ignore[no-any-return]


async def admin(who: Principal = Depends(auth)) -> Principal:
    access.require_admin(who)
    return who
