"""Where local state lives: FEDML_HOME, else the user data dir (platformdirs)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("FEDML_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("fedml-launch", appauthor=False))


def local_dir(base: Path | None = None) -> Path:
    """The embedded local scheduler's directory: database, blobs, state file, logs, its agent."""
    return (base or home()) / "local"


def state_file(base: Path | None = None) -> Path:
    return local_dir(base) / "scheduler.json"


def token_file(base: Path | None = None) -> Path:
    return local_dir(base) / "token"


def credentials_file(base: Path | None = None) -> Path:
    """Client credentials from `fedml login KEY --server URL` (mode 0600)."""
    return (base or home()) / "credentials.json"


def node_home(name: str, base: Path | None = None) -> Path:
    """State of the agent started by `fedml login ... --node --name NAME`."""
    return (base or home()) / "nodes" / name
