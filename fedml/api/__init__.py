"""FedML's `fedml.api`, in its names and signatures, over fedml launch's own client (fedml_cli.api): scripts
written for FedML run unchanged against this scheduler (docs/sdk.md).

    import fedml
    result = fedml.api.launch_job("job.yaml")
    if result.result_code == 0:
        runs, status = fedml.api.run_status(run_id=result.run_id)
        logs = fedml.api.run_logs(result.run_id, page_num=1, page_size=100)

The scheduler is the one the `fedml` command uses: FEDML_SERVER (+ FEDML_API_KEY), a stored `fedml login`, or
the local one (started on first use). `api_key=` arguments are used as FEDML_API_KEY for the call. FedML's
`platform=` arguments are accepted and ignored (one platform here). What has no equivalent yet raises
NotImplementedError saying what to use instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fedml_cli.errors import CliError
from fedml_cli.fedml_names import fedml_status

from .constants import RunStatus

__all__ = ["ClusterModel", "ClusterModelList", "FedMLResponse", "LaunchResult", "RunLogResult", "RunModel",
           "RunModelList", "RunStatus", "cluster_autostop", "cluster_exists", "cluster_kill", "cluster_killall",
           "cluster_list", "cluster_start", "cluster_startall", "cluster_status", "cluster_stop", "cluster_stopall",
           "delete", "device_bind", "device_unbind", "download", "endpoint_delete", "fedml_login",
           "get_storage_metadata", "get_storage_user_defined_metadata", "launch_job", "launch_job_on_cluster",
           "list_storage_objects", "login", "logout", "model_create", "model_delete", "model_deploy", "model_list",
           "model_run", "run_list", "run_logs", "run_status", "run_stop", "upload"]


@dataclass
class LaunchResult:
    """What launch_job returns. result_code 0: launched (FedML's scripts check this); else result_message says
    why and run_id is None."""

    result_code: int
    result_message: str
    run_id: str | None = None
    project_id: str | None = None
    inner_id: str | None = None  # the endpoint of a serve job (FedML: its endpoint id)
    run: dict[str, Any] | None = None  # the run as the scheduler created it (fedml launch's fields)
    sweep_id: str | None = None  # a sweep's (`sweep:` in the job): run_id is then its first point's run

    @property
    def result_msg(self) -> str:  # FedML's docs name it so
        return self.result_message


@dataclass
class RunModel:
    """One run as FedML's run lists show it (FedMLRunModel's fields that have a meaning here)."""

    run_id: str
    run_name: str
    status: str  # FedML's state name (constants.RunStatus)
    exit_code: int | None
    reason: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    run: dict[str, Any] = field(repr=False, default_factory=dict)  # every field fedml launch has


@dataclass
class RunModelList:
    run_list: list[RunModel]


@dataclass
class RunLogResult:
    run_status: RunStatus | None = None
    total_log_lines: int = 0
    total_log_pages: int = 0
    log_line_list: list[str] = field(default_factory=list)
    run_logs: Any = None


@contextlib.contextmanager
def _key(api_key: str | None) -> Iterator[None]:
    """`api_key` as FEDML_API_KEY for one call (what the fedml command reads)."""
    if not api_key:
        yield
        return
    before = os.environ.get("FEDML_API_KEY")
    os.environ["FEDML_API_KEY"] = api_key
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FEDML_API_KEY", None)
        else:
            os.environ["FEDML_API_KEY"] = before


def _connect() -> Any:
    from fedml_cli.api import connect

    return connect()


def fedml_login(api_key: str | None = None) -> tuple[int, str]:
    """Check that the scheduler answers with `api_key` (or the key configured); later calls in this process use
    that key. Returns (0, "") or (-1, why), as FedML's does. (To join this machine as a node, run `fedml login`.)"""
    try:
        with _key(api_key):
            _connect().get("/runs", params={"limit": 1})
    except CliError as exc:
        return -1, str(exc)
    if api_key:
        os.environ["FEDML_API_KEY"] = api_key
    return 0, ""


