"""The job YAML: a superset of FedML Launch's schema, validated with line numbers.

Used by the CLI (validation, --dry-run), the API (re-validation of what a client sends) and the agent (env).
Only pydantic and pyyaml are imported here so that the CLI stays light.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

JOB_TYPES = ("train", "deploy", "serve", "federate")

# Keys this schema interprets; every other top-level key is a "free" key exported as FEDML_ENV_<PATH>.
# FedML's own dict blocks are exported too, as FedML does with its config arguments.
EXPORTED_BLOCKS = ("fedml_env", "serving_args", "job_args", "environment_args", "federate")


class JobSpecError(Exception):
    """A job file that cannot be used. `str()` is the one-line message shown to the user."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = file or "job"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


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


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_BYTES = 131072  # Linux's MAX_ARG_STRLEN: one "NAME=value" string of a process's environment


def env_problem(name: str, value: str) -> str | None:
    """Why `name=value` cannot be an environment variable of a job (None: it can). Checked at launch, not on
    the node, so a bad one is refused before anything is submitted."""
    if not ENV_NAME.fullmatch(name):
        return f'"{name[:60]}" is not a valid variable name (letters, digits and _, not starting with a digit)'
    if "\0" in value:
        return f"{name}: the value contains a NUL character"
    if len(name.encode()) + len(value.encode()) + 2 > MAX_ENV_BYTES:
        return f"{name}: the value is longer than the system allows ({MAX_ENV_BYTES // 1024} KiB)"
    return None


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
    envs: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    service: ServiceSpec | None = None
    federate: FederateSpec | None = None
    _lines: Any = PrivateAttr(default=None)  # where each key is in the file (set by load_text)

    @model_validator(mode="before")
    @classmethod
    def _task_type_alias(cls, data: Any) -> Any:
        # Newer FedML examples say `task_type: train` instead of `job_type`.
        if isinstance(data, dict) and "job_type" not in data and "task_type" in data:
            tt = data["task_type"]
            if isinstance(tt, str) and tt.strip().lower() in JOB_TYPES:
                data = {**data, "job_type": tt.strip().lower()}
        if isinstance(data, dict) and isinstance(data.get("job_type"), str):
            data = {**data, "job_type": data["job_type"].strip().lower()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _container_by_default(cls, data: Any) -> Any:
        # FedML runs a job in its docker.image unless the file says `containerize: false`.
        if isinstance(data, dict) and "containerize" not in data and isinstance(data.get("docker"), dict) \
                and data["docker"].get("image"):
            data = {**data, "containerize": True}
        return data

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


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans,
    which turned `retry: {on: [lost]}` into a key `True`."""


_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


# ---- loading YAML with line numbers -----------------------------------------------------------------------

class _Lines:
    """Line (1-based) of every key path in a YAML document, for error messages."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, ...], int] = {}

    def walk(self, node: yaml.Node, path: tuple[str, ...], file: str) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = str(k.value)
                if key in seen:
                    raise JobSpecError(
                        f"duplicate key (first defined on line {seen[key]})",
                        file=file, line=k.start_mark.line + 1, field=".".join((*path, key)))
                seen[key] = k.start_mark.line + 1
                self.lines[(*path, key)] = k.start_mark.line + 1
                self.walk(v, (*path, key), file)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*path, str(i)), file)

    def line_of(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "list": "a list", "model": "a mapping",
}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:37] + "...")
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _message(err: dict[str, Any]) -> str:
    kind: str = err["type"]
    got = _describe(err.get("input"))
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {got}"
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    for prefix, words in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") or kind == prefix + "_type":
            return f"expected {words}, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return err["msg"].replace("Input should be", "expected a value") + f", got {got}"
    return f"{err['msg']}, got {got}"


def _field_of(loc: tuple[Any, ...]) -> tuple[str, ...]:
    # Pydantic puts union member names in loc (e.g. "str", "OsCommands", "function-after[...]").
    parts: list[str] = []
    for p in loc:
        s = str(p)
        if s in ("str", "int", "float", "bool", "OsCommands", "DockerSpec", "none") or "[" in s:
            continue
        if s and s[0].isupper() and isinstance(p, str):
            continue
        parts.append(s)
    return tuple(parts)


def _best_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    # For a union (job: str | {run_on_posix}), report the plain-type alternative, not every branch.
    def rank(e: dict[str, Any]) -> int:
        return 0 if e["type"] in ("value_error", "missing") else 1
    return sorted(errors, key=rank)[0]


