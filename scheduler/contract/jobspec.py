"""The job YAML: a superset of FedML Launch's schema, validated with line numbers.

Used by the CLI (validation, --dry-run), the API (re-validation of what a client sends) and the agent (env).
Only pydantic and pyyaml are imported here so that the CLI stays light.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from .jobyaml import ENV_NAME, MAX_ENV_BYTES, JobSpecError, env_problem  # noqa: F401 - their home is jobyaml (no pydantic)

JOB_TYPES = ("train", "deploy", "serve", "federate")

# Keys this schema interprets; every other top-level key is a "free" key exported as FEDML_ENV_<PATH>.
# FedML's own dict blocks are exported too, as FedML does with its config arguments.
EXPORTED_BLOCKS = ("fedml_env", "serving_args", "job_args", "environment_args", "federate")


class _Model(BaseModel):
    # FedML files carry many keys we do not interpret; keep them (they are exported as env).
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class OsCommands(_Model):
    """FedML's multi-OS form: `job: {run_on_posix: ..., run_on_windows: ...}`."""

    run_on_posix: str | None = None
    run_on_windows: str | None = None


Commands = str | OsCommands | None


def posix_commands(value: Commands) -> str:
    if value is None:
        return ""
    if isinstance(value, OsCommands):
        return value.run_on_posix or ""
    return value


class Computing(_Model):
    minimum_num_gpus: int = Field(default=0, ge=0)
    maximum_num_gpus: int | None = Field(default=None, ge=0)
    maximum_cost_per_hour: float | None = Field(default=None, ge=0)
    resource_type: str | None = None
    device_type: Literal["GPU", "CPU", "hybrid"] | None = None
    minimum_gpu_memory_gb: float | None = Field(default=None, ge=0)
    cpus: float | None = Field(default=None, gt=0)
    memory_gb: float | None = Field(default=None, gt=0)

    @field_validator("maximum_cost_per_hour", mode="before")
    @classmethod
    def _dollars(cls, v: Any) -> Any:
        # FedML writes prices as "$3000" (YAML reads that as a string).
        if isinstance(v, str):
            s = v.strip().replace(",", "")
            if s.startswith("$"):
                s = s[1:]
            try:
                return float(s)
            except ValueError:
                raise ValueError(f'expected a price such as 3.5 or "$3.5", got "{v}"') from None
        return v

    @field_validator("device_type", mode="before")
    @classmethod
    def _device_case(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"gpu": "GPU", "cpu": "CPU", "hybrid": "hybrid"}.get(v.strip().lower(), v)
        return v


class DockerSpec(_Model):
    image: str | None = None
    registry: str | None = None
    username: str | None = None
    password: str | None = None
    ports: list[int] | None = None
    network: str | None = None  # our addition: the container's --network (default: the node's, else host)


class StorageMount(_Model):
    """`storage: [{name: mnist, path: data/}]`: a named storage object (`fedml storage upload`) unpacked into
    the workspace at `path` (default: its name) before the job starts."""

    name: str
    path: str | None = Field(default=None, max_length=255)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f'"{v[:80]}" is not a storage name (letters, digits, "-", "_", ".")')
        return v

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = [p for p in v.replace("\\", "/").split("/") if p not in ("", ".")]
        if v.startswith("/") or ".." in parts or "\0" in v:
            raise ValueError(f'"{v[:80]}": a path inside the workspace (relative, no "..")')
        return "/".join(parts) or "."  # "." (or ""): the workspace itself

    @property
    def where(self) -> str:
        return self.name if self.path is None else self.path


NOTIFY_EVENTS = ("started", "finished", "failed", "killed", "lost")  # (a run's states, and "lost" for a requeue)


class NotifyTarget(_Model):
    """`notify: [{url: https://hooks.example/..., on: [finished, failed]}]`: a JSON POST when the run reaches one
    of those (docs/notify.md): signed with the owner's webhook secret, retried, never in the scheduler's way."""

    url: str = Field(max_length=2048)
    on: list[Literal["started", "finished", "failed", "killed", "lost"]] = Field(
        default_factory=lambda: ["finished", "failed", "lost"], min_length=1, max_length=5)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f'"{v[:80]}" is not an http(s) URL')
        if u.username or u.password:
            raise ValueError("a webhook URL carries no user or password (requests are signed instead)")
        return v


