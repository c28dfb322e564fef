"""A typed Python client for the scheduler's API, sync (`Client`) and async (`AsyncClient`).

    from fedml_cli.client import Client, NotFound
    c = Client()                                   # FEDML_SERVER/FEDML_API_KEY, a `fedml login`, or the local one
    run = c.launch("job.yaml")                     # a Run (scheduler.contract.models), committed when it returns
    for line in c.logs(run.id, follow=True):       # LogRow(pos, rank, seq, ts, stream, line, attempt)
        print(line.line)
    run = c.wait(run.id)
    try:
        c.run("run-nope")
    except NotFound:
        ...

It is the `fedml` command's own client underneath (fedml_cli/api.py: the same finding of the scheduler, the same
error mapping, timeouts, and reads retried after a transport error; FEDML_RETRIES), with answers parsed into the
contract's models. Errors are the CLI's, named after their exit codes: Failed (1), Invalid (2), Unreachable (3),
NotFound (4), all CliError. The commands themselves use the untyped layer, so that `fedml --help` never imports
pydantic; fedml.api (FedML's names) uses both.

AsyncClient has the same methods as coroutines over httpx's async client; `launch` (packing and uploading a
workspace: disk and CPU work) and the storage calls run the sync code in a worker thread; `logs(follow=True)`
is an async iterator.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scheduler.contract.models import Cluster, LogRow, Node, NodeView, Run, StorageObject
from scheduler.contract.transport import NODELAY, httpx

from .api import API, IDEMPOTENT, Api, _safe_path, connect
from .errors import FAILED, UNREACHABLE, CliError, Failed, Invalid, NotFound, Unreachable

__all__ = ["AsyncClient", "Client", "CliError", "EndpointView", "Failed", "Invalid", "KeyView", "NotFound",
           "SweepView", "Unreachable"]

class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EndpointView(_View):
    """An endpoint as GET /endpoints answers it."""

    name: str
    run_id: str
    status: str
    owner: str
    replicas: int
    min_replicas: int
    max_replicas: int
    autoscale: bool = False
    ready: int = 0
    states: list[dict[str, Any]] = Field(default_factory=list)
    node_id: str | None = None
    path: str
    inflight: int = 0
    requests: int = 0
    created_at: float
    reason: str | None = None


class KeyView(_View):
    """An API key as an admin sees it (never the secret, never its hash)."""

    id: str
    name: str
    scope: str
    owner: str
    created_at: float
    revoked_at: float | None = None


class SweepView(_View):
    """A sweep: its size, counts per state, and each point's latest run."""

    id: str
    name: str
    owner: str
    size: int
    max_parallel: int | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    done: int = 0
    runs: list[Run] = Field(default_factory=list)
    retried: int = 0


def _rows(records: list[dict[str, Any]]) -> Iterator[LogRow]:
    for r in records:
        if "line" in r:
            yield LogRow(pos=r["pos"], rank=r["rank"], seq=r["seq"], ts=r["ts"], stream=r["stream"], line=r["line"],
                         attempt=r.get("attempt", 1))


