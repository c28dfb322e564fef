"""POST (or any method) /inference/NAME[/PATH]: the endpoint gateway, as a bare ASGI handler. FastAPI's routing,
dependency and middleware layers cost more than the proxying itself (see bench/gateway.py)."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import HTTPException

from .. import auth as keys
from ..contract.errors import ApiError, BadRequest, TooLarge, Unauthenticated, status_of
from ..contract.models import Principal
from .deps import Ctx

PREFIX = "/inference/"


class Inference:
    def __init__(self, c: Ctx) -> None:
        self.c = c
        # Keys are checked in the event loop with a 1 s cache (a revoked key stops working within 1 s): a thread
        # hop and a store read on every inference request would cost more than the proxying.
        self.verified: dict[str, tuple[float, Principal | None]] = {}

    def principal(self, header: str) -> Principal:
        scheme, _, given = header.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        now = time.monotonic()
        hit = self.verified.get(given)
        if hit is None or now - hit[0] > 1.0:
            if len(self.verified) > 10_000:
                self.verified.clear()
            who = keys.verify(self.c.store, given)
            hit = self.verified[given] = (now, who if who is None or who.scope != "join" else None)  # tokens only join
        if hit[1] is None:
            raise Unauthenticated("missing, wrong or revoked API key")
        return hit[1]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        name, _, rest = scope["path"][len(PREFIX):].partition("/")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        chunks = []
        limit_mb = self.c.settings.max_inference_mb
        try:
            # The key first, then the body, bounded: an anonymous caller cannot make us buffer anything.
            lower = dict((k.lower(), v) for k, v in headers)
            who = self.principal(lower.get("authorization", ""))
            cap = limit_mb * 1024 * 1024
            too_large = TooLarge(f"request body is larger than the limit of {limit_mb} MiB")
            declared = lower.get("content-length") or "0"
            if not declared.isdigit():
                raise BadRequest("bad Content-Length")
            if int(declared) > cap:
                raise too_large
            size = 0
            while True:
                msg = await receive()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
                if not msg.get("more_body"):
                    break
            status, out, content = await self.c.gateway.forward(
                name, f"/{rest}" if rest else "", scope["method"], headers,
                scope.get("query_string", b"").decode("latin-1"), b"".join(chunks), who)
        except (ApiError, HTTPException) as exc:
            detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
            code = exc.status_code if isinstance(exc, HTTPException) else status_of(exc)
            data = json.dumps({"detail": detail}).encode()
            extra = [(b"www-authenticate", b"Bearer")] if code == 401 else []
            await send({"type": "http.response.start", "status": code, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
            await send({"type": "http.response.body", "body": data})
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out]
        if isinstance(content, bytes):
            raw.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
            return
        await send({"type": "http.response.start", "status": status, "headers": raw})
        async for chunk in content:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
