"""FedML's model configs (`fedml model create -n NAME -cf config.yaml`, the deploy examples' config.yaml) read and
turned into one of our serve jobs: `fedml model deploy` launches that job, whose replicas run the config's entry
point behind the scheduler's gateway (the predictor base class is fedml.serving).

A model config is not a job file: its keys are FedML's (`entry_point`, `bootstrap`, `inference_image_name`, `port`,
`readiness_probe`, `environment_variables`, ...). Errors name the config file, its line and its key, as job files'
do. Keys that only FedML's cloud reads (`auto_detect_public_ip`, `data_cache_dir`, `endpoint_api_type` ...) are
accepted and kept in the card; those that would change what runs and that this scheduler cannot honour yet
(volumes, registry credentials, a container for the replicas) get a warning saying what happens instead.
No pydantic here: the job document is validated where it is submitted."""

from __future__ import annotations

import difflib
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .jobyaml import ENV_NAME, JobSpecError, env_problem, parse_text, read_text, workspace_dir

# FedML's model-config keys (FedML's ClientConstants / the deploy examples). What each becomes: see job().
KEYS = {
    "workspace", "entry_point", "bootstrap", "job", "computing", "environment_variables", "program_args",
    "inference_image_name", "container_run_command", "port", "port_inside_container", "readiness_probe",
    "service", "deploy_timeout", "deploy_timeout_sec", "request_timeout_sec", "request_input_example",
    "use_gpu", "enable_serverless_container", "enable_custom_image", "auto_detect_public_ip", "data_cache_dir",
    "endpoint_api_type", "registry_specs", "volumes", "use_triton", "server_external_port",
    "server_internal_port",
}
DEFAULT_DEPLOY_TIMEOUT = 900.0  # FedML's deploy_timeout_sec default
READY_PATH = "/ready"  # fedml.serving.FedMLInferenceRunner's (and FedML's)
PREDICT_PATH = "/predict"


@dataclass
class ModelConfig:
    """A checked model config: `job(endpoint)` is the serve job that deploys it."""

    file: str
    data: dict[str, Any]
    workspace: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def deploy_timeout(self) -> float:
        for key in ("deploy_timeout_sec", "deploy_timeout"):
            v = self.data.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
        return DEFAULT_DEPLOY_TIMEOUT

    @property
    def request_example(self) -> Any:
        return self.data.get("request_input_example")

    def command(self) -> str | None:
        """What each replica runs: `job`, else `python3 ENTRY_POINT` (bash for a .sh), else the container's
        run command; None when the config names only an image (its own CMD: nothing we can run as a process)."""
        d = self.data
        if isinstance(d.get("job"), str) and d["job"].strip():
            return str(d["job"])
        entry = d.get("entry_point")
        if isinstance(entry, str) and entry.strip():
            runner = "bash" if entry.endswith(".sh") else "python3"
            return f"{runner} {shlex.quote(entry)}"
        run = d.get("container_run_command")
        if isinstance(run, list) and run:
            return shlex.join(str(x) for x in run)
        if isinstance(run, str) and run.strip():
            return run
        return None

    def job(self, *, name: str, endpoint: str, replicas: int = 1) -> dict[str, Any]:
        """The serve job document (JobSpec's keys) for an endpoint of this model. JobSpecError when the
        config cannot run here (an image and nothing else)."""
        d = self.data
        command = self.command()
        if command is None:
            raise JobSpecError("names only an image to run, and replicas run as processes on the node here "
                               "(containers for replicas are not supported yet): give entry_point (a Python "
                               "file in the workspace) or container_run_command", file=self.file,
                               field="inference_image_name")
        service: dict[str, Any] = {"name": endpoint, "replicas": replicas,
                                   "readiness_path": _probe_path(d) or READY_PATH,
                                   "predict_path": _service_path(d) or PREDICT_PATH}
        if isinstance(d.get("request_timeout_sec"), (int, float)) and d["request_timeout_sec"] > 0:
            service["request_timeout"] = float(d["request_timeout_sec"])
        job: dict[str, Any] = {"workspace": str(self.workspace), "job": command, "job_type": "serve",
                               "job_name": name, "service": service}
        if isinstance(d.get("bootstrap"), str) and d["bootstrap"].strip():
            job["bootstrap"] = d["bootstrap"]
        computing = d.get("computing")
        if isinstance(computing, dict):
            job["computing"] = computing
        elif d.get("use_gpu") is True:
            job["computing"] = {"minimum_num_gpus": 1}
        env = {str(k): _env_text(v) for k, v in (d.get("environment_variables") or {}).items()}
        if env:
            job["envs"] = env
        return job


def _probe_path(d: dict[str, Any]) -> str | None:
    probe = d.get("readiness_probe")
    path = probe.get("httpGet", {}).get("path") if isinstance(probe, dict) and isinstance(
        probe.get("httpGet"), dict) else None
    return path if isinstance(path, str) and path.strip() else None


