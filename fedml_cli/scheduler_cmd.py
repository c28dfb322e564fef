"""`fedml scheduler start|stop|status` (and, attached in main, `key` and `token`)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import local
from .errors import USAGE, CliError
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json

scheduler_app = typer.Typer(help="Run or stop the scheduler.", no_args_is_help=True, rich_markup_mode=None)


@scheduler_app.command("start")
def scheduler_start(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for a team).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8787,
    agent: Annotated[bool | None, typer.Option("--agent/--no-agent", help="Also run a local agent on this machine "
                                                                        "(default: only with a loopback --host).")] = None,
    run_as: Annotated[str, typer.Option("--run-as", help="User the local agent runs jobs as: auto (fedml-job "
                                                         "when root), self, or a user name.")] = "auto",
    max_workspace_mb: Annotated[int, typer.Option(help="Largest workspace upload accepted.")] = 512,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between agent heartbeats; a node silent for "
                                                           "3 intervals is offline.")] = 10.0,
    store: Annotated[str, typer.Option(help="sqlite (a database in FEDML_HOME) or redis://HOST:6379/0[?prefix=P]: "
                                            "several schedulers may share one Redis, with one shared --blob-dir.")]
    = "sqlite",
    blob_dir: Annotated[str | None, typer.Option(help="Where uploaded workspaces and artifacts live "
                                                      "(default: in FEDML_HOME).")] = None,
    log_retention_lines: Annotated[int | None, typer.Option(min=1, help="Log lines kept per run "
                                                                        "(the newest; default 1,000,000).")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPUs the local agent declares when NVML sees none, "
                                                  "e.g. A100-80G:2.")] = None,
    webhook_allow: Annotated[str | None, typer.Option(help="Networks besides public addresses that jobs' webhooks "
                                                           "may reach, e.g. 10.1.0.0/16,127.0.0.0/8 (default: none).")]
    = None,
) -> None:
    """Run a scheduler in the foreground (Ctrl-C stops it). State lives in the user data dir (FEDML_HOME).

    On first start it prints an admin API key (stored hashed; also saved to FEDML_HOME/local/token).
    """

    try:
        local.running()
        _err("error: a local scheduler is already running for this FEDML_HOME; `fedml scheduler stop` first")
        raise typer.Exit(USAGE)
    except CliError:
        pass
    args = ["--host", host, "--port", str(port), "--max-workspace-mb", str(max_workspace_mb),
            "--heartbeat-interval", str(heartbeat_interval), "--run-as", run_as, "--store", store]
    for flag, value in (("--blob-dir", blob_dir), ("--log-retention-lines", log_retention_lines), ("--gpus", gpus),
                        ("--webhook-allow", webhook_allow)):
        if value is not None:
            args += [flag, str(value)]
    if agent is not None:
        args.append("--agent" if agent else "--no-agent")
    # The CLI starts the server, it does not import it: this process becomes `python -m scheduler.server`.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "scheduler.server", *args])


@scheduler_app.command("stop")
def scheduler_stop() -> None:
    """Stop the local scheduler and its agent. Running jobs keep running and are picked up again on restart."""

    stopped = local.stop()
    if not stopped:
        _err("no local scheduler is running")
        return
    for what in stopped:
        _err(f"stopped {what}")


@scheduler_app.command("status")
def scheduler_status(as_json: JsonOpt = False) -> None:
    """The scheduler commands go to (FEDML_SERVER, else the one `fedml login` chose, else the local one): is it
    up, where, and what does it hold."""
    from .api import connect, target

    where = target()
    try:
        if where["kind"] == "local":
            from . import local

            where["url"], _ = local.running()
        info = connect(start=False).get("/info")
    except CliError as exc:
        if as_json:
            _print_json({"running": False, **where, "error": str(exc)})
        else:
            _err(f"{where['kind']} scheduler{' ' + where['url'] if where['url'] else ''}: {exc}")
        raise typer.Exit(exc.code) from None
    if as_json:
        _print_json({"running": True, **where, **info})
    else:
        sys.stdout.write(f"{where['kind']} scheduler running at {where['url']}: {info['nodes']} node(s), {info['gpus']} GPU(s), "
                         f"store {info['store']}\n")
