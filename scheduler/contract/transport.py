"""httpx, imported without its command-line tool.

httpx imports its own CLI (and with it click and rich) whenever those are installed: ~60 ms on every
`fedml` call. We never use httpx's CLI, so an empty stand-in takes its place before httpx is imported.
"""

import sys
import types

if "httpx" not in sys.modules:
    _stub = types.ModuleType("httpx._main", "stand-in: httpx's command-line tool is not used by fedml")

    def _no_cli() -> None:
        raise SystemExit("httpx's command-line tool is not available inside fedml")

    _stub.main = _no_cli  # type: ignore[attr-defined]
    sys.modules.setdefault("httpx._main", _stub)

import socket  # noqa: E402

import httpx  # noqa: E402

# httpx writes a request's headers and body separately; with Nagle's algorithm on, the body then waits for
# the server's delayed ACK (40 ms on Linux). Every call to the scheduler is a small request: turn it off.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def transport(url: str) -> httpx.HTTPTransport:
    # Loading the CA bundle costs ~30 ms; plain http (the local scheduler) does not need it.
    return httpx.HTTPTransport(socket_options=NODELAY, verify=url.startswith("https://"))


__all__ = ["httpx", "transport"]
