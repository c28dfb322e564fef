"""Reading a job file: bounded YAML (size, depth, aliases), errors that name the file, field and line, typo
warnings for keys nobody reads, and FedML's federation settings from the job's own config file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from .jobspec import FederateSpec, JobSpec, OsCommands, posix_commands
from .jobyaml import (  # noqa: F401 - MAX_YAML_*, load_yaml_bounded: read from here by callers and tests
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    JobSpecError,
    _Lines,
    load_yaml_bounded,
    parse_text,
    read_text,
    workspace_dir,
)

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


def _not_text(data: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where the document holds a string UTF-8 cannot encode (a lone surrogate, from a YAML or JSON escape)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(data, dict):
        for k, v in data.items():
            here = (*path, str(k).encode("utf-8", "backslashreplace").decode())
            if isinstance(k, str) and _not_text(k) is not None:
                return here
            if (found := _not_text(v, here)) is not None:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if (found := _not_text(v, (*path, str(i)))) is not None:
                return found
    return None


def validate(data: Any, *, file: str = "job.yaml", lines: _Lines | None = None) -> JobSpec:
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise JobSpecError(f"expected a mapping of job keys (workspace, job, ...), got {kind}", file=file,
                           line=1)
    where = _not_text(data)
    if where is not None:  # (pydantic cannot even quote it in an error: UnicodeEncodeError)
        name = ".".join(where)
        raise JobSpecError("holds a lone surrogate (a \\ud800-\\udfff escape), which is not text: write the character "
                           "itself", file=file, line=lines.line_of(where) if lines and where else None,
                           field=name or None)
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
        if not name and msg.split(":", 1)[0] in ("job", "server_job", "service", "num_nodes", "containerize", "sweep",
                                                      "max_parallel"):
            name, msg = msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
            field = (name,)
        more = len(fields) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        line = lines.line_of(field) if lines else None
        raise JobSpecError(msg, file=file, line=line, field=name or None) from None


def load_text(text: str, *, file: str = "job.yaml") -> JobSpec:
    return load_text_lines(text, file=file)[0]


def load_text_lines(text: str, *, file: str = "job.yaml") -> tuple[JobSpec, _Lines]:
    """The job, and where each key is in the text (for warnings that name a line: unknown_keys). Kept beside
    the spec, not on it: a private attribute costs every run read back from a store ~2 us to set up."""
    data, lines = parse_text(text, file=file)
    return validate(data, file=file, lines=lines), lines


MAX_WARNINGS = 20

# Keys FedML defines in these blocks that this project reads nothing from: not typos.
_FEDML_EXTRA = {"computing": {"allow_cross_cloud_resources"}}


def unknown_keys(spec: JobSpec, file: str = "job.yaml", lines: _Lines | None = None) -> list[str]:
    """One line per key that looks like a typo: a key no schema defines inside a block with a fixed schema
    (`computing: {minimum_num_gpu: 1}` once launched with 0 GPUs), or a top-level key one letter or so away
    from a known one. Other top-level keys are FedML's free keys (exported as FEDML_ENV_*), not typos."""
    import difflib

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
    text = read_text(path)
    spec, lines = load_text_lines(text, file=name)
    ws_dir = workspace_dir(spec.workspace, p, lines)
    if spec.job_type == "federate" and spec.federate is None and spec.num_nodes == 1 and ws_dir is not None:
        fed = fedml_config_federation(spec, ws_dir)
        if fed is not None:
            spec.federate = fed
    return LoadedJob(spec=spec, path=p.resolve(), workspace_dir=ws_dir, warnings=unknown_keys(spec, name, lines))


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