class UtilizationPolicy(_Model):
    """dstack's `utilization_policy`: a run whose GPUs on a node all stay below `min_gpu_utilization` % for
    `time_window` is stopped (`action: stop`, the default) or warned about in its log (`warn`)."""

    min_gpu_utilization: int = Field(ge=1, le=100)
    time_window: float = Field(ge=10, le=7 * 86400)  # seconds ("30m")
    action: Literal["stop", "warn"] = "stop"

    @field_validator("time_window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        return parse_duration(v)


class PreemptionSpec(_Model):
    """How the run is stopped when a run that outranks it needs its GPUs (docs/teams.md: preemption): SIGTERM,
    then `grace` seconds (a duration: "60s", "2m") to save a checkpoint in FEDML_ARTIFACT_DIR, then SIGKILL."""

    grace: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("grace", mode="before")
    @classmethod
    def _grace(cls, v: Any) -> Any:
        if v in (0, "0", "0s"):
            return 0.0
        return parse_duration(v)


class RetrySpec(_Model):
    max_attempts: int = Field(default=1, ge=1, le=100)
    on: list[Literal["lost", "error"]] = Field(default_factory=lambda: ["lost"])


class ServiceSpec(_Model):
    """A long-lived endpoint (job_type deploy/serve). Each replica runs `job` and must listen on $PORT."""

    name: str | None = None  # the endpoint's name in /inference/{name}; default: serving_args.endpoint_name, job name
    port: int | None = Field(default=None, ge=1, le=65535)  # the port inside a container; processes get $PORT
    readiness_path: str = "/health"
    predict_path: str = "/predict"  # where POST /inference/{name} goes on a replica
    replicas: int = Field(default=1, ge=0, le=64)
    min_replicas: int | None = Field(default=None, ge=0, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)
    target_inflight: float = Field(default=4.0, gt=0)  # autoscaling: in-flight requests per replica
    scale_down_delay: float = Field(default=30.0, ge=1, le=600)  # autoscaling: seconds of lower load before scaling down
    request_timeout: float = Field(default=60.0, gt=0, le=86400)  # seconds the gateway waits for a replica

    @field_validator("readiness_path", "predict_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f'must start with "/", got "{v}"')
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not ENDPOINT_NAME.fullmatch(v):
            raise ValueError(f'"{v}" is not a valid endpoint name (letters, digits, "-", "_", ".", up to 63)')
        return v

    @model_validator(mode="after")
    def _bounds(self) -> ServiceSpec:
        lo = self.replicas if self.min_replicas is None else self.min_replicas
        hi = max(self.replicas, lo) if self.max_replicas is None else self.max_replicas
        if lo > hi:
            raise ValueError(f"min_replicas ({lo}) is above max_replicas ({hi})")
        if not lo <= self.replicas <= hi:
            raise ValueError(f"replicas ({self.replicas}) must be between min_replicas ({lo}) and max_replicas ({hi})")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        lo = self.replicas if self.min_replicas is None else self.min_replicas
        hi = max(self.replicas, lo) if self.max_replicas is None else self.max_replicas
        return lo, hi


ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class FederateSpec(_Model):
    clients: int = Field(default=1, ge=1)
    rounds: int = Field(default=1, ge=1)
    min_clients: int | None = Field(default=None, ge=1)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(v: Any) -> float | None:
    """Seconds from 3600, "3600", "90s", "30m", "2h" or "1d"."""
    if v is None or isinstance(v, bool):
        if isinstance(v, bool):
            raise ValueError(f"expected a duration such as 30m or 2h, got {v}")
        return None
    if isinstance(v, int | float):
        if not math.isfinite(v) or v <= 0 or v > 10 * 365 * 86400:
            raise ValueError(f"expected a positive duration of at most 10 years, such as 30m or 2h, got {v}")
        return float(v)
    m = _DURATION.match(str(v))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f'expected a duration such as 30m or 2h, got "{v}"')
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > 10 * 365 * 86400:
        raise ValueError(f'expected a duration of at most 10 years, got "{v}"')
    return seconds


SweepValue = StrictBool | StrictInt | StrictFloat | StrictStr
MAX_SWEEP_POINTS = 1000  # a batch's limit (RunBatch): a sweep is written in one commit
SWEEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def sweep_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The points of a sweep grid, in order (the last name varies fastest). ValueError saying what is wrong:
    a name that cannot be an environment variable, an empty or repeated list, more than MAX_SWEEP_POINTS."""
    if not grid:
        raise ValueError("give at least one parameter: {name: [value, ...]}")
    if len(grid) > 16:
        raise ValueError(f"at most 16 parameters, got {len(grid)}")
    size = 1
    seen: set[str] = set()
    for name, values in grid.items():
        if not SWEEP_NAME.fullmatch(name):
            raise ValueError(f'"{name[:80]}": a parameter name is letters, digits and "_" (it becomes '
                             "FEDML_SWEEP_<NAME>)")
        if name.upper() in ("ID", "INDEX", "SIZE") or name.upper() in seen:
            raise ValueError(f'"{name}": FEDML_SWEEP_{name.upper()} is taken (by the sweep itself or another '
                             "parameter): rename it")
        seen.add(name.upper())
        if not values:
            raise ValueError(f"{name}: give at least one value")
        size *= len(values)
        if size > MAX_SWEEP_POINTS:  # (before looking at the values: a list of 100,000 is refused at once)
            raise ValueError(f"more than {MAX_SWEEP_POINTS} points")
        if len({json.dumps(x) for x in values}) != len(values):
            raise ValueError(f"{name}: a value is repeated")
        for x in values:
            if isinstance(x, str) and ("\0" in x or len(x) > 4096):
                raise ValueError(f"{name}: a value holds a NUL character or is over 4096 characters")
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


class JobSpec(_Model):
    workspace: str | None = None
    job: Commands = None
    server_job: Commands = None
    bootstrap: Commands = None
    job_type: Literal["train", "deploy", "serve", "federate"] = "train"
    job_subtype: str | None = None
    job_name: str | None = None
    containerize: bool = False
    docker: DockerSpec | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    computing: Computing = Field(default_factory=Computing)
    serving_args: dict[str, Any] | None = None
    fedml_env: dict[str, Any] | None = None
    job_args: dict[str, Any] | None = None
    # Additions of this project (all optional).
    num_nodes: int = Field(default=1, ge=1, le=1024)
    priority: int = Field(default=0, ge=-1000, le=1000)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    max_duration: float | None = None
    # Preemption (docs/teams.md): whether a run that outranks it may stop it and take its GPUs (it is then
    # requeued as its next attempt), and how long it gets to stop. `preemptible: false` runs are never stopped
    # that way, and so never use GPUs borrowed from another team's quota.
    preemptible: bool = True
    preemption: PreemptionSpec = Field(default_factory=PreemptionSpec)
    envs: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    service: ServiceSpec | None = None
    federate: FederateSpec | None = None
    # A sweep (our addition): one run per point of the grid {name: [values]}, each with FEDML_SWEEP_<NAME> set;
    # at most max_parallel of them queued or running at once (docs/sweeps.md).
    sweep: dict[str, list[SweepValue]] | None = None
    storage: list[StorageMount] | None = Field(default=None, max_length=32)  # named data unpacked into the workspace
    notify: list[NotifyTarget] | None = Field(default=None, max_length=8)  # webhooks (docs/notify.md)
    utilization_policy: UtilizationPolicy | None = None  # idle GPUs: stop or warn (docs/metrics.md)
    max_parallel: int | None = Field(default=None, ge=1, le=MAX_SWEEP_POINTS)

    # (No validator of the whole input here, mode="before": one makes pydantic turn a stored run's JSON into
    # Python objects and validate those, not the JSON itself: 7 us more for every run read back, half its cost.
    # What such validators did is done per field, and after the fields, below.)
    @field_validator("job_type", mode="before")
    @classmethod
    def _job_type_case(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[SweepValue]] | None) -> dict[str, list[SweepValue]] | None:
        if v is not None:
            sweep_points(v)
        return v

    @field_validator("max_duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v)

    @field_validator("envs", "labels", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, val in v.items():
                if isinstance(val, dict | list):
                    raise ValueError(f"{k}: expected a plain value, got a {type(val).__name__}")
                out[str(k)] = "" if val is None else (str(val).lower() if isinstance(val, bool) else str(val))
            return out
        return v

    @field_validator("envs")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if (why := env_problem(k, val)) is not None:
                raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _has_job(self) -> JobSpec:
        given = self.model_fields_set
        if "job_type" not in given and self.model_extra:
            # Newer FedML examples say `task_type: train` instead of `job_type` (the key stays, as a free key).
            tt = self.model_extra.get("task_type")
            if isinstance(tt, str) and tt.strip().lower() in JOB_TYPES:
                self.job_type = tt.strip().lower()  # type: ignore[assignment]
        if "containerize" not in given and self.docker is not None and self.docker.image:
            self.containerize = True  # FedML runs a job in its docker.image unless the file says `containerize: false`
        for what in ("job", "server_job", "bootstrap"):
            if "\0" in posix_commands(getattr(self, what)):
                raise ValueError(f"{what}: contains a NUL character (a shell script cannot)")
        if not posix_commands(self.job).strip():
            if self.job_args:  # FedML: a job stored on its platform, referenced by job_args.job_id
                return self
            raise ValueError("job: required: the shell commands to run (a non-empty string)")
        if self.job_type == "federate" and self.server_job is not None and not posix_commands(
                self.server_job).strip():
            raise ValueError("server_job: must not be empty when given")
        if self.containerize and not (self.docker and self.docker.image):
            raise ValueError("containerize: true needs docker.image (the image the job runs in)")
        if self.service is not None and not self.serves:
            raise ValueError(f"service: only for job_type deploy or serve (this job is {self.job_type})")
        if self.serves and self.containerize:
            raise ValueError("containerize: serve endpoints run their replicas as processes on the node; "
                             "containers for replicas are not supported yet")
        if self.sweep is not None and self.serves:
            raise ValueError("sweep: an endpoint (job_type serve or deploy) is not swept: launch one per setting")
        if self.max_parallel is not None and self.sweep is None:
            raise ValueError("max_parallel: only with a sweep (the most of its points queued or running at once)")
        if self.serves and self.num_nodes > 1:
            raise ValueError("num_nodes: an endpoint's replicas run on one node; scale with service.replicas")
        return self

    # ---- derived values -------------------------------------------------------------------------------
    def commands(self) -> str:
        return posix_commands(self.job)

    def server_commands(self) -> str:
        return posix_commands(self.server_job)

    def bootstrap_commands(self) -> str:
        return posix_commands(self.bootstrap)

    @property
    def serves(self) -> bool:
        return self.job_type in ("deploy", "serve")

    def service_config(self) -> ServiceSpec:
        """The endpoint's settings: the `service` block, else FedML's names (serving_args.endpoint_name,
        top-level or serving_args `port`, `readiness_probe.httpGet.path`, `request_timeout_sec`)."""
        if self.service is not None:
            svc = self.service
        else:
            extra = self.free_keys()
            sa = self.serving_args or {}

            def pick(key: str) -> Any:
                return sa.get(key, extra.get(key))

            data: dict[str, Any] = {}
            probe = pick("readiness_probe")
            if isinstance(probe, dict) and isinstance(probe.get("httpGet"), dict) and probe["httpGet"].get("path"):
                data["readiness_path"] = str(probe["httpGet"]["path"])
            if isinstance(pick("port"), int):
                data["port"] = pick("port")
            if isinstance(pick("request_timeout_sec"), int | float):
                data["request_timeout"] = pick("request_timeout_sec")
            svc = ServiceSpec.model_validate(data)
        if svc.name is None:
            sa_name = (self.serving_args or {}).get("endpoint_name")
            for cand in (sa_name, self.job_name):
                if isinstance(cand, str) and ENDPOINT_NAME.fullmatch(cand):
                    svc = svc.model_copy(update={"name": cand})
                    break
        return svc

    def free_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def fedml_env_vars(self) -> dict[str, str]:
        """FEDML_ENV_<PATH> for every free key and FedML config block, as FedML exports them."""
        out: dict[str, str] = {}
        sources = self.free_keys()
        for block in EXPORTED_BLOCKS:
            val = getattr(self, block, None) if block in type(self).model_fields else sources.get(block)
            if isinstance(val, BaseModel):
                val = val.model_dump(exclude_none=True)
            if val is not None:
                sources[block] = val
        for key, val in sources.items():
            # fedml_env holds env on purpose: FEDML_ENV_<KEY>, not FEDML_ENV_FEDML_ENV_<KEY>.
            _flatten(out, [] if key == "fedml_env" and isinstance(val, dict) else [key], val)
        return out


def _env_name(path: list[str]) -> str:
    return "FEDML_ENV_" + re.sub(r"[^A-Za-z0-9]+", "_", "_".join(path)).strip("_").upper()


def _flatten(out: dict[str, str], path: list[str], val: Any) -> None:
    if isinstance(val, dict):
        for k, v in val.items():
            _flatten(out, [*path, str(k)], v)
    elif isinstance(val, list):
        out[_env_name(path)] = json.dumps(val)
    elif val is None:
        out[_env_name(path)] = ""
    elif isinstance(val, bool):
        out[_env_name(path)] = "true" if val else "false"
    else:
        out[_env_name(path)] = str(val)
