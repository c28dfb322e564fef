"""API keys: admin and user keys for people and CI, node keys for agents, join tokens that register nodes.
Stored as sha256 digests only.

A key is 32 random bytes (urlsafe), so a plain sha256 is enough to store it: there is nothing to brute-force.
Lookups go by digest and the digest is compared again in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from .contract.models import ApiKey, Principal
from .store import MISS, Store

SCOPES = ("admin", "user", "node", "join", "metrics")  # metrics: reads GET /metrics only (routes/metrics.py)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(store: Store, *, name: str, scope: str, owner: str, ttl: float | None = None,
          parent: str | None = None, team: str | None = None) -> tuple[ApiKey, str]:
    """Create a key (that expires after `ttl` seconds, if given; revoked with `parent`, the key it was made
    from, if given: a dashboard session; launching runs of `team`, if given); returns the record and the secret
    (shown once, never stored)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    secret = f"fml_{scope[0]}_{secrets.token_urlsafe(32)}"
    key = ApiKey(id="key-" + secrets.token_hex(8), name=name, scope=scope, owner=owner, hash=digest(secret),
                 prefix=secret[:10], expires_at=time.time() + ttl if ttl else None, parent=parent, team=team)
    store.put_key(key)
    return key, secret


def issue_join(store: Store, *, creator: str, ttl: float | None, uses: int | None,
               labels: dict[str, str] | None = None, name: str | None = None,
               teams: list[str] | None = None) -> tuple[ApiKey, str]:
    """A join token: registers up to `uses` nodes (None: any number) until `ttl` seconds from now."""
    secret = f"fml_j_{secrets.token_urlsafe(32)}"
    now = time.time()
    key = ApiKey(id="key-" + secrets.token_hex(8), name=name or f"join token by {creator}", scope="join",
                 owner=creator, hash=digest(secret), prefix=secret[:10], uses_left=uses,
                 expires_at=now + ttl if ttl else None, labels=dict(labels or {}), created_at=now,
                 teams=list(teams or []))
    store.put_key(key)
    return key, secret


def lookup(store: Store, secret: str) -> ApiKey | None:
    """The key record of `secret`, revoked or not (None if unknown)."""
    if not secret:
        return None
    d = digest(secret)
    key = store.key_by_hash(d)
    if key is None or not hmac.compare_digest(key.hash, d):
        return None
    return key


def lookup_cached(store: Store, secret: str) -> ApiKey | None | object:
    """lookup's answer where the store's key cache holds it without a read (no I/O: the event loop asks this
    first), else MISS."""
    if not secret:
        return None
    d = digest(secret)
    key = store.key_cached(d)
    if key is MISS:
        return MISS
    if not isinstance(key, ApiKey) or not hmac.compare_digest(key.hash, d):
        return None
    return key


def usable(key: ApiKey | None) -> bool:
    if key is None or key.revoked_at is not None:
        return False
    if key.expires_at is not None and key.expires_at <= time.time():  # a join token's, a dashboard session's
        return False
    if key.scope == "join":
        return key.uses_left is None or key.uses_left > 0
    return True


SESSION_COOKIE = "fedml_session"  # the dashboard's session: a key of its own (issue(..., ttl)), HttpOnly


def session_of(cookie_header: str) -> str:
    """The dashboard session's secret in a Cookie header ("" if none)."""
    from http.cookies import CookieError, SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return ""
    morsel = jar.get(SESSION_COOKIE)
    return morsel.value if morsel is not None and len(morsel.value) <= 200 else ""


def session_csrf(secret: str) -> str:
    """The CSRF token of a dashboard session: what a page must send (X-CSRF-Token) with every action it takes
    with the session cookie. Derived from the session's secret, which it does not reveal; a page of another
    site can neither read it nor (SameSite=Strict) send the cookie."""
    return hashlib.sha256(b"fedml-csrf:" + secret.encode()).hexdigest()[:40]


def verify(store: Store, secret: str) -> Principal | None:
    key = lookup(store, secret)
    if not usable(key):
        return None
    assert key is not None
    return Principal(scope=key.scope, owner=key.owner, key_id=key.id, team=key.team)


def use_join(store: Store, key_id: str) -> ApiKey:
    """Spend one registration of a join token (atomically across replicas). ValueError if it has none left."""
    with store.lock(f"key:{key_id}"):
        key = next((k for k in store.list_keys() if k.id == key_id), None)
        if not usable(key):
            raise ValueError("this join token is used up, expired or revoked")
        assert key is not None
        if key.uses_left is not None:
            key = key.model_copy(update={"uses_left": key.uses_left - 1})
            store.put_key(key)
        return key


def revoke(store: Store, key: ApiKey, why: str | None = None) -> ApiKey:
    """Revoke the key, and the keys made from it (its dashboard sessions and sign-in links)."""
    key = key.model_copy(update={"revoked_at": time.time(), "revoked_why": why})
    store.put_key(key)
    for child in store.list_keys():
        if child.parent == key.id and child.revoked_at is None:
            revoke(store, child, why=f"{key.name} was revoked")
    return key


def bootstrap_admin(store: Store) -> str | None:
    """On first start (no admin key yet), create one and return its secret; else None."""
    if any(k.scope == "admin" and k.revoked_at is None for k in store.list_keys()):
        return None
    return issue(store, name="admin", scope="admin", owner="admin")[1]