def launch_job(yaml_file: str, api_key: str | None = None, resource_id: str | None = None,
               device_server: str | None = None, device_edges: list[str] | None = None,
               feature_entry_point: Any = None, cluster: str | None = None) -> LaunchResult:
    """Validate `yaml_file`, upload its workspace and start a run. Never raises for a bad file or an unreachable
    scheduler: result_code is then the `fedml launch` exit code (2: invalid, 3: unreachable...), result_message
    the reason. resource_id, device_server and device_edges name FedML platform resources: placement here is the
    scheduler's (the YAML's computing section, labels)."""
    from fedml_cli.submit import submit

    warnings: list[str] = []
    try:
        with _key(api_key):
            _, run = submit(yaml_file, show_progress=False, warn=warnings.append, cluster=cluster)
    except CliError as exc:
        return LaunchResult(result_code=exc.code, result_message=str(exc))
    message = "Your job has been launched successfully."  # FedML's words, which its scripts may print
    if warnings:
        message += " Warnings: " + "; ".join(warnings)
    endpoint = (run.get("endpoint") or {}).get("name")
    return LaunchResult(result_code=0, result_message=message, run_id=run["id"], inner_id=endpoint, run=run,
                        sweep_id=(run.get("sweep") or {}).get("id"))


def launch_job_on_cluster(yaml_file: str, cluster: str, api_key: str | None = None, resource_id: str | None = None,
                          device_server: str | None = None, device_edges: list[str] | None = None,
                          feature_entry_point: Any = None) -> LaunchResult:
    """launch_job, placed only on the cluster's nodes (`fedml launch -c CLUSTER`)."""
    return launch_job(yaml_file, api_key=api_key, cluster=cluster)


def _model(run: dict[str, Any]) -> RunModel:
    return RunModel(run_id=run["id"], run_name=run["name"],
                    status=fedml_status(run),
                    exit_code=run.get("exit_code"), reason=run.get("reason"), created_at=run["created_at"],
                    started_at=run.get("started_at"), ended_at=run.get("ended_at"), run=run)


def _find(api: Any, run_name: str | None, run_id: str | None) -> list[dict[str, Any]]:
    if run_id:
        from fedml_cli.errors import NOT_FOUND

        try:
            run = api.get(f"/runs/{run_id}")
        except CliError as exc:
            if exc.code == NOT_FOUND:
                return []
            raise
        return [run] if run_name is None or run["name"] == run_name else []
    if run_name:
        return api.runs_named(run_name)  # type: ignore[no-any-return]
    raise ValueError("Please specify either run name or run id.")


def run_list(run_name: str | None = None, run_id: str | None = None, platform: str = "falcon",
             api_key: str | None = None) -> RunModelList:
    """The runs with this id or name (newest first). ValueError without either, as FedML's."""
    with _key(api_key):
        return RunModelList([_model(r) for r in _find(_connect(), run_name, run_id)])


def run_status(run_name: str | None = None, run_id: str | None = None, platform: str = "falcon",
               api_key: str | None = None) -> tuple[RunModelList | None, RunStatus | None]:
    """(the run as a one-run list, its FedML state); (None, None) when there is no such run. A name that several
    runs have gives the newest (FedML raised)."""
    runs = run_list(run_name=run_name, run_id=run_id, api_key=api_key)
    if not runs.run_list:
        return None, None
    newest = RunModelList(runs.run_list[:1])
    return newest, RunStatus.get_run_enum_from_str(newest.run_list[0].status)


