"""The CLI's HTTP client. Finds the scheduler (FEDML_SERVER, else the embedded local one, started on demand)
and maps HTTP failures to CLI exit codes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from scheduler.contract.transport import httpx, transport

from . import local
from .errors import NOT_FOUND, UNREACHABLE, USAGE, CliError

API = "/api/v1"
IDEMPOTENT = frozenset({"GET", "HEAD"})  # tried again after a transport error (Api._retried)


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name) or default))
    except ValueError:
        return default


class Api:
    def __init__(self, url: str, token: str | None, *, embedded: bool = False, timeout: float = 30.0,
                 retries: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.embedded = embedded
        self._restarted = False
        self.retries = retries if retries is not None else _env_int("FEDML_RETRIES", 3)
        if token and not (token.isascii() and token.isprintable() and " " not in token):
            # An HTTP header carries ASCII only: such a key cannot be ours (a paste with a stray character?)
            raise CliError("the API key holds characters no API key has (spaces, control or non-ASCII characters); "
                           "check FEDML_API_KEY or what was pasted", USAGE)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0),
                                 transport=transport(self.url))

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code < 400:
            return r
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if isinstance(detail, list):  # FastAPI's request validation errors
            detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
        if r.status_code == 401:
            raise CliError(f"not authenticated with the scheduler at {self.url}: {detail}", UNREACHABLE)
        if r.status_code == 403:
            raise CliError(f"not allowed: {detail}", UNREACHABLE)
        if r.status_code == 404:
            raise CliError(str(detail), NOT_FOUND)
        if r.status_code in (400, 409, 413, 422):
            raise CliError(str(detail), USAGE)
        if r.status_code == 503:
            raise CliError(f"the scheduler cannot take this now: {detail}", UNREACHABLE)
        raise CliError(f"scheduler error (HTTP {r.status_code}): {detail}")

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        path = _safe_path(path)
        try:
            return self._check(self.http.request(method, API + path, **kw))
        except httpx.ConnectError:
            if self.embedded and not self._restarted:
                self._reconnect()
                return self.request(method, path, **kw)
            if method in IDEMPOTENT and self.retries > 1:
                return self._retried(method, path, kw)
            raise CliError(f"cannot reach the scheduler at {self.url}", UNREACHABLE) from None
        except httpx.TransportError as exc:
            if method in IDEMPOTENT and self.retries > 1:
                return self._retried(method, path, kw)
            raise CliError(f"cannot reach the scheduler at {self.url}: {exc or type(exc).__name__}",
                           UNREACHABLE) from None

    def _retried(self, method: str, path: str, kw: dict[str, Any]) -> httpx.Response:
        """A read that failed in transit (a scheduler restarting, a dropped connection), tried again with
        backoff (0.2 s, 0.4 s ... at most 2 s; FEDML_RETRIES attempts in all). Writes are never repeated
        here: a create that reached the scheduler must not run twice. tenacity is imported only now."""
        import tenacity

        try:
            for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(self.retries - 1),
                                             wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
                                             retry=tenacity.retry_if_exception_type(httpx.TransportError),
                                             reraise=True):
                with attempt:
                    r = self.http.request(method, API + path, **kw)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the scheduler at {self.url} ({self.retries} tries): "
                           f"{exc or type(exc).__name__}", UNREACHABLE) from None
        return self._check(r)

    def _reconnect(self) -> None:
        """The local scheduler's state file pointed at a dead address: start it again."""
        self._restarted = True
        url, token = local.ensure_running()
        self.__init__(url, token, embedded=True, retries=self.retries)  # type: ignore[misc]
        self._restarted = True

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw).json()

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw).json()

    def put(self, path: str, **kw: Any) -> Any:
        return self.request("PUT", path, **kw).json()

    def has_blob(self, sha: str) -> bool:
        try:
            r = self.http.head(f"{API}/blobs/{sha}")
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the scheduler at {self.url}: {exc}", UNREACHABLE) from None
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    def put_blob(self, sha: str, path: str, *, show_progress: bool = True, what: str = "the workspace") -> None:
        from .progress import Progress, read_chunks

        size = os.path.getsize(path)
        with Progress(f"uploading {what}", size, enabled=show_progress) as bar:
            self.request("PUT", f"/blobs/{sha}", content=read_chunks(path, bar),
                         headers={"content-type": "application/gzip", "content-length": str(size)},
                         timeout=httpx.Timeout(600.0, connect=5.0))

    def download(self, path: str, out: Any, what: str, *, total: int | None = None) -> int:
        """GET `path` into the file `out`, streamed, with progress on a terminal. Returns the bytes written."""
        from .progress import Progress

        path = _safe_path(path)
        n = 0
        try:
            with self.http.stream("GET", API + path, timeout=httpx.Timeout(600.0, connect=5.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                size = int(r.headers.get("content-length") or 0) or total
                with Progress(f"downloading {what}", size) as bar:
                    for chunk in r.iter_bytes(1 << 20):
                        out.write(chunk)
                        n += len(chunk)
                        bar.advance(len(chunk))
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the scheduler at {self.url}: {exc or type(exc).__name__}",
                           UNREACHABLE) from None
        return n

    def _log_bytes(self, run_id: str, params: dict[str, Any]) -> Iterator[bytes]:
        """GET a run's log, as the bytes arrive."""
        path = _safe_path(f"/runs/{run_id}/logs")
        try:
            with self.http.stream("GET", API + path, params=params,
                                  timeout=httpx.Timeout(None, connect=5.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                yield from r.iter_bytes()
        except httpx.TransportError as exc:
            raise CliError(f"lost the connection to the scheduler at {self.url}: {exc}", UNREACHABLE) from None

    def stream_log_text(self, run_id: str, *, after: int = -1, tail: int | None = None, follow: bool = False,
                        rank: int | None = None) -> Iterator[str | dict[str, Any]]:
        """A run's log for display (the scheduler's text form): pieces of whole records "pos TAB rank TAB o|e|f
        TAB line" (stdout, stderr, the scheduler's own), each ending in a newline, as they arrive; then the end
        record. Printing one is a split or a substitution, not a JSON object per line (show.write_text)."""
        buf = b""
        for chunk in self._log_bytes(run_id, {**self._log_params(after, tail, follow, rank), "format": "text"}):
            buf += chunk
            cut = buf.rfind(b"\n") + 1
            if not cut:
                continue
            # Whole records only: "\n" never falls inside a UTF-8 sequence, so the cut decodes cleanly.
            text, buf = buf[:cut].decode("utf-8", "replace"), buf[cut:]
            end = 0 if text.startswith("end\t") else text.find("\nend\t") + 1 or -1
            if end >= 0:  # the last record: the run's outcome
                yield text[:end]
                yield json.loads(text[end + 4:])
                return
            yield text
        if buf.startswith(b"end\t"):
            yield json.loads(buf[4:])

    @staticmethod
    def _log_params(after: int, tail: int | None, follow: bool, rank: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"after": after, "follow": follow}
        if tail is not None:
            params["tail"] = tail
        if rank is not None:
            params["rank"] = rank
        return params

    def runs_named(self, name: str, status: list[str] | None = None) -> list[dict[str, Any]]:
        """The runs called `name` among the newest 10,000 the caller may see, newest first (FedML names runs by
        name: `-r NAME`, `run_status(run_name=...)`)."""
        return [r for r in self.get("/runs", params={"status": status or [], "limit": 10_000}) if r["name"] == name]

    def log_page(self, run_id: str, num: int, size: int, rank: int | None = None) -> list[dict[str, Any]]:
        """Page `num` (from 1) of `size` lines of a run's log (FedML's paging): the lines at positions
        (num-1)*size .. num*size-1, as NDJSON records. The rest of the log is not read."""
        out: list[dict[str, Any]] = []
        stream = self.stream_logs(run_id, after=(num - 1) * size - 1, rank=rank)
        try:
            for rec in stream:
                if rec.get("end") or rec["pos"] >= num * size:
                    break
                out.append(rec)
        finally:
            stream.close()
        return out

    def stream_logs(self, run_id: str, *, after: int = -1, tail: int | None = None, follow: bool = False,
                    rank: int | None = None) -> Iterator[dict[str, Any]]:
        for chunk in self.stream_log_chunks(run_id, after=after, tail=tail, follow=follow, rank=rank):
            yield from chunk

    def stream_log_chunks(self, run_id: str, *, after: int = -1, tail: int | None = None, follow: bool = False,
                          rank: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """The NDJSON records (LogRow objects, then the end record) as lists, one per piece received."""
        # Split on "\n" only: NDJSON escapes it inside strings, but not U+2028, U+0085 or "\r", which
        # str.splitlines (and httpx's iter_lines) would split a record at.
        # A chunk's records are decoded in one call (as one JSON array): a call per line cost most of
        # what reading a finished run's log took.
        buf = b""
        for chunk in self._log_bytes(run_id, self._log_params(after, tail, follow, rank)):
            buf += chunk
            *records, buf = buf.split(b"\n")
            records = [line for line in records if line.strip()]
            if records:
                yield json.loads(b"[" + b",".join(records) + b"]")
        if buf.strip():
            yield [json.loads(buf)]


def _safe_path(path: str) -> str:
    """IDs and names typed by the user go into the path: an empty one is a usage error (not a request for the
    list), and '?', '#', '%' or spaces in one are sent as part of it (not as a query)."""
    from urllib.parse import quote

    segments = path.split("/")[1:]
    if any(not seg.strip() for seg in segments):
        raise CliError("an empty run, node, key or endpoint name was given", USAGE)
    return quote(path, safe="/")


def credentials() -> dict[str, str] | None:
    from scheduler.contract import paths

    try:
        data = json.loads(paths.credentials_file().read_text())
        return {"server": str(data["server"]), "api_key": str(data["api_key"])}
    except (OSError, ValueError, KeyError):
        return None


def target() -> dict[str, Any]:
    """Which scheduler commands go to, without asking it: {"kind": ..., "url": ...}."""
    server = os.environ.get("FEDML_SERVER")
    if server:
        return {"kind": "remote (FEDML_SERVER)", "url": server}
    creds = credentials()
    if creds:
        return {"kind": "remote (fedml login)", "url": creds["server"]}
    return {"kind": "local", "url": None}


def connect(*, start: bool = True) -> Api:
    """The scheduler to talk to: FEDML_SERVER (+ FEDML_API_KEY), else what `fedml login` stored, else the
    local one (started if needed)."""
    server = os.environ.get("FEDML_SERVER")
    if server:
        return Api(server, os.environ.get("FEDML_API_KEY"))
    creds = credentials()
    if creds:
        return Api(creds["server"], os.environ.get("FEDML_API_KEY") or creds["api_key"])
    if start:
        found = local.probably_running()  # trusted without a round trip; Api reconnects if it is wrong
        url, token = found if found else local.ensure_running()
    else:
        url, token = local.running()
    return Api(url, token, embedded=True)
