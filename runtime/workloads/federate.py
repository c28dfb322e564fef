"""Federated averaging (FedAvg) for `job_type: federate` runs: a server and N clients that job code imports.

    from runtime.workloads.federate import FedAvgServer, FedAvgClient, FederateConfig

Where it runs. A federate run is one gang of 1+N nodes: rank 0 runs the YAML's `server_job`, ranks 1..N its
`job`. Every rank gets FEDML_CLIENT_RANK (0 = server, 1..N = clients), FEDML_NUM_NODES (1+N), the server's
address FEDML_NODE_0_ADDR (= FEDML_SERVER_ADDR) and a port chosen by the scheduler, FEDML_NODE_0_PORT; the
YAML's `federate: {clients, rounds, min_clients}` arrive as FEDML_ENV_FEDERATE_CLIENTS / _ROUNDS / _MIN_CLIENTS
(`FederateConfig.from_env()` reads them all).

Transport: direct HTTP, no relay. The clients talk straight to the server (not through the scheduler): the
server runs a stdlib `ThreadingHTTPServer` on FEDML_NODE_0_ADDR:FEDML_NODE_0_PORT, the clients use `urllib`.
Model weights travel as `torch.save(state_dict)` bytes (loaded back with `weights_only=True`). No extra
dependencies, and the scheduler never sees model bytes. The price: the client nodes must be able to reach the
server node's address and port (true on one LAN / one machine; across NAT use a VPN or an SSH tunnel).

Protocol (all JSON except the weights):
    GET  /round[?client=k][&after=r&wait=s]
                                     -> {"round": r, "done": bool, "failed": str|null, "clients": N, "rounds": R}
                                        (with `after`, held until a round after r opens or `wait` s pass)
    GET  /weights?round=r            -> the global weights of round r (bytes); 409 when r is not the open round
    POST /update?round=r&client=k&samples=n   body: the client's trained state_dict (bytes)
                                     -> 200 {"accepted": true}; 409 when round r is closed (a late update,
                                        dropped), 400 for a bad client id / body
Server, for r = 1..R: open round r with the current global weights; wait until all N clients posted an update
for r, or `round_timeout` seconds (default 60) passed, or at least min_clients reported and every other
client is known dead (it polled before, then fell silent for `silence_timeout`, default 10 s: clients poll
GET /round?client=k every second from a heartbeat thread, also while they train); with fewer than `min_clients` updates it prints
`round r: only K of N clients reported, fewer than min_clients M`, tells the clients (`failed`) and exits
non-zero; else the new global weights are the average of the updates weighted by their sample counts
(FedAvg), `evaluate(model)` scores them and it prints `round r global accuracy X.XXXX (K clients)`.
After round R: `final accuracy X.XXXX`, the model is saved to $FEDML_ARTIFACT_DIR (kept as the run's
artifact), and the server keeps answering `done` for `linger` seconds (default 3) so clients see it, then
returns 0. A client that dies only makes its rounds proceed with the rest (if they are at least min_clients).

Client: polls GET /round (retrying while the server starts, up to `connect_timeout`, default 60 s); for each
newly opened round it downloads the weights, runs `train(model, round)` on its own data and posts the update;
it stops (returns 0) when the server says done. If the server stops answering for `lost_timeout` seconds
(default 30) or a round does not advance within `round_wait` seconds, it prints why and returns non-zero.
Every wait is bounded.

Run by hand on one machine (one shell for the server, one per client):
    FEDML_NODE_0_ADDR=127.0.0.1 FEDML_NODE_0_PORT=29600 FEDML_ENV_FEDERATE_CLIENTS=3 FEDML_CLIENT_RANK=0 ...
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["FedAvgClient", "FedAvgServer", "FederateConfig", "FederateError", "fedavg"]

MAX_BODY = 1 << 30  # 1 GiB: no model this is for comes close


class FederateError(RuntimeError):
    """A federated run cannot go on (too few clients, server gone, bad configuration)."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise FederateError(f"{name}={value!r} is not an integer") from None


