"""Model cards: FedML's `fedml model create/deploy/run/list/delete` over this scheduler's serve endpoints. One
implementation for the `fedml model` commands and `fedml.api.model_*`; failures are CliErrors. No typer here.

A card is local, as FedML's are until pushed: FEDML_HOME/models/NAME/card.json holds the checked config
(scheduler/contract/modelconfig.py), the absolute path of its workspace and when it was made. `deploy` launches the
card as a serve job (written to FEDML_HOME/models/NAME/deploy.yaml, so it can be read and launched by hand) whose
replicas run the config's entry point: a fedml.serving predictor answers POST /predict and GET /ready, which the
scheduler's gateway reaches at POST /inference/ENDPOINT. The workspace is read when the card is deployed."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FAILED, NOT_FOUND, USAGE, CliError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # an endpoint name too (ServiceSpec.name)
TERMINAL = {"FINISHED", "FAILED", "KILLED", "LOST"}


def _root() -> Path:
    from scheduler.contract import paths

    return paths.home() / "models"


def _checked(name: str, what: str = "model") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CliError(f'{what} name "{str(name)[:80]}": letters, digits, "-", "_", "." (up to 63, starting with '
                       "a letter or digit)", USAGE)
    return name


def card_dir(name: str) -> Path:
    return _root() / _checked(name)


def create(name: str, config_file: str, *, force: bool = False) -> dict[str, Any]:
    """Check `config_file` and store it as the card `name`. Returns the card (with the config's warnings)."""
    from scheduler.contract import modelconfig
    from scheduler.contract.jobyaml import JobSpecError

    d = card_dir(name)
    try:
        cfg = modelconfig.load(config_file)
    except JobSpecError as exc:
        raise CliError(str(exc), USAGE) from None
    deployable: str | None = None
    try:
        cfg.job(name=name, endpoint=name)  # an image-only config is kept, but says now that it cannot be deployed
    except JobSpecError as exc:
        deployable = str(exc)
    if (d / "card.json").exists() and not force:
        raise CliError(f"model {name} exists already: `fedml model delete -n {name}` first, or --force", USAGE)
    card = {"name": name, "config_file": str(Path(config_file).resolve()), "workspace": str(cfg.workspace),
            "config": cfg.data, "warnings": cfg.warnings, "created_at": time.time(),
            "deploy_timeout": cfg.deploy_timeout, **({"not_deployable": deployable} if deployable else {})}
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = d / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=1))
    os.replace(tmp, d / "card.json")  # a card is there whole or not at all
    return card


def read(name: str) -> dict[str, Any]:
    path = card_dir(name) / "card.json"
    try:
        card: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"no model {name} (`fedml model list`; create it with `fedml model create -n {name} "
                       "-cf config.yaml`)", NOT_FOUND) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"model {name}: its card {path} cannot be read ({exc}): create it again with --force",
                       FAILED) from None
    return card


def listing() -> list[dict[str, Any]]:
    root = _root()
    cards = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if NAME.fullmatch(d.name) and (d / "card.json").is_file():
            try:
                cards.append(read(d.name))
            except CliError:
                continue
    return cards


def delete(name: str) -> dict[str, Any]:
    card = read(name)
    shutil.rmtree(card_dir(name))
    return card


def deploy_file(name: str, endpoint: str | None = None, replicas: int = 1) -> tuple[dict[str, Any], Path]:
    """Write the card's serve job (deploy.yaml in its directory). Returns (the card, the job file)."""
    import yaml

    from scheduler.contract.jobyaml import JobSpecError
    from scheduler.contract.modelconfig import ModelConfig

    card = read(name)
    endpoint = _checked(endpoint or name, "endpoint")
    if card.get("not_deployable"):
        raise CliError(card["not_deployable"], USAGE)
    ws = Path(card["workspace"])
    if not ws.is_dir():
        raise CliError(f"model {name}: its workspace {ws} is gone: create the card again", USAGE)
    cfg = ModelConfig(file=card["config_file"], data=card["config"], workspace=ws)
    try:
        job = cfg.job(name=name, endpoint=endpoint, replicas=replicas)
    except JobSpecError as exc:
        raise CliError(str(exc), USAGE) from None
    path = card_dir(name) / "deploy.yaml"
    path.write_text(f"# fedml model deploy -n {name}: generated from {card['config_file']}\n"
                    + yaml.safe_dump(job, sort_keys=False))
    return card, path


