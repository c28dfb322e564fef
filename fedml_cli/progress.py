"""Progress for long work (uploads, downloads, copies) on a terminal: a bar that appears only once the work has
taken over a second, on stderr, and nothing at all off a terminal or with --json (scripts read stdout/stderr)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any


def _show_after() -> float:
    try:  # FEDML_PROGRESS_AFTER=0 shows every bar at once (a slow terminal, or tests)
        return float(os.environ.get("FEDML_PROGRESS_AFTER", "1"))
    except ValueError:
        return 1.0


class Progress:
    def __init__(self, what: str, total: float | None, *, enabled: bool = True, unit: str = "bytes") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self.done = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: float) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.started < _show_after():
                return
            self._start()
        self._bar.update(self._task, completed=self.done)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        cols: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        cols += [DownloadColumn(), TransferSpeedColumn()] if self.unit == "bytes" else [MofNCompleteColumn()]
        cols.append(TimeRemainingColumn())
        self._bar = Bar(*cols, console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task(self.what, total=self.total, completed=self.done)
        self._bar.start()


def read_chunks(path: str, progress: Progress, size: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes in chunks, advancing `progress` as each one is sent."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
            progress.advance(len(chunk))
