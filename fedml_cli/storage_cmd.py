"""`fedml storage ...`: named files and directories in the scheduler's storage (FedML's storage commands), which
jobs get in their workspace with `storage: [{name: NAME, path: DIR}]` (fedml_cli/storage.py).

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from .errors import USAGE, CliError
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json

storage_app = typer.Typer(
    help="Named files and directories kept by the scheduler (yours alone): upload, list, describe, download, "
         "delete. A job gets one in its workspace with `storage: [{name: NAME, path: data/}]`.",
    no_args_is_help=True, rich_markup_mode=None)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The object's name.")]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@storage_app.command("upload")
def storage_upload(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A file or a directory.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Its name (default: the file's or directory's).")]
    = None,
    description: Annotated[str, typer.Option("--description", "-d", help="A line saying what it is.")] = "",
    user_metadata: Annotated[str | None, typer.Option("--user_metadata", "--user-metadata", "-um", metavar="JSON",
                                                      help='Metadata, a JSON object of strings: {"source": "..."}.')]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a file or directory under a name (replacing what the name held; runs launched before keep
    theirs). A progress bar shows on a terminal."""
    from . import storage
    from .api import connect

    meta: dict[str, str] = {}
    if user_metadata:
        try:
            raw = json.loads(user_metadata)
        except ValueError as exc:
            raise CliError(f"--user_metadata: not JSON: {exc}", USAGE) from None
        if not isinstance(raw, dict):
            raise CliError("--user_metadata: expected a JSON object", USAGE)
        meta = {str(k): str(v) for k, v in raw.items()}
    obj = storage.upload(connect(), path, name, description=description, metadata=meta,
                         show_progress=sys.stderr.isatty() and not as_json)
    if as_json:
        _print_json(obj)
    else:
        _err(f"Stored {obj['name']} ({obj['kind']}, {obj['files']} file(s), {_size(obj['size'])} packed). Use it in a "
             f"job: storage: [{{name: {obj['name']}, path: data/}}]")


@storage_app.command("list")
def storage_list(everyone: Annotated[bool, typer.Option("--all", help="Everyone's (admin).")] = False,
                 as_json: JsonOpt = False) -> None:
    """Your stored objects."""
    from .api import connect

    objs = connect().get("/storage", params={"everyone": everyone})
    if as_json:
        _print_json(objs)
        return
    if not objs:
        _err("no stored objects (fedml storage upload PATH -n NAME)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", *(("OWNER",) if everyone else ()), "KIND", "FILES", "SIZE", "CREATED", "DESCRIPTION"):
        table.add_column(col)
    for o in objs:
        table.add_row(o["name"], *((o["owner"],) if everyone else ()), o["kind"], str(o["files"]), _size(o["size"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(o["created_at"])), o["description"])
    (Console() if sys.stdout.isatty() else Console(width=250)).print(table)


@storage_app.command("get-metadata")
def storage_metadata(name: NameArg, as_json: JsonOpt = False) -> None:
    """One object: kind, size, files, its content's sha256, description, metadata."""
    from .api import connect

    obj = connect().get(f"/storage/{name}")
    if as_json:
        _print_json(obj)
        return
    for k in ("name", "kind", "filename", "files", "size", "sha256", "description", "metadata"):
        v = obj.get(k)
        sys.stdout.write(f"{k:>11}  {_size(v) if k == 'size' else json.dumps(v) if isinstance(v, dict) else v}\n")


@storage_app.command("download")
def storage_download(
    name: NameArg,
    dest: Annotated[str, typer.Option("--dest_path", "--dest-path", "-p", metavar="DIR",
                                      help="Where to put it (a directory lands in DIR/NAME).")] = ".",
) -> None:
    """Download and unpack an object (nothing is written outside DIR, whatever the archive holds)."""
    from . import storage
    from .api import connect

    _err(f"{name} -> {storage.download(connect(), name, dest)}")


@storage_app.command("delete")
def storage_delete(name: NameArg, as_json: JsonOpt = False) -> None:
    """Delete the name (runs launched with it keep what they had)."""
    from .api import connect

    obj = connect().delete(f"/storage/{name}")
    if as_json:
        _print_json(obj)
    else:
        _err(f"Deleted {name}.")
