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
from .store import Store

SCOPES = ("admin", "user", "node", "join")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(store: Store, *, name: str, scope: str, owner: str) -> tuple[ApiKey, str]:
    """Create a key; returns the record and the secret (shown once, never stored)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    secret = f"fml_{scope[0]}_{secrets.token_urlsafe(32)}"
    key = ApiKey(id="key-" + secrets.token_hex(8), name=name, scope=scope, owner=owner, hash=digest(secret),
                 prefix=secret[:10])
    store.put_key(key)
    return key, secret


def issue_join(store: Store, *, creator: str, ttl: float | None, uses: int | None,
               labels: dict[str, str] | None = None, name: str | None = None) -> tuple[ApiKey, str]:
    """A join token: registers up to `uses` nodes (None: any number) until `ttl` seconds from now."""
    secret = f"fml_j_{secrets.token_urlsafe(32)}"
    now = time.time()
    key = ApiKey(id="key-" + secrets.token_hex(8), name=name or f"join token by {creator}", scope="join",
                 owner=creator, hash=digest(secret), prefix=secret[:10], uses_left=uses,
                 expires_at=now + ttl if ttl else None, labels=dict(labels or {}), created_at=now)
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


def usable(key: ApiKey | None) -> bool:
    if key is None or key.revoked_at is not None:
        return False
    if key.scope == "join":
        return (key.expires_at is None or key.expires_at > time.time()) and (key.uses_left is None or key.uses_left > 0)
    return True


def verify(store: Store, secret: str) -> Principal | None:
    key = lookup(store, secret)
    if not usable(key):
        return None
    assert key is not None
    return Principal(scope=key.scope, owner=key.owner, key_id=key.id)


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
    key = key.model_copy(update={"revoked_at": time.time(), "revoked_why": why})
    store.put_key(key)
    return key


def bootstrap_admin(store: Store) -> str | None:
    """On first start (no admin key yet), create one and return its secret; else None."""
    if any(k.scope == "admin" and k.revoked_at is None for k in store.list_keys()):
        return None
    return issue(store, name="admin", scope="admin", owner="admin")[1]
