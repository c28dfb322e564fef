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

import httpx  # noqa: E402

__all__ = ["httpx"]