class Client:
    """The scheduler's API with typed answers (module docstring). `url`/`api_key` default to what the `fedml`
    command would use; `timeout` is per request (log following waits as long as the run goes on)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retries: int | None = None) -> None:
        if url is not None:
            self.api = Api(url, api_key if api_key is not None else os.environ.get("FEDML_API_KEY"),
                           timeout=timeout, retries=retries)
        else:
            self.api = connect()
            if api_key is not None or retries is not None or timeout != 30.0:
                self.api = Api(self.api.url, api_key if api_key is not None else self.api.token,
                               embedded=self.api.embedded, timeout=timeout, retries=retries)

    @property
    def url(self) -> str:
        return self.api.url

    def close(self) -> None:
        self.api.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs --------------------------------------------------------------------------------------------
    def launch(self, job_file: str, *, name: str | None = None, env: dict[str, str] | None = None,
               after: list[str] | None = None, sweep: dict[str, list[Any]] | None = None,
               max_parallel: int | None = None, cluster: str | None = None,
               labels: dict[str, str] | None = None, show_progress: bool = False) -> Run:
        """Validate the job file, upload its workspace, create the run (a sweep's first point; run.sweep.id
        names the sweep). Invalid (2) for a bad file, with its file:line."""
        from .submit import submit

        _, run = submit(job_file, name=name, env=env, show_progress=show_progress, api=self.api, after=after,
                        sweep=sweep, max_parallel=max_parallel, cluster=cluster, labels=labels)
        return Run.model_validate(run)

    def run(self, run_id: str) -> Run:
        return Run.model_validate(self.api.get(f"/runs/{run_id}"))

    def runs(self, status: list[str] | None = None, limit: int = 100, name: str | None = None) -> list[Run]:
        """Newest first; `name`: only runs of that name."""
        raw = self.api.runs_named(name, status) if name else self.api.get(
            "/runs", params={"status": status or [], "limit": limit})
        return [Run.model_validate(r) for r in raw[:limit]]

    def stop(self, run_id: str) -> Run:
        return Run.model_validate(self.api.post(f"/runs/{run_id}/stop"))

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.2) -> Run:
        """The run once it has ended; Failed when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run.terminal:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise Failed(f"run {run_id} is still {run.status.value} after {timeout:g} s", FAILED)
            time.sleep(poll)

    def logs(self, run_id: str, *, after: int = -1, tail: int | None = None, rank: int | None = None,
             follow: bool = False) -> Iterator[LogRow]:
        """The run's log lines from position after+1 (or the last `tail`), every rank or one; with `follow`,
        until the run ends."""
        for chunk in self.api.stream_log_chunks(run_id, after=after, tail=tail, follow=follow, rank=rank):
            yield from _rows(chunk)

    # -- sweeps --------------------------------------------------------------------------------------------
    def sweep(self, sweep_id: str) -> SweepView:
        return SweepView.model_validate(self.api.get(f"/sweeps/{sweep_id}"))

    def stop_sweep(self, sweep_id: str) -> SweepView:
        return SweepView.model_validate(self.api.post(f"/sweeps/{sweep_id}/stop"))

    def retry_sweep(self, sweep_id: str, *, all_points: bool = False) -> SweepView:
        return SweepView.model_validate(self.api.post(f"/sweeps/{sweep_id}/retry",
                                                      params={"all": "true" if all_points else "false"}))

    # -- nodes and clusters -------------------------------------------------------------------------------------
    def nodes(self) -> list[NodeView]:
        return [NodeView.model_validate(n) for n in self.api.get("/nodes")]

    def drain(self, node: str, *, undo: bool = False) -> Node:
        return Node.model_validate(self.api.post(f"/nodes/{node}/drain", params={"undo": undo}))

    def remove_node(self, node: str) -> Node:
        return Node.model_validate(self.api.delete(f"/nodes/{node}"))

    def clusters(self) -> list[Cluster]:
        return [Cluster.model_validate(c) for c in self.api.get("/clusters")]

    def cluster(self, name: str) -> Cluster:
        return Cluster.model_validate(self.api.get(f"/clusters/{name}"))

    # -- endpoints -----------------------------------------------------------------------------------------
    def endpoints(self) -> list[EndpointView]:
        return [EndpointView.model_validate(e) for e in self.api.get("/endpoints")]

    def endpoint(self, name: str) -> EndpointView:
        return EndpointView.model_validate(self.api.get(f"/endpoints/{name}"))

    def scale(self, name: str, replicas: int | None = None, *, min_replicas: int | None = None,
              max_replicas: int | None = None) -> EndpointView:
        return EndpointView.model_validate(self.api.post(f"/endpoints/{name}/scale", json={
            "replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas}))

    def delete_endpoint(self, name: str) -> EndpointView:
        return EndpointView.model_validate(self.api.delete(f"/endpoints/{name}"))

    def predict(self, endpoint: str, body: Any) -> Any:
        """One request through the gateway: the replica's answer (decoded JSON, else text). Failed for an
        error answer, NotFound for no such endpoint."""
        from .model_cards import call, call_failed

        r = call(self.api, endpoint, json.dumps(body))
        failed = call_failed(r)
        if failed is not None:
            raise CliError(f"{failed}: {r.text[:500]}", failed.code)
        try:
            return r.json()
        except ValueError:
            return r.text

    # -- keys (admin) --------------------------------------------------------------------------------------
    def keys(self) -> list[KeyView]:
        return [KeyView.model_validate(k) for k in self.api.get("/keys")]

    def create_key(self, name: str, scope: str = "user") -> tuple[KeyView, str]:
        """(the key, its secret: shown this once)."""
        got = self.api.post("/keys", params={"name": name, "scope": scope})
        return KeyView.model_validate(got["key"]), str(got["secret"])

    def revoke_key(self, ref: str) -> KeyView:
        return KeyView.model_validate(self.api.delete(f"/keys/{ref}"))

    # -- storage -------------------------------------------------------------------------------------------
    def upload(self, path: str, name: str | None = None, *, description: str = "",
               metadata: dict[str, str] | None = None) -> StorageObject:
        from . import storage

        return StorageObject.model_validate(storage.upload(self.api, path, name, description=description,
                                                           metadata=metadata, show_progress=False))

    def download(self, name: str, dest: str = ".") -> str:
        from . import storage

        return str(storage.download(self.api, name, dest))

    def storage(self) -> list[StorageObject]:
        return [StorageObject.model_validate(o) for o in self.api.get("/storage")]


class AsyncClient:
    """Client's methods as coroutines (module docstring). Use as `async with AsyncClient() as c:`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retries: int | None = None) -> None:
        self._sync = Client(url, api_key, timeout=timeout, retries=retries)
        api = self._sync.api
        headers = {"Authorization": f"Bearer {api.token}"} if api.token else {}
        self.http = httpx.AsyncClient(base_url=api.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0),
                                      transport=httpx.AsyncHTTPTransport(socket_options=NODELAY,
                                                                         verify=api.url.startswith("https://")))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()
        self._sync.close()

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        """As Api.request: reads tried again after a transport error (the same backoff), writes once."""
        import tenacity

        path = _safe_path(path)
        try:
            async for attempt in tenacity.AsyncRetrying(
                    stop=tenacity.stop_after_attempt(self._sync.api.retries if method in IDEMPOTENT else 1),
                    wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
                    retry=tenacity.retry_if_exception_type(httpx.TransportError), reraise=True):
                with attempt:
                    r = await self.http.request(method, API + path, **kw)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the scheduler at {self._sync.url}: {exc or type(exc).__name__}",
                           UNREACHABLE) from None
        return self._sync.api._check(r).json()

    async def launch(self, job_file: str, **kw: Any) -> Run:
        return await asyncio.to_thread(self._sync.launch, job_file, **kw)

    async def run(self, run_id: str) -> Run:
        return Run.model_validate(await self._request("GET", f"/runs/{run_id}"))

    async def runs(self, status: list[str] | None = None, limit: int = 100) -> list[Run]:
        return [Run.model_validate(r) for r in await self._request("GET", "/runs", params={
            "status": status or [], "limit": limit})]

    async def stop(self, run_id: str) -> Run:
        return Run.model_validate(await self._request("POST", f"/runs/{run_id}/stop"))

    async def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.2) -> Run:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.run(run_id)
            if run.terminal:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise Failed(f"run {run_id} is still {run.status.value} after {timeout:g} s", FAILED)
            await asyncio.sleep(poll)

    async def logs(self, run_id: str, *, after: int = -1, tail: int | None = None, rank: int | None = None,
                   follow: bool = False) -> AsyncIterator[LogRow]:
        params = Api._log_params(after, tail, follow, rank)
        try:
            async with self.http.stream("GET", API + _safe_path(f"/runs/{run_id}/logs"), params=params,
                                        timeout=httpx.Timeout(None, connect=5.0)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._sync.api._check(r)
                buf = b""
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    *records, buf = buf.split(b"\n")
                    lines = [x for x in records if x.strip()]
                    if lines:
                        for row in _rows(json.loads(b"[" + b",".join(lines) + b"]")):
                            yield row
        except httpx.TransportError as exc:
            raise CliError(f"lost the connection to the scheduler at {self._sync.url}: {exc}", UNREACHABLE) from None

    async def sweep(self, sweep_id: str) -> SweepView:
        return SweepView.model_validate(await self._request("GET", f"/sweeps/{sweep_id}"))

    async def nodes(self) -> list[NodeView]:
        return [NodeView.model_validate(n) for n in await self._request("GET", "/nodes")]

    async def clusters(self) -> list[Cluster]:
        return [Cluster.model_validate(c) for c in await self._request("GET", "/clusters")]

    async def endpoints(self) -> list[EndpointView]:
        return [EndpointView.model_validate(e) for e in await self._request("GET", "/endpoints")]

    async def keys(self) -> list[KeyView]:
        return [KeyView.model_validate(k) for k in await self._request("GET", "/keys")]

    async def predict(self, endpoint: str, body: Any) -> Any:
        return await asyncio.to_thread(self._sync.predict, endpoint, body)

    async def upload(self, path: str, name: str | None = None, **kw: Any) -> StorageObject:
        return await asyncio.to_thread(self._sync.upload, path, name, **kw)

    async def storage(self) -> list[StorageObject]:
        return [StorageObject.model_validate(o) for o in await self._request("GET", "/storage")]
