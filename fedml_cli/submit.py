"""Submitting a job file: validated, its workspace uploaded, the run created. The one way `fedml launch` and the
Python API (`fedml.api.launch_job`) do it; failures are CliErrors (USAGE for a bad file), never prints or exits,
so each caller says them its own way. No typer here: the SDK imports this."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .errors import USAGE, CliError

Warn = Callable[[str], None]


def submit(job_file: str, *, name: str | None = None, env: dict[str, str] | None = None,
           show_progress: bool = True, warn: Warn | None = None, api: Any = None,
           after: list[str] | None = None, sweep: dict[str, list[Any]] | None = None,
           max_parallel: int | None = None, cluster: str | None = None,
           labels: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    """Start a run of `job_file`. Returns (the API client, the run as created). `warn` gets each warning (keys
    that look like typos); `api` is the client to use (default: the scheduler `connect()` finds); `after`: runs
    it waits for ("RUN_ID[:ok|:any]"); `sweep`, `max_parallel`: a sweep's parameters over the job's own and
    the most of its points at once (the run returned is the first point's, its `sweep` names the rest);
    `cluster`: only on that cluster's nodes; `labels`: node labels asked for, over the job's."""
    env = dict(env or {})
    extra = _extra(after, sweep, max_parallel, cluster, labels)
    sent = _submit_text(job_file, name, env, show_progress, warn, api, extra)
    if sent is not None:
        return sent
    loaded = load(job_file)
    for w in loaded.warnings:
        if warn is not None:
            warn(w)
    return submit_loaded(job_file, loaded, name=name, env=env, show_progress=show_progress, api=api, after=after,
                         sweep=sweep, max_parallel=max_parallel, cluster=cluster, labels=labels)


def _extra(after: list[str] | None, sweep: dict[str, list[Any]] | None, max_parallel: int | None,
           cluster: str | None, labels: dict[str, str] | None) -> dict[str, Any]:
    """RunCreate's optional fields, only those given."""
    return {k: v for k, v in (("after", after), ("sweep", sweep), ("max_parallel", max_parallel),
                              ("cluster", cluster), ("labels", labels)) if v}


def load(job_file: str) -> Any:
    """The job file read and validated here (scheduler.contract.jobload.Loaded). CliError(USAGE) if it is bad."""
    from scheduler.contract.jobload import load_file
    from scheduler.contract.jobyaml import JobSpecError

    try:
        return load_file(job_file)
    except JobSpecError as exc:
        raise CliError(str(exc), USAGE) from None


def submit_loaded(job_file: str, loaded: Any, *, name: str | None, env: dict[str, str], show_progress: bool,
                  api: Any = None, after: list[str] | None = None, sweep: dict[str, list[Any]] | None = None,
                  max_parallel: int | None = None, cluster: str | None = None,
                  labels: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    spec = loaded.spec
    if not spec.commands().strip():
        raise CliError(f"{job_file}: job: this file refers to a job stored on FedML's platform (job_args); "
                       "put the commands to run in `job`", USAGE)
    from .api import connect

    api = api or connect()
    sha = upload_workspace(api, loaded.workspace_dir, show_progress)
    run = api.post("/runs", json={"job": spec.model_dump(mode="json", exclude_none=True), "name": name,
                                  "job_file": os.path.basename(job_file), "workspace_sha": sha, "env": env,
                                  **_extra(after, sweep, max_parallel, cluster, labels)})
    return api, run


def upload_workspace(api: Any, workspace: Any, show_progress: bool) -> str | None:
    if workspace is None:
        return None
    from .pack import pack

    packed = pack(workspace, show_progress=show_progress)
    try:
        if not api.has_blob(packed.sha256):
            api.put_blob(packed.sha256, packed.path, show_progress=show_progress)
        return packed.sha256
    finally:
        os.unlink(packed.path)


def _submit_text(job_file: str, name: str | None, env: dict[str, str], show_progress: bool, warn: Warn | None,
                 api: Any, extra: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The fast way, when a scheduler is already there to ask: read the file as YAML only (syntax errors and the
    workspace are checked here, with their lines), send its text, and let the scheduler validate it with the same
    `FILE:LINE: field: message` errors. Not loading the job's schema (pydantic) here is most of what a launch
    costs the CLI. None: do it the full way (nothing runs yet to ask, or a FedML federate job whose client count
    is in its workspace's config)."""
    from scheduler.contract.jobyaml import JOB_TEXT_MAX, JobSpecError, parse_text, read_text, workspace_dir

    from . import local
    from .api import connect, credentials

    if api is None and not (os.environ.get("FEDML_SERVER") or credentials() or local.probably_running()):
        return None  # starting a scheduler takes long anyway: validate here first, and start none for a bad file
    try:
        text = read_text(job_file)
        if len(text.encode()) > JOB_TEXT_MAX:
            return None  # the scheduler reads short files only: this one is validated here and sent as a document
        data, lines = parse_text(text, file=job_file)
        if not isinstance(data, dict):
            return None  # the full way says what it should be
        if data.get("job_type") == "federate" and "federate" not in data:
            return None
        workspace = workspace_dir(data.get("workspace"), job_file, lines)
    except JobSpecError as exc:
        raise CliError(str(exc), USAGE) from None
    api = api or connect()
    sha = upload_workspace(api, workspace, show_progress)
    run = api.post("/runs", json={"job_text": text, "name": name, "job_file": job_file, "workspace_sha": sha,
                                  "env": env, **extra})
    for w in run.get("warnings") or []:
        if warn is not None:
            warn(w)
    return api, run
