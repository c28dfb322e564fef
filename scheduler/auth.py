"""API keys: admin and user keys for people and CI, node keys for agents. Stored as sha256 digests only.

A key is 32 random bytes (urlsafe), so a plain sha256 is enough to store it: there is nothing to brute-force.
Lookups go by digest and the digest is compared again in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from .models import ApiKey, Principal
from .store import Store

SCOPES = ("admin", "user", "node")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(store: Store, *, name: str, scope: str, owner: str) -> tuple[ApiKey, str]:
    """Create a key; returns the record and the secret (shown once, never stored)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    secret = f"fml_{scope[0]}_{secrets.token_urlsafe(32)}"
    key = ApiKey(id="key-" + secrets.token_hex(4), name=name, scope=scope, owner=owner, hash=digest(secret),
                 prefix=secret[:10])
    store.put_key(key)
    return key, secret


def verify(store: Store, secret: str) -> Principal | None:
    if not secret:
        return None
    d = digest(secret)
    key = store.key_by_hash(d)
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.hash, d):
        return None
    return Principal(scope=key.scope, owner=key.owner, key_id=key.id)


def revoke(store: Store, key: ApiKey) -> ApiKey:
    key = key.model_copy(update={"revoked_at": time.time()})
    store.put_key(key)
    return key


def bootstrap_admin(store: Store) -> str | None:
    """On first start (no admin key yet), create one and return its secret; else None."""
    if any(k.scope == "admin" and k.revoked_at is None for k in store.list_keys()):
        return None
    return issue(store, name="admin", scope="admin", owner="admin")[1]
