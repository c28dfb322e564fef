"""Webhooks (`notify:` in a job, docs/notify.md): a JSON POST to each target when its run reaches an event it
names, signed with the owner's webhook secret, retried with backoff, recorded on the run.

Never in the scheduler's way: the replica whose write moved the run hands the event to a small pool of sender
threads (enqueue returns at once; past MAX_PENDING deliveries waiting, more are recorded as failed, not queued),
and a receiver that is slow or dead costs those threads only. At most once per event: a replica that dies with
deliveries pending does not send them.

The scheduler sends only where a user may make it send: public addresses. A target whose name resolves to a
loopback, private, link-local or otherwise special address is refused (cloud metadata services, the scheduler's
own API, the head's other services) unless an admin allows that network (`fedml scheduler start --webhook-allow
CIDR`, FEDML_WEBHOOK_ALLOW). The check is made when sending; a name that resolves differently a moment later
(DNS rebinding) is not caught. Redirects are not followed.

Signature: `X-Fedml-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed by the owner's secret
(`fedml notify secret`), derived from the scheduler's webhook key (a file beside the blobs, which replicas share).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .contract.jobspec import NotifyTarget
from .contract.models import Delivery, Run

log = logging.getLogger("fedml.scheduler")

MAX_TRIES = 5
MAX_PENDING = 1000
SENDERS = 4
TIMEOUT_S = 5.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(text: str | None) -> list[Network]:
    """`--webhook-allow 127.0.0.0/8,10.1.0.0/16`: networks webhooks may reach besides public addresses."""
    out: list[Network] = []
    for part in (text or "").split(","):
        if part.strip():
            out.append(ipaddress.ip_network(part.strip(), strict=False))
    return out


def refused(url: str, allow: list[Network]) -> str | None:
    """Why the scheduler must not send to `url` (None: it may)."""
    u = urlsplit(url)
    host = u.hostname or ""
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"cannot resolve {host}: {exc}"
    for ip in {ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}:
        if any(ip in net for net in allow):
            continue
        if not ip.is_global or ip.is_multicast:
            return (f"{host} is {ip}, not a public address: webhooks reach only those unless an admin allows the "
                    f"network (fedml scheduler start --webhook-allow CIDR)")
    return None


def shown_url(url: str) -> str:
    """The URL without its query and fragment (a token often rides there)."""
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, u.path, "", ""))


def payload(run: Run, event: str) -> dict[str, Any]:
    text = (f"Run {run.id} ({run.name}, {run.owner}) {event}: {run.status.value}"
            + (f", exit code {run.exit_code}" if run.exit_code is not None else "")
            + (f" ({run.reason})" if run.reason else ""))
    return {"event": event, "run_id": run.id, "name": run.name, "owner": run.owner, "status": run.status.value,
            "attempt": run.attempt, "exit_code": run.exit_code, "reason": run.reason, "created_at": run.created_at,
            "started_at": run.started_at, "ended_at": run.ended_at, "text": text}  # text: Slack's field


class Webhooks:
    def __init__(self, key_file: Path, record: Callable[[str, Delivery], None], *, allow: list[Network],
                 backoff: float = 1.0) -> None:
        self.key_file, self.record, self.allow, self.backoff = key_file, record, allow, backoff
        self._key: bytes | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def key(self) -> bytes:
        """The scheduler's webhook key: made once (0600), then read; replicas sharing the blob dir share it."""
        if self._key is None:
            try:
                fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
            for _ in range(50):  # (a replica that lost the race reads what the winner is writing)
                text = self.key_file.read_text().strip()
                if len(text) == 64:
                    break
                time.sleep(0.02)
            self._key = bytes.fromhex(text)
        return self._key

    def secret(self, owner: str) -> str:
        """The owner's signing secret (the same on every replica, for as long as the key file lives)."""
        return hmac.new(self.key(), f"webhook:{owner}".encode(), hashlib.sha256).hexdigest()

    def enqueue(self, run: Run, event: str, targets: list[NotifyTarget] | None = None, signer: str | None = None) -> None:
        """Deliver `event` of `run` to each of `targets` (default: its job's) that asked for it, signed with the
        secret of `signer` (default: the run's owner; "team:NAME" for a team's default targets). Returns at once."""
        for target in run.job.notify or [] if targets is None else targets:
            if event not in target.on:
                continue
            with self._lock:
                if self._pending >= MAX_PENDING:
                    full = True
                else:
                    full = False
                    self._pending += 1
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
            if full:
                self.record(run.id, Delivery(event=event, attempt=run.attempt, url=shown_url(target.url),
                                             state="failed", tries=0, error="too many deliveries pending"))
                continue
            assert self._pool is not None
            self._pool.submit(self._send, run, event, target.url, signer or run.owner)

    def _send(self, run: Run, event: str, url: str, signer: str) -> None:
        import httpx
        import tenacity

        body = json.dumps(payload(run, event), separators=(",", ":")).encode()
        sig = hmac.new(self.secret(signer).encode(), body, hashlib.sha256).hexdigest()  # (the text is the key)
        headers = {"content-type": "application/json", "user-agent": "fedml-launch-webhook",
                   "x-fedml-event": event, "x-fedml-delivery": str(uuid.uuid4()), "x-fedml-signature": f"sha256={sig}"}
        tries, code, error = 0, None, None

        class _Again(Exception):
            pass

        def once() -> None:
            nonlocal tries, code, error
            tries += 1
            why = refused(url, self.allow)
            if why is not None:
                error = f"refused: {why}"
                return  # (no retry: the address will not become public)
            try:  # (streamed and closed unread: a receiver's answer body, however big or slow, is not read)
                with httpx.stream("POST", url, content=body, headers=headers, timeout=TIMEOUT_S,
                                  follow_redirects=False) as r:
                    code = r.status_code
            except httpx.HTTPError as exc:
                code, error = None, f"{type(exc).__name__}: {exc}"[:300]
                raise _Again() from None
            if 200 <= code < 300:
                error = None
                return
            error = f"HTTP {code}"
            if code in (408, 429) or code >= 500:
                raise _Again()  # the receiver may take it later; any other answer is final

        try:
            for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(MAX_TRIES), reraise=True,
                                             wait=tenacity.wait_exponential(multiplier=self.backoff, max=60),
                                             retry=tenacity.retry_if_exception_type(_Again)):
                with attempt:
                    once()
        except _Again:
            pass
        except Exception as exc:  # noqa: BLE001 - a sender thread must record, not die
            error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            with self._lock:
                self._pending -= 1
        state = "delivered" if error is None else "failed"
        if state == "failed":
            log.info("webhook for run %s (%s) to %s failed after %d tries: %s", run.id, event, shown_url(url),
                     tries, error)
        try:
            self.record(run.id, Delivery(event=event, attempt=run.attempt, url=shown_url(url), state=state,
                                         tries=tries, code=code, error=error))
        except Exception:  # noqa: BLE001 - the run may be gone; the log line above is what is left
            log.exception("recording the webhook delivery of run %s", run.id)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
