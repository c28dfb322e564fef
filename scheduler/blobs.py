"""Content-addressed blobs (workspaces, artifacts) on the scheduler's disk: blobs/ab/abcdef... named by sha256.

Who may read a blob: the principals recorded as its owners (everyone who uploaded its bytes: content addressing
must not let one user fetch, or learn of, another's workspace by its hash), admins, and a node while a run
that uses it is placed there (checked by the caller). Owners are kept beside the blob (`<sha>.owners`, one per
line), so replicas sharing a blob directory share them too.

Uploads are streamed to a temp file with a size cap, hashed, then checked by scheduler.contract.archive in a worker
thread (at most CHECKS at once): a compression bomb costs a bounded amount of one thread, never the event loop
that answers heartbeats.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from .contract.archive import Limits, UnsafeArchive, check
from .contract.archive import TooLarge as ArchiveTooLarge
from .contract.errors import BadRequest, TooLarge

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHECKS = 2  # archive checks running at once; more uploads wait their turn (each holds its own connection)


class BlobStore:
    def __init__(self, root: str | Path, *, max_bytes: int, max_unpacked_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.max_bytes = max_bytes
        self.max_unpacked_bytes = max_unpacked_bytes
        self._checks: asyncio.Semaphore | None = None

    def path(self, sha: str) -> Path:
        if not SHA256.match(sha):
            raise BadRequest(f"not a sha256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def owners(self, sha: str) -> set[str]:
        try:
            return set(self.path(sha).with_suffix(".owners").read_text().split())
        except FileNotFoundError:
            return set()

    def owned_by(self, sha: str, owner: str) -> bool:
        return self.has(sha) and owner in self.owners(sha)

    def add_owner(self, sha: str, owner: str) -> None:
        if owner in self.owners(sha):
            return
        fd = os.open(self.path(sha).with_suffix(".owners"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(owner + "\n")  # one short O_APPEND write: concurrent uploaders do not clobber each other

    async def put(self, sha: str, chunks: AsyncIterator[bytes], owner: str, *, max_bytes: int | None = None,
                  archive: bool = True) -> tuple[int, bool]:
        """Stream an upload to a temp file, verify hash, size and (for archives) safety, then publish atomically
        and record `owner`. Returns (size, stored: False when the bytes were there already). Nothing is left
        behind when any check fails."""
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
                        raise TooLarge(f"archive is larger than the limit of {limit // (1024 * 1024)} MiB; "
                                             f"add large files to .gitignore or raise --max-workspace-mb")
                    digest.update(chunk)
                    f.write(chunk)
                if digest.hexdigest() != sha:
                    raise BadRequest(f"upload does not match its name: sha256 is {digest.hexdigest()}")
                if final.is_file():  # the same bytes are there: this upload proved the caller has them
                    self.add_owner(sha, owner)
                    return size, False
                await run_in_threadpool(os.fsync, f.fileno())
            if archive:
                await self._check(tmp, max(self.max_unpacked_bytes, 4 * limit))
            os.replace(tmp, final)
            self.add_owner(sha, owner)
            return size, True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def _check(self, path: str, unpacked: int) -> None:
        if self._checks is None:
            self._checks = asyncio.Semaphore(CHECKS)
        async with self._checks:
            try:
                await run_in_threadpool(check, path, Limits(unpacked_bytes=unpacked))
            except ArchiveTooLarge as exc:
                raise TooLarge(f"workspace refused: {exc}; the limit is {unpacked // (1024 * 1024)} MiB "
                                     f"unpacked") from None
            except UnsafeArchive as exc:
                raise BadRequest(f"workspace archive refused: {exc}") from None