@dataclass
class FederateConfig:
    """Where the server is and the shape of the run, as the scheduler describes it in the environment."""

    host: str = "127.0.0.1"
    port: int = 0
    rank: int = 0
    clients: int = 1
    rounds: int = 1
    min_clients: int = 1

    @classmethod
    def from_env(cls) -> FederateConfig:
        host = (os.environ.get("FEDML_NODE_0_ADDR") or os.environ.get("FEDML_SERVER_ADDR") or "127.0.0.1").strip()
        port = _env_int("FEDML_NODE_0_PORT")
        if port is None:
            raise FederateError("FEDML_NODE_0_PORT is not set: run this as a `job_type: federate` job, or set "
                                "FEDML_NODE_0_ADDR / FEDML_NODE_0_PORT by hand")
        num_nodes = _env_int("FEDML_NUM_NODES")
        clients = _env_int("FEDML_ENV_FEDERATE_CLIENTS", (num_nodes - 1) if num_nodes else None)
        if clients is None or clients < 1:
            raise FederateError("the number of clients is unknown: set federate.clients in the job YAML "
                                "(FEDML_ENV_FEDERATE_CLIENTS)")
        rounds = _env_int("FEDML_ENV_FEDERATE_ROUNDS", 1) or 1
        min_clients = _env_int("FEDML_ENV_FEDERATE_MIN_CLIENTS", clients) or clients
        rank = _env_int("FEDML_CLIENT_RANK", 0) or 0
        return cls(host=host, port=port, rank=rank, clients=clients, rounds=rounds,
                   min_clients=max(1, min(min_clients, clients)))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# --- weights as bytes ---------------------------------------------------------------------------------------

