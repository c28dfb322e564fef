"""Reading a job file without the job's schema: bounded YAML (size, depth, aliases) with the line of every key,
errors that name the file and line, where the workspace directory is, and whether an environment variable can
be one. No pydantic: `fedml launch` reads a file with this alone and lets the scheduler validate it
(scheduler/contract/jobload.py does the rest)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class JobSpecError(Exception):
    """A job file that cannot be used. `str()` is the one-line message shown to the user."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = file or "job"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


# A job file the scheduler reads as YAML (RunCreate.job_text) is at most this long: YAML is parsed in Python, and
# 32 KiB of the worst kind takes ~0.3 s of the scheduler's CPU (1 MiB took 2.5 s). FedML's job files are a few KiB;
# `fedml launch` validates a longer one itself and sends it as a document.
JOB_TEXT_MAX = 32 * 1024

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


def parse_text(text: str, *, file: str = "job.yaml") -> tuple[Any, _Lines]:
    """The document and the line of each key; JobSpecError (with the line) for what is not bounded YAML."""
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
    return data, lines


def read_text(path: str | Path) -> str:
    """A job file's text, refused before it is read when it is too big; errors name the file."""
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
    return text


def workspace_dir(workspace: Any, path: str | Path, lines: _Lines | None) -> Path | None:
    """Where a job file's `workspace:` is on this machine (relative to the file), checked to be a directory."""
    p, name = Path(path), str(path)
    if workspace is None or not str(workspace).strip():
        return None
    if "\0" in str(workspace):  # no path holds one (the OS refuses it: a ValueError, not an answer)
        raise JobSpecError("contains a NUL character (no path can)", file=name,
                           line=lines.line_of(("workspace",)) if lines is not None else None, field="workspace")
    try:  # the OS may refuse the name itself (ENAMETOOLONG, ELOOP...): an answer about the file, not a traceback
        ws_dir = Path(str(workspace)).expanduser()
        ws_dir = ws_dir if ws_dir.is_absolute() else (p.parent / ws_dir)
        if not ws_dir.is_dir():
            what = "is not a directory" if ws_dir.exists() else "directory not found"
            raise JobSpecError(f'{what}: "{workspace}" (resolved to {ws_dir.resolve()})', file=name,
                               line=lines.line_of(("workspace",)) if lines is not None else None, field="workspace")
        ws_dir = ws_dir.resolve()
    except (OSError, RuntimeError) as exc:
        raise JobSpecError(f"cannot be used as a directory: {exc.strerror if isinstance(exc, OSError) else exc}",
                           file=name, line=lines.line_of(("workspace",)) if lines is not None else None,
                           field="workspace") from None
    if ws_dir == Path(ws_dir.anchor):
        raise JobSpecError(f'"{workspace}" is the root of the filesystem: point workspace at the '
                           "directory that holds the job's code", file=name, field="workspace")
    return ws_dir
