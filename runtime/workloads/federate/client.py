"""A FedAvg client: fetch the round's weights, train, send the update."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .common import FederateConfig, FederateError, _log, bytes_to_state, state_to_bytes


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
