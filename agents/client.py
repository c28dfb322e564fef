"""The agent's HTTP client for the scheduler API. Connection failures become `Unreachable`."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler.contract.models import GpuSample, LogBatch, NodeInfo, PollResponse, Registered, RunStatus, StatusReport
from scheduler.contract.transport import httpx, transport

API = "/api/v1"
log = logging.getLogger("fedml.agent")


class Unreachable(Exception):
    """No answer from the scheduler. `down`: positively known that no scheduler listens where we call (the
    connection was refused, or the embedded scheduler's state file is gone), as opposed to a timeout or an
    unreachable network, where a scheduler may well be running and writing this node off."""

    def __init__(self, message: str, down: bool = False) -> None:
        super().__init__(message)
        self.down = down


class Refused(Exception):
    def __init__(self, status: int, detail: str, body: dict[str, Any] | None = None) -> None:
        self.status, self.detail, self.body = status, detail, body or {}
        super().__init__(f"HTTP {status}: {detail}")


def server_from_state_file(path: Path) -> Callable[[], str]:
    """The embedded scheduler may come back on another port; read its address afresh each time."""

    def resolve() -> str:
        try:
            return str(json.loads(path.read_text())["url"])
        except (OSError, ValueError, KeyError):
            raise Unreachable(f"no scheduler address in {path}", down=True) from None

    return resolve


def _wants_rows(body: dict[str, Any]) -> bool:
    """Is this 422 a scheduler saying that a log batch lacks `lines` (one that knows no other form)?"""
    detail = body.get("detail")
    return isinstance(detail, list) and any(
        isinstance(d, dict) and d.get("type") == "missing" and d.get("loc") == ["lines"] for d in detail)


class AgentClient:
    def __init__(self, server: str | Callable[[], str], token: str | None, timeout: float = 30.0) -> None:
        self._resolve = server if callable(server) else (lambda: server)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http: httpx.Client | None = None
        self._base: str | None = None
        self._log_rows = False  # the scheduler takes log lines only as rows (older than LogBatch's columns)

    def base_url(self) -> str:
        return self._resolve().rstrip("/")

    def set_token(self, token: str | None) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self._http is not None:
            self._http.headers = httpx.Headers(self._headers)

    def _client(self) -> httpx.Client:
        base = self._resolve().rstrip("/")
        if self._http is None or base != self._base:
            if self._http is not None:
                self._http.close()
            self._http = httpx.Client(base_url=base, headers=self._headers, timeout=self._timeout,
                                      transport=transport(base))
            self._base = base
        return self._http

    def _call(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> httpx.Response:
        try:
            client = self._client()
            r = client.request(method, API + path, timeout=timeout or self._timeout, **kw)
        except httpx.TransportError as exc:
            self._base = None  # re-resolve next time: the scheduler may have moved
            refused = isinstance(exc, httpx.ConnectError) and "refused" in str(exc).lower()
            raise Unreachable(str(exc) or type(exc).__name__, down=refused) from None
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
            except ValueError:
                body, detail = None, r.text
            raise Refused(r.status_code, str(detail), body if isinstance(body, dict) else None)
        return r

    def register(self, info: NodeInfo) -> Registered:
        return Registered.model_validate(self._call("POST", "/nodes/register", json=info.model_dump()).json())

    def deregister(self, node_id: str) -> None:
        self._call("DELETE", f"/nodes/{node_id}")

    def poll(self, node_id: str, running: list[str], wait: float, timeout: float | None = None,
             gpus: list[GpuSample] | None = None) -> PollResponse:
        body: dict[str, Any] = {"running": running, "wait": wait}
        if gpus:
            body["gpus"] = [g.model_dump(exclude_none=True, exclude_defaults=True) | {"index": g.index} for g in gpus]
        r = self._call("POST", f"/nodes/{node_id}/poll", json=body, timeout=timeout or wait + 30)
        return PollResponse.model_validate(r.json())

    def report(self, run_id: str, attempt: int, node_id: str, status: RunStatus, exit_code: int | None = None,
               reason: str | None = None) -> None:
        body = StatusReport(status=status, attempt=attempt, exit_code=exit_code, reason=reason)
        self._call("POST", f"/runs/{run_id}/status", params={"node_id": node_id},
                   content=body.model_dump_json(), headers={"content-type": "application/json"})

    def report_replicas(self, run_id: str, attempt: int, node_id: str, replicas: list[dict[str, Any]]) -> None:
        self._call("PUT", f"/runs/{run_id}/replicas", params={"node_id": node_id},
                   json={"attempt": attempt, "replicas": replicas})

    def send_logs(self, run_id: str, batch: LogBatch) -> int:
        """Returns the scheduler's next expected seq."""
        if self._log_rows and batch.text is not None:
            batch = LogBatch.model_construct(rank=batch.rank, attempt=batch.attempt, first_seq=batch.first_seq,
                                             lines=batch.rows())
        try:
            r = self._call("POST", f"/runs/{run_id}/logs", content=batch.model_dump_json(exclude_none=True),
                           headers={"content-type": "application/json"})
        except Refused as exc:
            if exc.status == 409 and "next_seq" in exc.body:
                return int(exc.body["next_seq"])
            if exc.status == 422 and batch.text is not None and not self._log_rows and _wants_rows(exc.body):
                # A scheduler older than this agent knows only the row form: send that from now on.
                log.info("the scheduler refused log lines as columns (%s); sending them as rows", exc)
                self._log_rows = True
                return self.send_logs(run_id, batch)
            raise
        return int(r.json()["next_seq"])

    def next_seq(self, run_id: str, attempt: int, rank: int) -> int:
        r = self._call("GET", f"/runs/{run_id}/logs/next_seq", params={"attempt": attempt, "rank": rank})
        return int(r.json()["next_seq"])

    def upload_artifacts(self, run_id: str, rank: int, attempt: int, path: str, sha: str, files: int) -> None:
        with open(path, "rb") as f:
            self._call("PUT", f"/runs/{run_id}/artifacts", content=f, timeout=600,
                       params={"sha256": sha, "rank": rank, "attempt": attempt, "files": files},
                       headers={"content-type": "application/gzip"})

    def download(self, sha: str, dest: Path) -> None:
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{threading.get_ident()}.part")  # one per download
        try:
            client = self._client()
            with client.stream("GET", f"{API}/blobs/{sha}") as r:
                if r.status_code != 200:
                    raise Refused(r.status_code, f"workspace {sha[:12]} not available")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.TransportError as exc:
            self._base = None
            raise Unreachable(str(exc)) from None
        tmp.replace(dest)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