def validate(data: Any, *, file: str = "job.yaml", lines: _Lines | None = None) -> JobSpec:
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise JobSpecError(f"expected a mapping of job keys (workspace, job, ...), got {kind}", file=file,
                           line=1)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A union branch that rejected a whole mapping (job: str) hides the branch that looked inside it
        # (job: {run_on_posix: 3}): report the inner problem, not "expected a string, got a mapping".
        all_fields = {_field_of(e["loc"]) for e in errors}

        def shadowed(e: dict[str, Any]) -> bool:
            f = _field_of(e["loc"])
            return bool(f) and isinstance(e.get("input"), dict) and any(
                len(g) > len(f) and g[:len(f)] == f for g in all_fields)

        errors = [e for e in errors if not shadowed(e)] or errors
        # Group union branches by field; keep the first field in file order.
        by_field: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for e in errors:
            by_field.setdefault(_field_of(e["loc"]), []).append(e)
        fields = list(by_field)
        if lines is not None:
            fields.sort(key=lambda f: lines.line_of(f) or 0)
        field = fields[0]
        err = _best_error(by_field[field])
        msg = _message(err)
        name = ".".join(field)
        if not name and msg.split(":", 1)[0] in ("job", "server_job", "service", "num_nodes", "containerize"):
            name, msg = msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
            field = (name,)
        more = len(fields) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        line = lines.line_of(field) if lines else None
        raise JobSpecError(msg, file=file, line=line, field=name or None) from None


MAX_YAML_BYTES = 1 << 20  # a job file (the scheduler takes job documents of up to 1 MiB too)
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with every alias expanded: a "billion laughs" file stops here


def _check_graph(root: yaml.Node, file: str) -> None:
    """Refuse what would make a small file huge or endless once read: alias expansion past MAX_YAML_NODES,
    nesting deeper than MAX_YAML_DEPTH, an alias inside its own anchor. Iterative: no recursion to exhaust."""
    visits = 0
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, True)]
    path: set[int] = set()
    while stack:
        node, depth, entering = stack.pop()
        if not entering:
            path.discard(id(node))
            continue
        visits += 1
        if visits > MAX_YAML_NODES:
            raise JobSpecError(f"more than {MAX_YAML_NODES:,} values once its aliases are expanded (an alias bomb?)",
                               file=file, line=node.start_mark.line + 1)
        if depth > MAX_YAML_DEPTH:
            raise JobSpecError(f"nested deeper than {MAX_YAML_DEPTH} levels", file=file, line=node.start_mark.line + 1)
        if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
            if id(node) in path:
                raise JobSpecError("an alias refers to a value that contains it (a recursive alias)", file=file,
                                   line=node.start_mark.line + 1)
            path.add(id(node))
            stack.append((node, depth, False))
            children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
            stack.extend((child, depth + 1, True) for child in reversed(children))


def load_yaml_bounded(text: str, *, file: str = "job.yaml") -> Any:
    """YAML (our loader) with its size, nesting and alias expansion bounded before anything is built from it."""
    return _load_bounded(text, file)[1]


def _load_bounded(text: str, file: str) -> tuple[yaml.Node | None, Any]:
    if len(text) > MAX_YAML_BYTES:
        raise JobSpecError(f"{len(text) / 1048576:.1f} MiB: a job file may be at most {MAX_YAML_BYTES >> 20} MiB",
                           file=file)
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise JobSpecError(f"nested deeper than {MAX_YAML_DEPTH} levels", file=file) from None
        if node is None:
            return None, None
        _check_graph(node, file)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def load_text(text: str, *, file: str = "job.yaml") -> JobSpec:
    try:
        node, data = _load_bounded(text, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = (exc.problem or "invalid YAML").strip()
        ctx = exc.context_mark
        if ctx is not None and exc.context and exc.problem_mark is not None and \
                exc.problem_mark.index >= len(text.rstrip()):
            # Unclosed bracket or quote: the end of the file is not where the mistake is.
            line = ctx.line + 1
            problem = f"{problem}, {exc.context.strip()} that starts on this line"
        if line is not None:
            line = max(1, min(line, len(text.splitlines()) or 1))
        raise JobSpecError(f"YAML syntax error: {problem}", file=file, line=line) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        raise JobSpecError(f"YAML error: {str(exc).splitlines()[0]}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"YAML error: {str(exc).splitlines()[0]}", file=file) from None
    lines = _Lines()
    if node is not None:
        lines.walk(node, (), file)
    spec = validate(data, file=file, lines=lines)
    spec._lines = lines
    return spec


MAX_WARNINGS = 20

# Keys FedML defines in these blocks that this project reads nothing from: not typos.
_FEDML_EXTRA = {"computing": {"allow_cross_cloud_resources"}}


def unknown_keys(spec: JobSpec, file: str = "job.yaml") -> list[str]:
    """One line per key that looks like a typo: a key no schema defines inside a block with a fixed schema
    (`computing: {minimum_num_gpu: 1}` once launched with 0 GPUs), or a top-level key one letter or so away
    from a known one. Other top-level keys are FedML's free keys (exported as FEDML_ENV_*), not typos."""
    import difflib

    lines: _Lines | None = spec._lines
    out: list[tuple[int, str]] = []

    def note(path: tuple[str, ...], key: str, known: list[str], cutoff: float, always: bool) -> None:
        if key in known:
            return
        close = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
        if not close and not always:
            return
        line = lines.line_of((*path, key)) if lines is not None else None
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(known))})"
        shown = key if len(key) <= 60 else key[:57] + "..."  # a hostile file's 1 MiB key is not echoed whole
        out.append((line or 0, f"{file}{f':{line}' if line else ''}: {'.'.join((*path, shown))}: unknown key{hint}"))

    blocks: list[tuple[tuple[str, ...], BaseModel | None]] = [
        (("computing",), spec.computing), (("docker",), spec.docker), (("retry",), spec.retry),
        (("service",), spec.service), (("federate",), spec.federate)]
    blocks += [((what,), getattr(spec, what)) for what in ("job", "server_job", "bootstrap")
               if isinstance(getattr(spec, what), OsCommands)]
    for path, model in blocks:
        if model is None or not model.model_extra:
            continue
        known = list(type(model).model_fields)
        for key in model.model_extra:
            if key not in _FEDML_EXTRA.get(path[0], ()):
                note(path, str(key), known, 0.6, True)
    top = [k for k in JobSpec.model_fields if k != "job_subtype"] + ["task_type"]
    for key in spec.model_extra or {}:
        note((), str(key), top, 0.85, False)
    texts = [text for _, text in sorted(out)]
    if len(texts) > MAX_WARNINGS:  # one line per typo, but not 100,000 of them
        texts = texts[:MAX_WARNINGS] + [f"{file}: {len(texts) - MAX_WARNINGS} more unknown keys not shown"]
    return texts


