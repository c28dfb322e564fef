"""Content-addressed workspace blobs on the scheduler's disk: blobs/ab/abcdef... named by sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from runtime.workspace import UnsafeArchive, check_archive

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class BlobStore:
    def __init__(self, root: str | Path, *, max_bytes: int, max_unpacked_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_unpacked_bytes = max_unpacked_bytes

    def path(self, sha: str) -> Path:
        if not SHA256.match(sha):
            raise BlobError(400, f"not a sha256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    async def put(self, sha: str, chunks: AsyncIterator[bytes], max_bytes: int | None = None) -> int:
        """Stream an upload to a temp file, verify hash, size and archive safety, then publish atomically.
        Nothing is left behind when any check fails."""
        limit = max_bytes or self.max_bytes
        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise BlobError(413, f"archive is larger than the limit of {limit // (1024 * 1024)} MiB; "
                                             f"add large files to .gitignore or raise --max-workspace-mb")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != sha:
                raise BlobError(400, f"upload does not match its name: sha256 is {digest.hexdigest()}")
            try:
                unpacked = check_archive(tmp)
            except UnsafeArchive as exc:
                raise BlobError(400, f"workspace archive refused: {exc}") from None
            if unpacked > max(self.max_unpacked_bytes, 4 * limit):
                raise BlobError(413, f"workspace unpacks to {unpacked // (1024 * 1024)} MiB, over the limit of "
                                     f"{self.max_unpacked_bytes // (1024 * 1024)} MiB")
            os.replace(tmp, final)
            return size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
