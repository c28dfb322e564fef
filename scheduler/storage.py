"""Named storage (`fedml storage upload/list/download/delete`): a name, per owner, for an uploaded blob (a tar.gz
of a file or a directory, content-addressed in the BlobStore). The records are JSON files beside the blobs,
storage/<owner's digest>/<name>.json, so replicas sharing a blob directory share them; each is written to a temp
file and renamed into place (a reader sees the old record or the new one, never half of one). Deleting a name
leaves the blob: other names and runs may use the same bytes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .contract.models import STORAGE_NAME, StorageObject


class NamedStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "storage"

    def _dir(self, owner: str) -> Path:
        return self.root / hashlib.sha256(owner.encode()).hexdigest()[:32]

    def _path(self, owner: str, name: str) -> Path:
        if not STORAGE_NAME.fullmatch(name):
            raise ValueError(f'"{name[:80]}" is not a storage name (letters, digits, "-", "_", ".")')
        return self._dir(owner) / f"{name}.json"

    def get(self, owner: str, name: str) -> StorageObject | None:
        try:
            return StorageObject.model_validate_json(self._path(owner, name).read_bytes())
        except FileNotFoundError:
            return None

    def put(self, obj: StorageObject) -> StorageObject:
        path = self._path(obj.owner, obj.name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(obj.model_dump_json())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return obj

    def delete(self, owner: str, name: str) -> bool:
        try:
            self._path(owner, name).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self, owner: str | None) -> list[StorageObject]:
        """The owner's objects (None: everyone's), by name."""
        dirs = [self._dir(owner)] if owner is not None else (
            [d for d in self.root.iterdir() if d.is_dir()] if self.root.is_dir() else [])
        out = []
        for d in dirs:
            for f in d.glob("*.json") if d.is_dir() else []:
                try:
                    out.append(StorageObject.model_validate_json(f.read_bytes()))
                except (OSError, ValueError):
                    continue  # (removed meanwhile)
        return sorted(out, key=lambda o: (o.name, o.owner))


__all__ = ["NamedStorage"]
