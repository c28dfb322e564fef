"""FedML's names for fedml launch's things, where FedML's tools and scripts expect them (docs/sdk.md). No typer
here: the SDK (fedml.api) imports this."""

from __future__ import annotations

from typing import Any


def fedml_status(run: dict[str, Any]) -> str:
    """The run's state as FedML names it: ours keep their names, a run asked to stop that has not ended is
    STOPPING (so is a PREEMPTED one: FedML has no such state; it is QUEUED again once stopped), LOST (its node
    went away) is ABANDONED."""
    ours = str(run["status"])
    if run.get("stop_requested") and ours in ("QUEUED", "STARTING", "RUNNING", "PREEMPTED"):
        return "STOPPING"
    return "ABANDONED" if ours == "LOST" else ours