def run_logs(run_id: str, page_num: int = 1, page_size: int = 10, need_all_logs: bool = False,
             platform: str = "falcon", api_key: str | None = None) -> RunLogResult:
    """One page of the run's log (page_num from 1, page_size lines), or every line with need_all_logs."""
    if run_id is None:
        raise ValueError("Please specify run id.")
    if page_num < 1 or page_size < 1:
        raise ValueError("page_num and page_size start at 1")
    with _key(api_key):
        api = _connect()
        found = _find(api, None, run_id)
        if not found:
            return RunLogResult()
        run = found[0]
        total = int(run.get("log_count") or 0)
        if need_all_logs:
            lines = [rec["line"] for chunk in api.stream_log_chunks(run_id) for rec in chunk if "line" in rec]
        else:
            lines = [rec["line"] for rec in api.log_page(run_id, page_num, page_size)]
    return RunLogResult(run_status=RunStatus.get_run_enum_from_str(fedml_status(run)),
                        total_log_lines=total, total_log_pages=-(-total // page_size), log_line_list=lines)


def run_stop(run_id: str, platform: str = "falcon", api_key: str | None = None) -> bool:
    """Ask the run to stop (its processes get SIGTERM, then SIGKILL after the grace period). True once asked (or
    if it had ended already); False when the scheduler refused (no such run, not yours, unreachable)."""
    with _key(api_key):
        try:
            _connect().post(f"/runs/{run_id}/stop")
        except CliError:
            return False
    return True


def _said(exc: CliError) -> None:
    sys.stderr.write(f"error: {exc}\n")


def model_create(name: str, model_config: str | None = None, model_source_type: str = "",
                 model_source_url: str = "") -> bool:
    """Keep FedML model config `model_config` (config.yaml) as the model card `name` (`fedml model create`).
    True when made; False, with the reason on stderr, for a bad config. A card of that name is replaced."""
    from fedml_cli import model_cards

    if model_config is None:
        raise ValueError("model_config: the model's config.yaml (FedML's model hub sources are not supported)")
    try:
        card = model_cards.create(name, model_config, force=True)
    except CliError as exc:
        _said(exc)
        return False
    for w in card["warnings"]:
        sys.stderr.write(f"warning: {w}\n")
    return True


def model_deploy(name: str, endpoint_name: str | None = None, endpoint_id: str | None = None, local: bool = False,
                 master_ids: Any = None, worker_ids: Any = None, use_remote: bool = False,
                 api_key: str | None = None, replicas: int = 1, timeout: float | None = None) -> str | None:
    """Deploy the card `name` as an endpoint (`fedml model deploy`) and wait until a replica is ready. Returns
    the endpoint's name (give it to model_run), or None with the reason on stderr. master_ids, worker_ids,
    use_remote and local name FedML platform devices: placement here is the scheduler's."""
    from fedml_cli import model_cards

    try:
        with _key(api_key):
            out = model_cards.deploy(name, endpoint_name or endpoint_id, replicas=replicas, timeout=timeout)
    except CliError as exc:
        _said(exc)
        return None
    return str(out["endpoint"]["name"])


def model_run(endpoint_id: str, json_string: str | dict[str, Any], api_key: str | None = None) -> Any:
    """One request to a deployed model (`fedml model run -e ENDPOINT JSON`): its answer (decoded JSON, else
    the text), or None with the reason on stderr."""
    import json

    from fedml_cli import model_cards

    body = json_string if isinstance(json_string, str) else json.dumps(json_string)
    try:
        with _key(api_key):
            r = model_cards.call(_connect(), endpoint_id, body)
        failed = model_cards.call_failed(r)
        if failed is not None:
            raise CliError(f"{failed}: {r.text[:500]}", failed.code)
    except CliError as exc:
        _said(exc)
        return None
    try:
        return r.json()
    except ValueError:
        return r.text


def model_list(name: str = "*", local: bool = True) -> list[dict[str, Any]]:
    """The model cards on this machine (all, or the one named)."""
    from fedml_cli import model_cards

    return [c for c in model_cards.listing() if name in ("*", "", None) or c["name"] == name]


def model_delete(name: str, local: bool = True) -> bool:
    """Delete the card `name`; False (reason on stderr) if there is none. Its endpoints keep running."""
    from fedml_cli import model_cards

    try:
        model_cards.delete(name)
    except CliError as exc:
        _said(exc)
        return False
    return True


def endpoint_delete(endpoint_id: str, api_key: str | None = None) -> bool:
    """Stop an endpoint's run (`fedml endpoint delete`). False (reason on stderr) when refused."""
    try:
        with _key(api_key):
            _connect().delete(f"/endpoints/{endpoint_id}")
    except CliError as exc:
        _said(exc)
        return False
    return True


@dataclass
class ClusterModel:
    """A cluster as FedML's cluster calls return it (FedMLClusterModel): status RUNNING, IDLE or STOPPED."""

    cluster_name: str
    status: str
    cluster_id: str
    devices: list[dict[str, Any]] = field(default_factory=list)  # its nodes (`fedml node list` fields)


@dataclass
class ClusterModelList:
    cluster_list: list[ClusterModel]


def _cluster_model(c: dict[str, Any]) -> ClusterModel:
    from fedml_cli.clusters_cmd import status_of

    return ClusterModel(cluster_name=c["name"], status=status_of(c), cluster_id=c["name"], devices=c["nodes"])


def cluster_list(cluster_names: tuple[str, ...] | list[str] = (), api_key: str | None = None) -> ClusterModelList:
    """The clusters (those named, or all)."""
    with _key(api_key):
        found = [_cluster_model(c) for c in _connect().get("/clusters")]
    return ClusterModelList([c for c in found if not cluster_names or c.cluster_name in cluster_names])


def cluster_exists(cluster_name: str, api_key: str | None = None) -> bool:
    return bool(cluster_list((cluster_name,), api_key).cluster_list)


def cluster_status(cluster_name: str, api_key: str | None = None) -> tuple[str | None, ClusterModelList | None]:
    """(its status, a one-cluster list), or (None, None) when there is no such cluster."""
    found = cluster_list((cluster_name,), api_key)
    return (found.cluster_list[0].status, found) if found.cluster_list else (None, None)


def _cluster_call(names: list[str] | None, path: str, api_key: str | None, **params: Any) -> bool:
    try:
        with _key(api_key):
            api = _connect()
            for name in names if names is not None else [c["name"] for c in api.get("/clusters")]:
                api.post(f"/clusters/{name}/{path}", params=params or None)
    except CliError as exc:
        _said(exc)
        return False
    return True


def cluster_start(cluster_name: str, api_key: str | None = None) -> bool:
    """Undrain the cluster's nodes (admin)."""
    return _cluster_call([cluster_name], "start", api_key)


def cluster_startall(api_key: str | None = None) -> bool:
    return _cluster_call(None, "start", api_key)


def cluster_stop(cluster_name: str, api_key: str | None = None) -> bool:
    """Drain the cluster's nodes and stop its runs (admin)."""
    return _cluster_call([cluster_name], "stop", api_key)


def cluster_stopall(api_key: str | None = None) -> bool:
    return _cluster_call(None, "stop", api_key)


def cluster_kill(cluster_name: str, api_key: str | None = None) -> bool:
    """Stop the cluster and dissolve it (admin)."""
    return _cluster_call([cluster_name], "stop", api_key, kill="true")


def cluster_killall(api_key: str | None = None) -> bool:
    return _cluster_call(None, "stop", api_key, kill="true")


def cluster_autostop(cluster_id: str, time: int, api_key: str | None = None, stop_agents: bool = True) -> bool:
    """After `time` minutes without a run (0: off), drain each node of the cluster and (as FedML's stops its
    machines) tell its agent to exit (admin)."""
    return _cluster_call([cluster_id], "autostop", api_key,
                         **({"minutes": time, "stop_agents": str(stop_agents).lower()} if time else {}))


@dataclass
class FedMLResponse:
    """What FedML's storage calls return: code "SUCCESS" or "FAILURE", a message, and the data."""

    code: str
    message: str
    data: Any = None


def _storage_call(api_key: str | None, fn: Any) -> FedMLResponse:
    try:
        with _key(api_key):
            return FedMLResponse("SUCCESS", "", fn(_connect()))
    except CliError as exc:
        return FedMLResponse("FAILURE", str(exc))


def upload(data_path: str, api_key: str | None = None, tag_list: list[str] | None = None, service: str = "R2",
           name: str | None = None, description: str | None = None, metadata: dict[str, Any] | None = None,
           show_progress: bool = False, out_progress_to_err: bool = True, progress_desc: str | None = None,
           ) -> FedMLResponse:
    """Store a file or directory under `name` (`fedml storage upload`); data: the object's record. `service`
    (FedML's cloud bucket) is accepted and unused: the scheduler keeps it."""
    from fedml_cli import storage

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return _storage_call(api_key, lambda api: storage.upload(api, data_path, name, description=description or "",
                                                             metadata=meta, show_progress=show_progress))


def download(data_name: str, api_key: str | None = None, service: str = "R2", dest_path: str | None = None,
             show_progress: bool = True) -> FedMLResponse:
    """Download and unpack a stored object into dest_path (default: here); data: where it is."""
    from fedml_cli import storage

    return _storage_call(api_key, lambda api: str(storage.download(api, data_name, dest_path or ".")))


def list_storage_objects(api_key: str | None = None) -> FedMLResponse:
    """data: your stored objects (their records)."""
    return _storage_call(api_key, lambda api: api.get("/storage"))


def get_storage_metadata(data_name: str, api_key: str | None = None) -> FedMLResponse:
    """data: the object's record (kind, size, files, sha256, description, metadata)."""
    return _storage_call(api_key, lambda api: api.get(f"/storage/{data_name}"))


def get_storage_user_defined_metadata(data_name: str, api_key: str | None = None) -> FedMLResponse:
    """data: the metadata given at upload."""
    return _storage_call(api_key, lambda api: api.get(f"/storage/{data_name}")["metadata"])


def delete(data_name: str, api_key: str | None = None, service: str = "R2") -> FedMLResponse:
    """Delete the name (runs launched with it keep what they had)."""
    return _storage_call(api_key, lambda api: api.delete(f"/storage/{data_name}"))


def _fedml(args: list[str], api_key: str | None = None, timeout: float = 180.0) -> bool:
    """Run the `fedml` command (the key in its environment, never in argv): True when it succeeded, else False
    with what it said on stderr."""
    import subprocess

    env = {**os.environ, **({"FEDML_API_KEY": api_key} if api_key else {})}
    try:
        done = subprocess.run([sys.executable, "-m", "fedml_cli.entry", *args], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"error: fedml {args[0]} took over {timeout:.0f} s\n")
        return False
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
    return done.returncode == 0


def login(api_key: str | None = None, computing: bool = True, server: bool = False, supplier: bool = False,
          master_inference_gateway_port: int | None = None, worker_inference_proxy_port: int | None = None,
          worker_connection_type: str | None = None, marketplace_type: Any = None,
          price_per_hour: float | None = None, name: str = "") -> bool:
    """Join this machine to the scheduler FEDML_SERVER (or an earlier login) names as a node, as `fedml login
    KEY` does: its agent starts in the background. computing=False and server=False: only store the
    credentials. (FedML's server role, a federated-learning server, is any node here; the port and marketplace
    arguments have no meaning here.) True when joined; else False with the reason on stderr."""
    args = ["login", "--node" if computing or server or supplier else "--client"]
    if name:
        args += ["--name", name]
    if price_per_hour is not None:
        args += ["--price-per-gpu-hour", str(price_per_hour)]
    return _fedml(args, api_key)


def logout(computing: bool = True, server: bool = False) -> bool:
    """Stop this machine's agent and leave (`fedml logout`)."""
    return _fedml(["logout"])


def device_bind(api_key: str | None = None, computing: bool = True, server: bool = False, supplier: bool = False,
                **kwargs: Any) -> bool:
    """FedML's name for login."""
    return login(api_key, computing, server, supplier, **kwargs)


def device_unbind(computing: bool = True, server: bool = False) -> bool:
    """FedML's name for logout."""
    return logout(computing, server)


def _instead(name: str, use: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"fedml.api.{name} has no equivalent in fedml launch yet: {use}")

    missing.__name__ = name
    return missing


# FedML's API beyond runs: what to use until each exists here.
for _name in ("model_package", "model_push", "model_pull"):
    globals()[_name] = _instead(_name, "model cards stay on the machine that made them (model_create) and are "
                                       "deployed from there (model_deploy): there is no model registry to push to")
del _name
