"""Named storage on the command line and in fedml.api (FedML's `fedml storage ...`): a file or directory packed,
uploaded as a blob (with a progress bar) and named for its owner; listed, described, downloaded (unpacked
safely: scheduler.contract.archive) and deleted. Jobs get one in their workspace with `storage:` in the YAML.
Failures are CliErrors; no typer here (the SDK imports this)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import USAGE, CliError


def upload(api: Any, path: str, name: str | None = None, *, description: str = "",
           metadata: dict[str, str] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Pack `path` (a file or a directory), upload it, name it (default: the file or directory's name)."""
    from .pack import pack

    src = Path(path)
    if not src.exists():
        raise CliError(f"{path}: no such file or directory", USAGE)
    name = name or src.resolve().name
    if src.is_dir():
        kind, filename, root, tmp = "dir", None, src, None
    elif src.is_file():
        kind, filename = "file", src.name
        tmp = tempfile.mkdtemp(prefix="fedml-storage-")
        root = Path(tmp)
        try:  # a link, not a copy, where the filesystem allows: a dataset is not written twice
            os.link(src, root / src.name)
        except OSError:
            shutil.copyfile(src, root / src.name)
    else:
        raise CliError(f"{path}: not a regular file or a directory", USAGE)
    try:
        packed = pack(root, show_progress=show_progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        if not api.has_blob(packed.sha256):
            api.put_blob(packed.sha256, packed.path, show_progress=show_progress, what=name)
    finally:
        os.unlink(packed.path)
    return api.request("PUT", f"/storage/{name}", json={
        "sha256": packed.sha256, "kind": kind, "filename": filename, "files": packed.files,
        "description": description, "metadata": metadata or {}}).json()


def download(api: Any, name: str, dest: str = ".") -> Path:
    """Unpack the object into `dest`: a directory as dest/NAME/..., a file as dest/FILENAME. Returns the path."""
    from scheduler.contract.archive import UnsafeArchive, unpack

    obj = api.get(f"/storage/{name}")
    target = Path(dest) if obj["kind"] == "file" else Path(dest) / name
    if obj["kind"] == "file" and (target / (obj.get("filename") or name)).exists():
        raise CliError(f"{target / obj['filename']} exists already", USAGE)
    if obj["kind"] == "dir" and target.exists() and any(target.iterdir()):
        raise CliError(f"{target} exists and is not empty", USAGE)
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as f:
            api.download(f"/storage/{name}/data", f, name, total=obj.get("size"))
        unpack(tmp, target)
    except UnsafeArchive as exc:
        raise CliError(f"storage object {name} refused: {exc}") from None
    finally:
        os.unlink(tmp)
    return target / obj["filename"] if obj["kind"] == "file" else target
