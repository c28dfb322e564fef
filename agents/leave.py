"""`python -m agents.leave HOME`: what leaving for good means on a node whose agent has already stopped.

The agent leaves its jobs running when it stops (it re-attaches after a restart); `fedml logout` runs this so the
jobs stop too and the scheduler forgets the node. The CLI runs it as a process rather than importing the agent
(the CLI uses agents and runtimes only across a process boundary). Warnings go to stderr, one per line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .client import AgentClient, Refused, Unreachable


def stop_jobs(home: Path, grace: float) -> None:
    from runtime.process import ProcessRuntime

    runs = home / "runs"
    for d in sorted(runs.iterdir()) if runs.exists() else []:
        try:
            state = json.loads((d / "agent.json").read_text()).get("handle")
        except (OSError, ValueError):
            continue
        handle = ProcessRuntime().reattach(state, home / "jobs" / d.name) if state else None
        if handle is not None and handle.poll() is None:
            handle.stop(grace)


def deregister(home: Path) -> list[str]:
    try:
        node = json.loads((home / "node.json").read_text())
        token = (home / "node_token").read_text().strip()
        server, node_id = node["server"], node["id"]
    except (OSError, ValueError, KeyError):
        return []
    c = AgentClient(server, token)
    try:
        c.deregister(node_id)
    except (Unreachable, Refused) as exc:
        return [f"could not remove node {node.get('name', home.name)} from the scheduler: {exc}"]
    finally:
        c.close()
    return []


def leave(home: Path, grace: float) -> list[str]:
    if (home / "pool.json").exists():  # a Kubernetes pool: delete its Jobs, remove its nodes
        from .k8s_agent import leave as leave_pool

        return leave_pool(home, grace)
    stop_jobs(home, grace)
    return deregister(home)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m agents.leave NODE_HOME\n")
        return 2
    for warning in leave(Path(args[0]), float(os.environ.get("FEDML_STOP_GRACE", "10"))):
        sys.stderr.write(f"warning: {warning}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
