"""FedML's Python names over fedml launch: `import fedml; fedml.api.launch_job("job.yaml")` and the rest of
`fedml.api` run unchanged against this self-hosted scheduler (docs/sdk.md). Only the compatibility surface lives
here; it calls the same client the `fedml` command uses. Importing it imports neither torch nor the server.

FedML's platform settings (`set_env_version`, `set_local_on_premise_platform_port`) are accepted and have no
effect: the scheduler is the one FEDML_SERVER, a stored `fedml login`, or the local one names.
"""

from __future__ import annotations

import importlib
from typing import Any

from scheduler.contract import __version__

_env_version = "release"


def set_env_version(version: str) -> None:
    """FedML's platform environment (dev/test/release): kept for scripts that set it; no effect here."""
    global _env_version
    _env_version = str(version)


def get_env_version() -> str:
    return _env_version


def set_local_on_premise_platform_port(port: int) -> None:
    """FedML's on-premise platform port: no effect here (FEDML_SERVER names the scheduler)."""


def log(metrics: dict[str, Any], step: int | None = None, customized_step_key: str | None = None,
        commit: bool = True, **kw: Any) -> None:
    """Report metrics from a job (`fedml.log({"loss": 0.3}, step=i)`): see fedml.mlops.log."""
    from . import mlops

    mlops.log(metrics, step=step, customized_step_key=customized_step_key, commit=commit, **kw)


def __getattr__(name: str) -> Any:
    if name in ("api", "mlops"):  # imported when first used: `import fedml` stays as light as it can be
        return importlib.import_module(f"fedml.{name}")
    raise AttributeError(f"module 'fedml' has no attribute {name!r}")


__all__ = ["__version__", "get_env_version", "log", "set_env_version", "set_local_on_premise_platform_port"]