def _service_path(d: dict[str, Any]) -> str | None:
    svc = d.get("service")
    post = svc.get("httpPost") if isinstance(svc, dict) else None
    path = post.get("path") if isinstance(post, dict) else None
    return path if isinstance(path, str) and path.strip() else None


def _env_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def load(path: str | Path) -> ModelConfig:
    """Read and check a model config. JobSpecError naming the file, line and key of the first problem."""
    name = str(path)
    text = read_text(path)
    data, lines = parse_text(text, file=name)
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise JobSpecError(f"expected a mapping of model config keys (workspace, entry_point, ...), got {kind}",
                           file=name, line=1)

    def bad(key: tuple[str, ...], message: str) -> JobSpecError:
        return JobSpecError(message, file=name, line=lines.line_of(key), field=".".join(key))

    def want(key: str, types: tuple[type, ...], what: str) -> Any:
        v = data.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise bad((key,), f"expected {what}, got {_describe(v)}")
        return v

    for key in ("workspace", "entry_point", "bootstrap", "job", "inference_image_name", "endpoint_api_type",
                "data_cache_dir"):
        v = want(key, (str,), "a string")
        if isinstance(v, str) and "\0" in v:
            raise bad((key,), "contains a NUL character")
    for key in ("use_gpu", "enable_serverless_container", "enable_custom_image", "auto_detect_public_ip",
                "use_triton"):
        want(key, (bool,), "true or false")
    for key in ("port", "port_inside_container", "server_external_port", "server_internal_port"):
        v = want(key, (int,), "a port number")
        if v is not None and not 1 <= v <= 65535:
            raise bad((key,), f"{v} is not a port (1-65535)")
    for key in ("deploy_timeout", "deploy_timeout_sec", "request_timeout_sec"):
        v = want(key, (int, float), "a number of seconds")
        if v is not None and v <= 0:
            raise bad((key,), f"must be above 0, got {v}")
    want("computing", (dict,), "a mapping (minimum_num_gpus, resource_type, ...)")
    want("program_args", (dict, str, list), "a mapping, a string or a list")
    want("readiness_probe", (dict,), "a mapping (httpGet: {path: /ready})")
    want("service", (dict,), "a mapping (httpPost: {path: /predict})")
    run = want("container_run_command", (str, list), "a string or a list of strings")
    if isinstance(run, list) and not all(isinstance(x, (str, int, float)) for x in run):
        raise bad(("container_run_command",), "expected a list of strings")
    for key, path in (("readiness_probe", _probe_path(data)), ("service", _service_path(data))):
        if path is not None and not path.startswith("/"):
            raise bad((key,), f'the path must start with "/", got "{path}"')
    env = want("environment_variables", (dict,), "a mapping of NAME: value")
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not ENV_NAME.fullmatch(k):
            raise bad(("environment_variables", str(k)), "not a valid environment variable name")
        if isinstance(v, (dict, list)):
            raise bad(("environment_variables", k), f"expected a string, got {_describe(v)}")
        problem = env_problem(k, _env_text(v))
        if problem:
            raise bad(("environment_variables", k), problem)

    ws_text = data.get("workspace")
    ws = workspace_dir(ws_text if ws_text is not None and str(ws_text).strip() else ".", name, lines)
    assert ws is not None
    entry = data.get("entry_point")
    if isinstance(entry, str) and entry.strip():
        rel = PurePosixPath(entry)
        if rel.is_absolute() or ".." in rel.parts:
            raise bad(("entry_point",), f'"{entry}": must be a path inside the workspace')
        if not (ws / entry).is_file():
            raise bad(("entry_point",), f'"{entry}": no such file in the workspace ({ws})')

    warnings: list[str] = []

    def warn(key: str, message: str) -> None:
        warnings.append(f"{name}:{lines.line_of((key,))}: {key}: {message}")

    for key in data:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), sorted(KEYS), n=1, cutoff=0.75)
            warn(str(key), "not a FedML model config key: ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    if data.get("inference_image_name") and _runs_as_process(data):
        warn("inference_image_name", "replicas run as processes on the node here (containers for replicas are "
                                     "not supported yet): the image is not used")
    if data.get("volumes"):
        warn("volumes", "not mounted: put the files in the workspace")
    if data.get("registry_specs"):
        warn("registry_specs", "not used: no image is pulled for the replicas")
    if data.get("program_args"):
        warn("program_args", "not passed to the entry point: read settings from environment_variables")
    return ModelConfig(file=name, data=data, workspace=ws, warnings=warnings[:20])


def _runs_as_process(data: dict[str, Any]) -> bool:
    return any(isinstance(data.get(k), str) and data[k].strip() for k in ("job", "entry_point")) or bool(
        data.get("container_run_command"))


def _describe(v: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    return kinds.get(type(v), type(v).__name__)
