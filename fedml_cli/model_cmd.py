"""`fedml model ...`: FedML's model cards (`create -n NAME -cf config.yaml`, `deploy`, `run`, `list`, `delete`)
as this scheduler's serve endpoints (fedml_cli/model_cards.py).

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json

model_app = typer.Typer(
    help="FedML's model cards: `create -n NAME -cf config.yaml` checks a FedML model config (entry_point, "
         "workspace, bootstrap, ...) and keeps it as a card; `deploy -n NAME` launches it as an endpoint whose "
         "replicas run the entry point (a fedml.serving predictor); `run -e ENDPOINT JSON` calls it.",
    no_args_is_help=True, rich_markup_mode=None)

NameOpt = Annotated[str, typer.Option("--name", "-n", metavar="NAME", help="The model card's name.")]


@model_app.command("create")
def model_create(
    name: NameOpt,
    config_file: Annotated[str, typer.Option("--config_file", "--config-file", "-cf", metavar="FILE",
                                             help="FedML's model config (config.yaml): workspace, entry_point, "
                                                  "bootstrap, computing, environment_variables ...")],
    force: Annotated[bool, typer.Option("--force", help="Replace a card of that name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check a FedML model config and keep it as the card NAME (on this machine, as FedML's are until pushed).
    Errors name the file, line and key; keys that cannot be honoured here are warned about."""
    from . import model_cards

    card = model_cards.create(name, config_file, force=force)
    for w in card["warnings"]:
        _err(f"warning: {w}")
    if as_json:
        _print_json(card)
        return
    _err(f"Created model {name} from {card['config_file']} (workspace {card['workspace']}).")
    if card.get("not_deployable"):
        _err(f"note: it cannot be deployed as it is: {card['not_deployable']}")
    else:
        _err(f"Deploy it: fedml model deploy -n {name}")


@model_app.command("deploy")
def model_deploy(
    name: NameOpt,
    endpoint: Annotated[str | None, typer.Option("--endpoint", "-e", "--endpoint_name", metavar="ENDPOINT",
                                                 help="The endpoint's name (default: the model's).")] = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, max=64, help="Replicas to start.")] = 1,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once launched, without waiting "
                                                                "for a ready replica.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for a ready replica "
                                                  "(default: the config's deploy_timeout_sec, else 900).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write and check the serve job, print it, launch "
                                                            "nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Launch the card NAME as an endpoint (a serve run) and wait until a replica answers GET /ready.
    Exit 1 if its run ends first or the deploy timeout passes. The serve job is written to the card's
    deploy.yaml (`--dry-run` shows it)."""
    from . import model_cards

    if dry_run:
        from .submit import load

        _, path = model_cards.deploy_file(name, endpoint, replicas)
        loaded = load(str(path))  # the job's own checks, as `fedml launch` makes them
        if as_json:
            _print_json({"job_file": str(path), "job": loaded.spec.model_dump(mode="json", exclude_none=True)})
        else:
            sys.stdout.write(path.read_text())
            _err(f"valid (dry run, nothing launched): {path}")
        return

    def said(what: str) -> None:
        if not as_json:
            _err(f"waiting for a ready replica: {what}")

    t0 = time.monotonic()
    out = model_cards.deploy(name, endpoint, replicas=replicas, wait=not detach, timeout=timeout,
                             show_progress=sys.stderr.isatty() and not as_json, on_wait=said)
    run, ep = out["run"], out["endpoint"]
    if as_json:
        _print_json(out)
        return
    ep_name = (ep or run.get("endpoint") or {}).get("name") or endpoint or name
    if ep is None:
        _err(f"Launched model {name} as run {run['id']}, endpoint {ep_name} (`fedml endpoint status {ep_name}`).")
        return
    _err(f"Model {name} is deployed: endpoint {ep_name}, run {run['id']}, {ep['ready']}/{ep['replicas']} replicas "
         f"ready after {time.monotonic() - t0:.1f} s.")
    _err(f"Call it: fedml model run -e {ep_name} '{{...}}'   (POST /inference/{ep_name})")


@model_app.command("run")
def model_run(
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", "--endpoint_id", metavar="ENDPOINT",
                                          help="The endpoint's name (or its run id).")],
    data: Annotated[str | None, typer.Argument(metavar="[JSON]", help="The request; @FILE reads it from a file, - "
                                               "from stdin; default: the model config's request_input_example.")]
    = None,
) -> None:
    """Send one request to a deployed model and print its answer (exit 1 on an HTTP error)."""
    import json

    from . import model_cards
    from .api import connect
    from .errors import USAGE, CliError

    if data is None:
        example = _example(endpoint)
        if example is None:
            raise CliError("give the request as JSON (no model card of that name has a request_input_example)",
                           USAGE)
        data = json.dumps(example)
    r = model_cards.call(connect(), endpoint, model_cards.read_body(data))
    sys.stdout.write(r.text + ("" if r.text.endswith("\n") else "\n"))
    failed = model_cards.call_failed(r)
    if failed is not None:
        raise failed


def _example(name: str) -> Any:
    from . import model_cards
    from .errors import CliError

    try:
        return model_cards.read(name).get("config", {}).get("request_input_example")
    except CliError:
        return None


@model_app.command("list")
def model_list(as_json: JsonOpt = False) -> None:
    """The model cards on this machine."""
    from . import model_cards

    cards = model_cards.listing()
    if as_json:
        _print_json(cards)
        return
    if not cards:
        _err("no model cards (create one: fedml model create -n NAME -cf config.yaml)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("MODEL", "ENTRY POINT", "WORKSPACE", "CONFIG", "CREATED"):
        table.add_column(col)
    for c in cards:
        cfg = c.get("config") or {}
        entry = cfg.get("entry_point") or cfg.get("job") or cfg.get("container_run_command") or "-"
        table.add_row(c["name"], str(entry)[:40], c["workspace"], c["config_file"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(c["created_at"])))
    (Console() if sys.stdout.isatty() else Console(width=250)).print(table)


@model_app.command("delete")
def model_delete(name: NameOpt, as_json: JsonOpt = False) -> None:
    """Delete the card NAME. An endpoint deployed from it keeps running: `fedml endpoint delete ENDPOINT`."""
    from . import model_cards

    card = model_cards.delete(name)
    if as_json:
        _print_json({"deleted": card["name"]})
        return
    _err(f"Deleted model {name}. (Endpoints deployed from it keep running: `fedml endpoint list`.)")