def deploy(name: str, endpoint: str | None = None, *, replicas: int = 1, wait: bool = True,
           timeout: float | None = None, show_progress: bool = False,
           on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Launch the card as an endpoint and (with `wait`) wait until a replica is ready: {"run": ..., "endpoint":
    ...}. CliError(FAILED) if the run ends first or the deploy timeout passes (the run is then left as it is)."""
    from .submit import submit

    card, path = deploy_file(name, endpoint, replicas)
    api, run = submit(str(path), show_progress=show_progress)
    name_ = (run.get("endpoint") or {}).get("name") or endpoint or name
    if not wait:
        return {"run": run, "endpoint": None}
    limit = float(timeout if timeout is not None else card.get("deploy_timeout") or 900.0)
    deadline = time.monotonic() + limit
    said = ""
    while True:
        run = api.get(f"/runs/{run['id']}")
        ep = _endpoint(api, name_)
        if ep is not None and ep.get("ready", 0) >= 1:
            return {"run": run, "endpoint": ep}
        if run["status"] in TERMINAL:
            raise CliError(f"model {name}: its run {run['id']} {run['status']} before a replica was ready: "
                           f"{run.get('reason') or 'see `fedml run logs ' + run['id'] + '`'}", FAILED)
        now = f"run {run['id']} {run['status']}" + (f": {run['reason']}" if run.get("reason") else "")
        if on_wait is not None and now != said:
            on_wait(now)
            said = now
        if time.monotonic() > deadline:
            raise CliError(f"model {name}: no replica ready after {limit:.0f} s (deploy_timeout); its run "
                           f"{run['id']} is {run['status']}: `fedml run logs {run['id']}`", FAILED)
        time.sleep(0.25)


def _endpoint(api: Any, name: str) -> dict[str, Any] | None:
    try:
        ep: dict[str, Any] = api.get(f"/endpoints/{name}")
    except CliError as exc:
        if exc.code == NOT_FOUND:
            return None
        raise
    return ep


def read_body(data: str) -> str:
    """A request body as given on the command line: "-" reads stdin, "@FILE" a file, anything else is the body."""
    import sys

    if data == "-":
        return sys.stdin.read()
    if data.startswith("@"):
        try:
            with open(data[1:]) as f:
                return f.read()
        except OSError as exc:
            raise CliError(f"{data[1:]}: {exc.strerror}", USAGE) from None
    return data


def call(api: Any, endpoint: str, body: str, *, path: str = "", method: str = "POST") -> Any:
    """One request through the gateway (httpx.Response). CliError(USAGE) if `body` is not JSON."""
    try:
        json.loads(body)
    except ValueError as exc:
        raise CliError(f"the request body is not JSON: {exc}", USAGE) from None
    try:
        return api.http.request(method.upper(), f"/inference/{endpoint}" + (f"/{path.lstrip('/')}" if path else ""),
                                content=body if method.upper() not in ("GET", "HEAD") else None,
                                headers={"content-type": "application/json"})
    except Exception as exc:  # httpx errors: keep httpx out of this module's imports
        raise CliError(f"cannot reach the scheduler: {exc}", 3) from None


def call_failed(r: Any) -> CliError | None:
    """The error for an answer (NOT_FOUND for the gateway's own 404: no such endpoint), or None for a 2xx/3xx."""
    if r.status_code < 400:
        return None
    unknown = r.status_code == 404 and r.headers.get("x-fedml-replica") is None
    return CliError(f"HTTP {r.status_code}", NOT_FOUND if unknown else FAILED)
