"""The FedAvg server: rounds, the clients' updates, the weighted mean, over a stdlib HTTP server."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scheduler.contract.metrics import line as metric_line

from .common import MAX_BODY, FederateConfig, FederateError, _log, bytes_to_state, fedavg, state_to_bytes


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
            # The round's figures as job metrics (`fedml run metrics RUN`: a curve per round).
            _log(metric_line({"clients": len(got), "samples": samples, "round_seconds": took,
                              **({"accuracy": acc} if acc is not None else {})}, step=r))
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
