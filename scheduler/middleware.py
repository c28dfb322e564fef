"""ASGI middleware in front of the API: the key (or the dashboard's session cookie, with its CSRF token for an
action) and the body's size are checked before a byte of the body is read (the Guard), and the inference
gateway's paths skip FastAPI altogether (Intercept)."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from starlette.concurrency import run_in_threadpool

from .auth import session_csrf, session_of
from .routes.deps import API


class _TooLarge(Exception):
    pass


SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
UI_CAP = 4096  # the dashboard's own routes (/ui/: sign-in): no key yet, a small body


class Guard:
    """ASGI middleware for /api/: the bearer key is checked before a byte of the body is read, and the body is
    capped per route (by Content-Length at once, and by counting as it streams). Everything else passes."""

    def __init__(self, app: Any, identify: Any, identify_cached: Any, caps: list[tuple[re.Pattern[str], int, str]],
                 default_cap: int) -> None:
        self.app, self.identify, self.identify_cached = app, identify, identify_cached
        self.caps, self.default_cap = caps, default_cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/ui/"):
            await self._capped(scope, receive, send, UI_CAP, f"request body is larger than {UI_CAP} bytes")
            return
        if scope["type"] != "http" or not scope["path"].startswith(API + "/"):
            await self.app(scope, receive, send)
            return
        authorization, cookie, csrf = "", "", ""
        for k, v in scope["headers"]:  # ASGI servers give header names lower-cased
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"cookie":
                cookie = v.decode("latin-1")
            elif k == b"x-csrf-token":
                csrf = v.decode("latin-1")
        if not authorization and cookie:  # the dashboard: its session cookie, and for an action its CSRF token
            secret = session_of(cookie)
            if secret:
                if scope["method"] not in SAFE and not hmac.compare_digest(csrf, session_csrf(secret)):
                    await _answer(send, 403, "missing or wrong X-CSRF-Token for this session")
                    return
                authorization = f"Bearer {secret}"
        # (a key the cache holds is judged here; only one that takes a read of the store costs a thread)
        got = self.identify_cached(authorization, scope["path"])
        status, detail, who = got if got is not None else \
            await run_in_threadpool(self.identify, authorization, scope["path"])
        if who is None:
            await _answer(send, status, detail)
            return
        scope["fedml.principal"] = who
        cap, why = next(((c, m) for pattern, c, m in self.caps if pattern.match(scope["path"])), (self.default_cap, ""))
        why = why or f"request body is larger than the limit of {_size(cap)} for {scope['path']}"
        await self._capped(scope, receive, send, cap, why)

    async def _capped(self, scope: dict, receive: Any, send: Any, cap: int, why: str) -> None:
        """Pass the request on with its body capped at `cap` bytes: 413 at once by Content-Length, or as it
        streams past the cap."""
        length = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), "")
        if length and not length.isdigit():
            await _answer(send, 400, "bad Content-Length")
            return
        declared = int(length or 0)
        if declared > cap:
            await _answer(send, 413, why)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > cap:
                raise _TooLarge
            return msg

        async def watched(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await _answer(send, 413, why)


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


async def _answer(send: Any, status: int, detail: str) -> None:
    data = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Intercept:
    """ASGI middleware: requests under `prefix` go straight to `handler`, everything else to the app."""

    def __init__(self, app: Any, prefix: str, handler: Any) -> None:
        self.app, self.prefix, self.handler = app, prefix, handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)