def state_to_bytes(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def bytes_to_state(data: bytes) -> dict[str, Any]:
    import torch

    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError("not a state_dict")
    return state


def fedavg(updates: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The average of the state_dicts, each weighted by its sample count. Integer tensors (counters such as
    BatchNorm's num_batches_tracked) are taken from the update with the most samples."""
    import torch

    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(max(n, 0) for n, _ in updates))
    weights = [(max(n, 0) / total) if total > 0 else 1.0 / len(updates) for n, _ in updates]
    biggest = max(range(len(updates)), key=lambda i: updates[i][0])
    out: dict[str, Any] = {}
    for key, ref in updates[0][1].items():
        if not torch.is_floating_point(ref):
            out[key] = updates[biggest][1][key].clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for w, (_, state) in zip(weights, updates, strict=True):
            acc += w * state[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


# --- server -------------------------------------------------------------------------------------------------

class FedAvgServer:
    """Runs R FedAvg rounds over N clients; `run()` returns the process exit code (0 = all rounds done)."""

    def __init__(self, model: Any, *, clients: int, rounds: int, min_clients: int | None = None,
                 evaluate: Callable[[Any], float] | None = None, host: str = "127.0.0.1", port: int = 0,
                 round_timeout: float = 60.0, silence_timeout: float = 10.0, linger: float = 3.0,
                 artifact_name: str = "model_federate.pt", artifact_dir: str | None = None) -> None:
        if clients < 1 or rounds < 1:
            raise FederateError(f"need at least 1 client and 1 round (got clients={clients}, rounds={rounds})")
        self.model = model
        self.clients = clients
        self.rounds = rounds
        self.min_clients = max(1, min(min_clients if min_clients is not None else clients, clients))
        self.evaluate = evaluate
        self.host, self.port = host, port
        self.round_timeout = round_timeout
        self.silence_timeout = silence_timeout
        self.linger = linger
        self.artifact_name = artifact_name
        self.artifact_dir = artifact_dir if artifact_dir is not None else os.environ.get("FEDML_ARTIFACT_DIR")
        self.history: list[tuple[int, float | None, int]] = []  # (round, accuracy, clients that reported)
        self._cond = threading.Condition()
        self._round = 0
        self._done = False
        self._open = False
        self._failed: str | None = None
        self._weights = b""
        self._updates: dict[int, tuple[int, bytes]] = {}
        self._seen: dict[int, float] = {}  # client -> when it last polled (its heartbeat)
        self._httpd: ThreadingHTTPServer | None = None

    @classmethod
    def from_env(cls, model: Any, **kw: Any) -> FedAvgServer:
        c = FederateConfig.from_env()
        kw.setdefault("min_clients", c.min_clients)
        return cls(model, clients=c.clients, rounds=c.rounds, host=c.host, port=c.port, **kw)

    def _rest_gone(self) -> bool:
        """Whether every client that has not reported this round was seen once and then fell silent for
        `silence_timeout` (a dead client: its heartbeats stopped), so the round need not wait any longer."""
        now = time.monotonic()
        return all(k in self._seen and now - self._seen[k] > self.silence_timeout
                   for k in range(1, self.clients + 1) if k not in self._updates)

    # HTTP side (runs on the server's request threads)
    def _status(self, client: int | None = None, after: int | None = None, wait: float = 0.0) -> dict[str, Any]:
        """With `after`, a long poll: answers once a round later than `after` opens (or the server is done),
        or after `wait` seconds, so clients learn of a new round at once without polling fast."""
        with self._cond:
            if client is not None and 1 <= client <= self.clients:
                self._seen[client] = time.monotonic()
            if after is not None:
                self._cond.wait_for(lambda: self._done or (self._round > after and self._open),
                                    timeout=max(0.0, min(wait, 10.0)))
            return {"round": self._round, "done": self._done, "failed": self._failed, "clients": self.clients,
                    "rounds": self.rounds}

    def _weights_for(self, r: int) -> bytes | None:
        with self._cond:
            return self._weights if r == self._round and self._open and not self._done else None

    def _accept(self, r: int, client: int, samples: int, body: bytes) -> tuple[int, str]:
        if not 1 <= client <= self.clients:
            return 400, f"client must be 1..{self.clients}"
        if samples < 0:
            return 400, "samples must be >= 0"
        try:
            bytes_to_state(body)
        except Exception as e:  # noqa: BLE001 - any bad body is the client's error
            return 400, f"the body is not a torch state_dict: {e}"
        with self._cond:
            if self._done or not self._open or r != self._round:
                return 409, f"round {r} is closed (open round: {self._round}, done: {self._done})"
            self._updates[client] = (samples, body)
            self._cond.notify_all()
        return 200, "accepted"

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: job logs stay readable
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, obj: Any) -> None:
                self._send(code, json.dumps(obj).encode())

            def _query(self) -> tuple[str, dict[str, str]]:
                u = urllib.parse.urlsplit(self.path)
                return u.path, {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}

            def do_GET(self) -> None:  # noqa: N802
                path, q = self._query()
                if path == "/round":
                    try:
                        client = int(q["client"]) if "client" in q else None
                        after = int(q["after"]) if "after" in q else None
                        wait = float(q.get("wait", "0"))
                    except ValueError:
                        return self._json(400, {"error": "client, after and wait must be numbers"})
                    return self._json(200, server._status(client, after, wait))
                if path == "/weights":
                    try:
                        r = int(q.get("round", ""))
                    except ValueError:
                        return self._json(400, {"error": "round must be an integer"})
                    data = server._weights_for(r)
                    if data is None:
                        return self._json(409, {"error": f"round {r} is not open", **server._status()})
                    return self._send(200, data, "application/octet-stream")
                self._json(404, {"error": f"no route {path}"})

            def do_POST(self) -> None:  # noqa: N802
                path, q = self._query()
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    return self._json(400, {"error": "a Content-Length up to 1 GiB is required"})
                body = self.rfile.read(length)
                if path != "/update":
                    return self._json(404, {"error": f"no route {path}"})
                try:
                    r, client, samples = int(q["round"]), int(q["client"]), int(q.get("samples", "0"))
                except (KeyError, ValueError):
                    return self._json(400, {"error": "round, client and samples must be integers"})
                code, msg = server._accept(r, client, samples, body)
                self._json(code, {"accepted": code == 200, "message": msg})

        return Handler

    def _bind(self) -> ThreadingHTTPServer:
        handler = self._make_handler()
        try:
            httpd = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as e:
            if e.errno == 99 or "assign requested address" in str(e).lower():  # NAT'd address: bind all
                httpd = ThreadingHTTPServer(("0.0.0.0", self.port), handler)
            else:
                raise FederateError(f"cannot listen on {self.host}:{self.port}: {e}") from e
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        return httpd

    def _finish(self, failed: str | None) -> None:
        with self._cond:
            self._done, self._failed = True, failed
            self._weights = b""
            self._cond.notify_all()
        time.sleep(self.linger)  # let polling clients see `done` (or why it failed)

    def run(self) -> int:
        self._httpd = self._bind()
        thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        _log(f"federate server listening on {self.host}:{self.port}: {self.clients} clients, {self.rounds} "
             f"rounds, min_clients {self.min_clients}, round timeout {self.round_timeout:g} s")
        try:
            return self._rounds()
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()

    def _rounds(self) -> int:
        acc: float | None = None
        for r in range(1, self.rounds + 1):
            weights = state_to_bytes(self.model.state_dict())
            started = time.monotonic()
            with self._cond:
                self._updates, self._weights, self._round, self._open = {}, weights, r, True
                self._cond.notify_all()
                deadline = started + self.round_timeout
                while len(self._updates) < self.clients and (left := deadline - time.monotonic()) > 0:
                    if len(self._updates) >= self.min_clients and self._rest_gone():
                        break
                    self._cond.wait(min(left, 0.5))
                gone = len(self._updates) < self.clients and time.monotonic() < deadline
                got = dict(self._updates)
                self._open = False  # closed: its weights are no longer served, late updates get 409
                self._weights = b""
                self._updates = {}
            took = time.monotonic() - started
            if len(got) < self.min_clients:
                msg = (f"round {r}: only {len(got)} of {self.clients} clients reported within "
                       f"{self.round_timeout:g} s, fewer than min_clients {self.min_clients}")
                _log(f"ERROR: {msg}")
                print(f"federate: {msg}", file=sys.stderr, flush=True)
                self._finish(msg)
                return 1
            missing = sorted(set(range(1, self.clients + 1)) - set(got))
            if missing:
                why = (f"went silent (no heartbeat for {self.silence_timeout:g} s)" if gone
                       else f"did not report within {self.round_timeout:g} s")
                _log(f"round {r}: clients {missing} {why}; averaging the {len(got)} that did")
            updates = [(n, bytes_to_state(b)) for _, (n, b) in sorted(got.items())]
            self.model.load_state_dict(fedavg(updates))
            acc = float(self.evaluate(self.model)) if self.evaluate else None
            self.history.append((r, acc, len(got)))
            samples = sum(n for n, _ in updates)
            if acc is not None:
                _log(f"round {r} global accuracy {acc:.4f} ({len(got)} clients)")
            else:
                _log(f"round {r} done ({len(got)} clients)")
            _log(f"round {r}: {samples} samples from clients {sorted(got)}, {took:.2f} s")
        if acc is not None:
            _log(f"final accuracy {acc:.4f}")
        self._save()
        self._finish(None)
        return 0

    def _save(self) -> None:
        if not self.artifact_dir:
            return
        import torch

        path = Path(self.artifact_dir) / self.artifact_name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path)
        _log(f"model saved to {path}")


# --- client -------------------------------------------------------------------------------------------------

class FedAvgClient:
    """Takes part in the server's rounds; `run()` returns the process exit code (0 = the server finished)."""

    def __init__(self, model: Any, train: Callable[[Any, int], Any], *, rank: int, num_samples: int,
                 server_url: str, connect_timeout: float = 60.0, lost_timeout: float = 30.0,
                 round_wait: float = 600.0, poll_interval: float = 0.2, request_timeout: float = 30.0,
                 heartbeat: float = 1.0, poll_wait: float = 5.0) -> None:
        self.model = model
        self.train = train
        self.rank = rank
        self.num_samples = num_samples
        self.url = server_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.lost_timeout = lost_timeout
        self.round_wait = round_wait
        self.poll_interval = poll_interval
        self.poll_wait = poll_wait  # how long the server may hold a GET /round until the next round opens
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self.rounds_done: list[int] = []

    @classmethod
    def from_env(cls, model: Any, train: Callable[[Any, int], Any], *, num_samples: int,
                 **kw: Any) -> FedAvgClient:
        c = FederateConfig.from_env()
        if c.rank < 1:
            raise FederateError(f"FEDML_CLIENT_RANK={c.rank}: a client's rank is 1..N (0 is the server)")
        return cls(model, train, rank=c.rank, num_samples=num_samples, server_url=c.url, **kw)

    def _get(self, path: str, timeout: float | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout or self.request_timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _status(self, since_ok: float, first: bool, after: int = 0) -> dict[str, Any] | None:
        """GET /round, held by the server until a round after `after` opens (up to `poll_wait` s); None while
        the server does not answer (within the allowed time), else raises."""
        try:
            code, body = self._get(f"/round?client={self.rank}&after={after}&wait={self.poll_wait:g}",
                                   timeout=self.request_timeout + self.poll_wait)
            if code == 200:
                return json.loads(body)
            raise FederateError(f"GET /round answered {code}: {body[:200]!r}")
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            limit = self.connect_timeout if first else self.lost_timeout
            if time.monotonic() - since_ok > limit:
                what = "did not come up" if first else "is gone (no answer)"
                raise FederateError(f"the federate server at {self.url} {what} for {limit:g} s: {e}") from e
            return None

    def run(self) -> int:
        try:
            return self._run()
        except FederateError as e:
            _log(f"ERROR: client {self.rank}: {e}")
            print(f"federate client {self.rank}: {e}", file=sys.stderr, flush=True)
            return 1

    def _heartbeat(self, stop: threading.Event) -> None:
        """Polls GET /round?client=k every `heartbeat` seconds, also while training, so the server can tell a
        slow client from a dead one."""
        while not stop.wait(self.heartbeat):
            try:
                self._get(f"/round?client={self.rank}", timeout=min(self.request_timeout, 5.0))
            except (urllib.error.URLError, OSError):
                pass

    def _run(self) -> int:
        _log(f"federate client {self.rank}: server {self.url}, {self.num_samples} local samples")
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            return self._loop()
        finally:
            stop.set()
            beat.join(timeout=6.0)  # not left running into interpreter shutdown

    def _loop(self) -> int:
        last_ok = time.monotonic()
        last_progress = last_ok
        connected = False
        done_round = 0
        while True:
            st = self._status(last_ok, first=not connected, after=done_round)
            now = time.monotonic()
            if st is None:
                time.sleep(min(1.0, self.poll_interval * 2))
                continue
            last_ok = now
            if not connected:
                connected = True
                _log(f"client {self.rank}: connected to the server ({st['clients']} clients, {st['rounds']} rounds)")
            if st.get("done"):
                if st.get("failed"):
                    raise FederateError(f"the server failed: {st['failed']}")
                _log(f"client {self.rank}: server done after {len(self.rounds_done)} rounds of ours")
                return 0
            r = int(st.get("round", 0))
            if r > done_round:
                done_round = r
                last_progress = now
                self._one_round(r)
                continue
            if now - last_progress > self.round_wait:
                raise FederateError(f"no new round for {self.round_wait:g} s (last: {done_round})")
            time.sleep(self.poll_interval)  # the long poll timed out: ask again (briefly spaced)

    def _one_round(self, r: int) -> None:
        try:
            code, body = self._get(f"/weights?round={r}")
        except (urllib.error.URLError, OSError) as e:
            _log(f"client {self.rank}: round {r}: could not fetch the weights ({e}); waiting for the next round")
            return
        if code != 200:
            _log(f"client {self.rank}: round {r} closed before we fetched its weights; waiting for the next")
            return
        self.model.load_state_dict(bytes_to_state(body))
        started = time.monotonic()
        info = self.train(self.model, r)
        took = time.monotonic() - started
        extra = f", {info}" if info is not None else ""
        try:
            code, reply = self._post(f"/update?round={r}&client={self.rank}&samples={self.num_samples}",
                                     state_to_bytes(self.model.state_dict()))
        except (urllib.error.URLError, OSError) as e:
            _log(f"client {self.rank}: round {r}: could not send the update ({e})")
            return
        if code == 200:
            self.rounds_done.append(r)
            _log(f"client {self.rank}: round {r} trained in {took:.2f} s{extra}; update sent")
        elif code == 409:
            _log(f"client {self.rank}: round {r} update arrived late (round closed); dropped by the server")
        else:
            raise FederateError(f"POST /update for round {r} answered {code}: {reply[:200]!r}")
