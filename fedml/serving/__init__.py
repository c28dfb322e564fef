"""FedML's predictor classes, for the replicas of a deployed model (`fedml model deploy`): a FedML
`main_entry.py` runs unchanged.

    from fedml.serving import FedMLPredictor, FedMLInferenceRunner

    class Bot(FedMLPredictor):
        def predict(self, request: dict) -> dict:
            return {"generated_text": "..."}

    if __name__ == "__main__":
        FedMLInferenceRunner(Bot()).run()

The runner answers POST /predict (the JSON body given to `predict`, its answer sent back as JSON; an iterator
or generator is streamed as it is produced) and GET /ready (200 once `ready()` is true, else 503), on
$FEDML_SERVE_HOST:$PORT, which the serve supervisor gives each replica (FedML's default 0.0.0.0:2345 otherwise).
Standard library only: a node needs nothing else installed. A request body is at most FEDML_PREDICT_MAX_BYTES
(64 MiB); a client that stops sending is dropped after 60 s.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FedMLInferenceRunner", "FedMLPredictor"]

MAX_BODY = int(os.environ.get("FEDML_PREDICT_MAX_BYTES", str(64 << 20)))


class FedMLPredictor:
    """Subclass it and implement `predict(request)` (or `async_predict`). `ready()` says when the model can
    answer (GET /ready); by default as soon as the runner starts."""

    def __init__(self) -> None:
        cls = type(self)
        if cls.predict is FedMLPredictor.predict and cls.async_predict is FedMLPredictor.async_predict:
            raise NotImplementedError("At least one of the predict methods must be implemented.")

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def async_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def ready(self) -> bool:
        return True


class FedMLInferenceRunner:
    """Serve a predictor over HTTP until the process is stopped (SIGTERM from the supervisor)."""

    def __init__(self, client_predictor: FedMLPredictor, host: str = "0.0.0.0", port: int = 2345) -> None:
        self.client_predictor = client_predictor
        self.host = os.environ.get("FEDML_SERVE_HOST") or host
        self.port = int(os.environ.get("PORT") or os.environ.get("FEDML_SERVE_PORT") or port)

    def run(self) -> None:
        server = ThreadingHTTPServer((self.host, self.port), _handler(self.client_predictor))
        server.daemon_threads = True
        sys.stdout.write(f"fedml.serving: {type(self.client_predictor).__name__} on {self.host}:{self.port} "
                         f"(POST /predict, GET /ready)\n")
        sys.stdout.flush()
        try:
            server.serve_forever()
        finally:
            server.server_close()


def _answer(predictor: FedMLPredictor, body: Any, accept: str) -> Any:
    if type(predictor).predict is not FedMLPredictor.predict:
        out = predictor.predict(body, accept) if _takes_two(predictor.predict) else predictor.predict(body)
    else:
        out = predictor.async_predict(body)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(x: Any) -> Any:
    return await x


def _takes_two(fn: Any) -> bool:
    """FedML calls predict(request, header) when the method takes a second argument."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def _handler(predictor: FedMLPredictor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a client may take to send its request

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass  # one line per request would flood the run's log

        def _send(self, code: int, doc: Any) -> None:
            data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/ready", "/health"):
                try:
                    ok = bool(predictor.ready())
                except Exception as exc:  # a broken ready() is "not ready", said in the answer
                    self._send(503, {"status": "NotReady", "detail": str(exc)[:500]})
                    return
                self._send(200 if ok else 503, {"status": "Success" if ok else "NotReady"})
                return
            self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] != "/predict":
                self._send(404, {"detail": "Not Found"})
                return
            try:
                size = int(self.headers.get("content-length") or "0")
            except ValueError:
                size = -1
            if size < 0 or size > MAX_BODY:
                self.close_connection = True
                self._send(413 if size > MAX_BODY else 400,
                           {"detail": f"a request body of up to {MAX_BODY} bytes, with its content-length"})
                return
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
            except ValueError as exc:
                self._send(400, {"detail": f"the body is not JSON: {exc}"})
                return
            try:
                out = _answer(predictor, body, self.headers.get("accept", "application/json"))
            except Exception as exc:  # the model's error: a 500 that says it, and the traceback in the run's log
                traceback.print_exc()
                self._send(500, {"detail": f"{type(exc).__name__}: {exc}"[:2000]})
                return
            if isinstance(out, (Iterator, AsyncIterator)) or inspect.isgenerator(out):
                self._stream(out)
                return
            if isinstance(out, (bytes, bytearray)):
                self._send(200, bytes(out))
                return
            try:
                self._send(200, out)
            except (TypeError, ValueError) as exc:
                self._send(500, {"detail": f"predict returned what is not JSON: {exc}"[:2000]})

        def _stream(self, out: Any) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            items = _sync(out) if isinstance(out, AsyncIterator) else out
            try:
                for item in items:
                    data = item if isinstance(item, bytes) else (item if isinstance(item, str)
                                                                 else json.dumps(item)).encode()
                    if data:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
            except Exception:  # the answer has started: end it, say why in the log
                traceback.print_exc()
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def _sync(agen: AsyncIterator[Any]) -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()
