"""`fedml endpoint ...`: the endpoints that deploy/serve runs expose through the scheduler's gateway.

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from .errors import FAILED, USAGE
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json
from .show import stop_said, wait_ended

endpoint_app = typer.Typer(
    help="Model endpoints (job_type: serve or deploy): list, status, scale, delete, call. Requests reach a "
         "ready replica through the scheduler's gateway at POST /inference/NAME.",
    no_args_is_help=True, rich_markup_mode=None)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The endpoint's name (or its run id).")]


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def _ready(e: dict[str, Any]) -> str:
    return f"{e['ready']}/{e['replicas']}" + (f" (autoscale {e['min_replicas']}-{e['max_replicas']})"
                                               if e.get("autoscale") else "")


@endpoint_app.command("list")
def endpoint_list(as_json: JsonOpt = False) -> None:
    """List live endpoints: name, run, ready replicas, requests served."""
    from .api import connect

    api = connect()
    eps = api.get("/endpoints")
    if as_json:
        _print_json(eps)
        return
    from rich.table import Table

    console = _console()
    if not eps:
        console.print("no endpoints (launch a job with job_type: serve; `fedml template show serve`)")
        return
    table = Table(box=None, header_style="bold")
    for col in ("ENDPOINT", "RUN", "STATUS", "READY", "IN FLIGHT", "REQUESTS", "URL"):
        table.add_column(col)
    for e in eps:
        table.add_row(e["name"], e["run_id"], e["status"], _ready(e), str(e["inflight"]), str(e["requests"]),
                      f"{api.url}{e['path']}")
    console.print(table)


@endpoint_app.command("status")
def endpoint_status(name: NameArg, as_json: JsonOpt = False) -> None:
    """One endpoint and each replica's state (starting, ready, unready, restarting, exited, stopping)."""
    from .api import connect

    api = connect()
    e = api.get(f"/endpoints/{name}")
    if as_json:
        _print_json(e)
        return
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    for k, v in (("endpoint", e["name"]), ("run", e["run_id"]), ("status", e["status"]),
                 ("replicas", _ready(e) + " ready"), ("url", f"POST {api.url}{e['path']}"),
                 ("requests", f"{e['requests']} ({e['inflight']} in flight)"),
                 ("reason", escape(e["reason"]) if e.get("reason") else "-")):
        console.print(f"[bold]{k:>9}[/bold]  {v}")
    if e["states"]:
        table = Table(box=None, header_style="bold")
        for col in ("REPLICA", "STATE", "ADDRESS", "PID", "RESTARTS", "SINCE", "MESSAGE"):
            table.add_column(col)
        for r in e["states"]:
            since = time.time() - r["since"]
            table.add_row(str(r["index"]), r["state"], f"{r['address']}:{r['port']}", str(r.get("pid") or "-"),
                          str(r["restarts"]), f"{since:.0f}s ago", escape(r.get("message") or ""))
        console.print(table)


@endpoint_app.command("scale")
def endpoint_scale(
    name: NameArg,
    replicas: Annotated[int | None, typer.Argument(metavar="[REPLICAS]", min=0, max=64,
                                                   help="Fix the replica count (turns autoscaling off).")] = None,
    min_replicas: Annotated[int | None, typer.Option("--min", min=0, max=64, help="Autoscaling lower bound.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", min=1, max=64, help="Autoscaling upper bound.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until that many replicas are ready.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Set an endpoint's replicas: `scale NAME 3` fixes the count; `scale NAME --min 1 --max 4` autoscales
    on requests in flight per replica (service.target_inflight)."""
    if replicas is None and min_replicas is None and max_replicas is None:
        _err("error: give REPLICAS, or --min/--max for autoscaling")
        raise typer.Exit(USAGE)
    from .api import connect

    body = {"replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas}
    api = connect()
    e = api.post(f"/endpoints/{name}/scale", json=body)
    deadline = time.monotonic() + timeout
    while wait and e["ready"] != e["replicas"] and time.monotonic() < deadline:
        time.sleep(0.25)
        e = api.get(f"/endpoints/{name}")
    if as_json:
        _print_json(e)
    else:
        _err(f"Endpoint {e['name']}: {_ready(e)} replicas ready.")
    if wait and e["ready"] != e["replicas"]:
        raise typer.Exit(FAILED)


@endpoint_app.command("delete")
def endpoint_delete(
    name: NameArg,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until its replicas are stopped.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop an endpoint's run: its replicas get SIGTERM, then SIGKILL after the grace period."""
    from .api import connect

    api = connect()
    e = api.delete(f"/endpoints/{name}")
    run = wait_ended(api, api.get(f"/runs/{e['run_id']}"), timeout if wait else 0)
    stop_said(run, waited=wait, as_json=as_json, doc={**e, "status": run["status"]},
              message=f"Endpoint {e['name']} ({e['run_id']}) {run['status']}.")


@endpoint_app.command("call")
def endpoint_call(
    name: NameArg,
    data: Annotated[str, typer.Argument(metavar="JSON", help="Request body; @FILE reads it from a file, - from stdin.")] = "{}",
    path: Annotated[str, typer.Option("--path", help="Replica route instead of the endpoint's predict path.")] = "",
    method: Annotated[str, typer.Option("--method", "-X", help="HTTP method.")] = "POST",
) -> None:
    """Send one request through the gateway and print the answer (exit 1 on an HTTP error)."""
    from . import model_cards
    from .api import connect

    r = model_cards.call(connect(), name, model_cards.read_body(data), path=path, method=method)
    sys.stdout.write(r.text + ("" if r.text.endswith("\n") else "\n"))
    failed = model_cards.call_failed(r)
    if failed is not None:
        raise failed
