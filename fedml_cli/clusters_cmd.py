"""`fedml cluster ...`: named sets of nodes (FedML's clusters) that `fedml launch -c NAME` places on.

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .errors import NOT_FOUND, CliError
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json

cluster_app = typer.Typer(
    help="Clusters: named sets of nodes. An admin makes one (`create NAME NODE...` or `--label k=v`); "
         "`fedml launch -c NAME job.yaml` runs only there; stop/kill drain its nodes and stop its runs; "
         "autostop drains its nodes once idle.",
    no_args_is_help=True, rich_markup_mode=None)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The cluster's name.")]


def status_of(c: dict[str, Any]) -> str:
    """FedML's cluster states: RUNNING (a run on it), IDLE (ready, nothing running), STOPPED (all drained)."""
    if c["nodes"] and c["draining"] == len(c["nodes"]):
        return "STOPPED"
    return "RUNNING" if c["active_runs"] else "IDLE"


def _show(clusters: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json([{**c, "status": status_of(c)} for c in clusters])
        return
    if not clusters:
        _err("no clusters (an admin makes one: fedml cluster create NAME NODE...)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("CLUSTER", "STATUS", "NODES", "GPUS FREE/TOTAL", "RUNS", "AUTOSTOP"):
        table.add_column(col)
    for c in clusters:
        table.add_row(c["name"], status_of(c), ", ".join(n["name"] for n in c["nodes"]),
                      f"{c['gpus_free']}/{c['gpus']}", str(c["active_runs"]),
                      f"{c['autostop_minutes']:g} min" if c.get("autostop_minutes") else "-")
    (Console() if sys.stdout.isatty() else Console(width=250)).print(table)


@cluster_app.command("create")
def cluster_create(
    name: NameArg,
    nodes: Annotated[list[str] | None, typer.Argument(metavar="[NODE]...", help="Nodes (names or ids).")] = None,
    label: Annotated[str | None, typer.Option("--label", metavar="KEY=VALUE",
                                              help="Also every node carrying this label now.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Put nodes in the cluster NAME (made if new; admin). Only an admin can: a node cannot join one itself."""
    from .api import connect

    c = connect().post(f"/clusters/{name}", json={"nodes": nodes or [], "label": label})
    if as_json:
        _print_json(c)
    else:
        _err(f"Cluster {name}: {len(c['nodes'])} node(s), {c['gpus']} GPU(s). Launch on it: fedml launch -c {name} "
             "job.yaml")


@cluster_app.command("list")
def cluster_list(as_json: JsonOpt = False) -> None:
    """The clusters: nodes, free GPUs, runs, autostop."""
    from .api import connect

    _show(connect().get("/clusters"), as_json)


@cluster_app.command("status")
def cluster_status(name: NameArg, as_json: JsonOpt = False) -> None:
    """One cluster and its nodes."""
    from .api import connect

    _show([connect().get(f"/clusters/{name}")], as_json)


@cluster_app.command("exists")
def cluster_exists(name: NameArg) -> None:
    """Exit 0 if the cluster exists, 4 if not."""
    from .api import connect

    try:
        connect().get(f"/clusters/{name}")
    except CliError as exc:
        if exc.code == NOT_FOUND:
            raise typer.Exit(NOT_FOUND) from None
        raise


def _each(names: list[str] | None, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    from .api import connect

    api = connect()
    targets = names if names is not None else [c["name"] for c in api.get("/clusters")]
    return [api.post(f"/clusters/{n}/{path}", params=params) for n in targets]


@cluster_app.command("stop")
def cluster_stop(name: NameArg, as_json: JsonOpt = False) -> None:
    """Drain the cluster's nodes and stop its runs (those queued for it too); `start` takes runs again."""
    out = _each([name], "stop")
    if as_json:
        _print_json(out[0])
    else:
        _err(f"Cluster {name} stopped: {len(out[0]['nodes'])} node(s) drained; its runs were asked to stop.")


@cluster_app.command("kill")
def cluster_kill(name: NameArg, as_json: JsonOpt = False) -> None:
    """Stop the cluster and dissolve it: its nodes stay drained and belong to no cluster."""
    out = _each([name], "stop", {"kill": "true"})
    if as_json:
        _print_json(out[0])
    else:
        _err(f"Cluster {name} killed: its nodes were drained and left it.")


@cluster_app.command("start")
def cluster_start(name: NameArg, as_json: JsonOpt = False) -> None:
    """Undrain the cluster's nodes."""
    out = _each([name], "start")
    if as_json:
        _print_json(out[0])
    else:
        _err(f"Cluster {name} started: {len(out[0]['nodes'])} node(s) take runs.")


@cluster_app.command("autostop")
def cluster_autostop(
    name: NameArg,
    minutes: Annotated[float, typer.Option("--time", "-t", min=0, metavar="MIN",
                                           help="Minutes without a run before a node is drained (0: off).")],
    stop_agents: Annotated[bool, typer.Option("--stop-agents", help="Then tell the node's agent to exit too (the "
                                                                    "machine leaves until `fedml login --node` "
                                                                    "on it again).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Drain each node of the cluster once it has had no run for MIN minutes (`start` undrains); with
    --stop-agents its agent exits then."""
    out = _each([name], "autostop", {"minutes": minutes, "stop_agents": stop_agents} if minutes > 0 else None)
    if as_json:
        _print_json(out[0])
    else:
        _err(f"Cluster {name}: " + (f"a node is drained after {minutes:g} min without a run"
                                    + (", and its agent exits." if stop_agents else ".") if minutes > 0
                                    else "autostop is off."))


def _every(verb: str, path: str, params: dict[str, Any] | None) -> None:
    def command(as_json: JsonOpt = False) -> None:
        out = _each(None, path, params)
        if as_json:
            _print_json(out)
        else:
            _err(f"{verb}: {len(out)} cluster(s).")

    cluster_app.command(verb, help=f"`{verb[:-3]}` every cluster.")(command)


_every("stopall", "stop", None)
_every("killall", "stop", {"kill": "true"})
_every("startall", "start", None)