class LoadedJob(BaseModel):
    """A validated job file plus where its workspace lives on this machine."""

    spec: JobSpec
    path: Path
    workspace_dir: Path | None
    warnings: list[str] = Field(default_factory=list)  # keys that look like typos (`fedml launch --strict`)


def load_file(path: str | Path) -> LoadedJob:
    p = Path(path)
    name = str(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_YAML_BYTES:  # before reading it: a 50 MB file is refused at once
            raise JobSpecError(f"{p.stat().st_size / 1048576:.1f} MiB: a job file may be at most "
                               f"{MAX_YAML_BYTES >> 20} MiB", file=name)
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError("file not found", file=name) from None
    except IsADirectoryError:
        raise JobSpecError("is a directory, expected a job YAML file", file=name) from None
    except UnicodeDecodeError:
        raise JobSpecError("not a UTF-8 text file", file=name) from None
    except OSError as exc:
        raise JobSpecError(f"cannot read: {exc.strerror}", file=name) from None
    spec = load_text(text, file=name)
    ws_dir: Path | None = None
    if spec.workspace is not None and str(spec.workspace).strip():
        ws = Path(str(spec.workspace)).expanduser()
        ws_dir = ws if ws.is_absolute() else (p.parent / ws)
        if not ws_dir.is_dir():
            line = None
            try:
                node, _ = _load_bounded(text, name)
                lines = _Lines()
                if node is not None:
                    lines.walk(node, (), name)
                line = lines.line_of(("workspace",))
            except (yaml.YAMLError, JobSpecError):
                pass
            what = "is not a directory" if ws_dir.exists() else "directory not found"
            raise JobSpecError(f'{what}: "{spec.workspace}" (resolved to {ws_dir.resolve()})', file=name,
                               line=line, field="workspace")
        ws_dir = ws_dir.resolve()
        if ws_dir == Path(ws_dir.anchor):
            raise JobSpecError(f'"{spec.workspace}" is the root of the filesystem: point workspace at the '
                               "directory that holds the job's code", file=name, field="workspace")
    if spec.job_type == "federate" and spec.federate is None and spec.num_nodes == 1 and ws_dir is not None:
        fed = fedml_config_federation(spec, ws_dir)
        if fed is not None:
            spec.federate = fed
    return LoadedJob(spec=spec, path=p.resolve(), workspace_dir=ws_dir, warnings=unknown_keys(spec, name))


_CONFIG_ARG = re.compile(r"--(?:cf|config)[= ]+([^\s;&|]+)")


def fedml_config_federation(spec: JobSpec, workspace: Path) -> FederateSpec | None:
    """How many clients a FedML federate job wants, from its FedML config (`--cf FILE` in the commands, else
    config/fedml_config.yaml in the workspace): train_args.client_num_in_total, else device_args.worker_num;
    rounds from train_args.comm_round. None when there is no readable config saying so."""
    text = f"{posix_commands(spec.job)}\n{posix_commands(spec.server_job)}"
    names = [m.group(1).strip("'\"") for m in _CONFIG_ARG.finditer(text)] + ["config/fedml_config.yaml"]
    for rel in names:
        f = (workspace / rel).resolve()
        if not f.is_relative_to(workspace) or not f.is_file() or f.stat().st_size > 1 << 20:
            continue
        try:
            doc = load_yaml_bounded(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, JobSpecError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict):
            continue
        train = doc.get("train_args") if isinstance(doc.get("train_args"), dict) else {}
        device = doc.get("device_args") if isinstance(doc.get("device_args"), dict) else {}
        n = train.get("client_num_in_total") or device.get("worker_num")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            rounds = train.get("comm_round")
            return FederateSpec(clients=n, rounds=rounds if isinstance(rounds, int) and rounds >= 1 else 1)
    return None
