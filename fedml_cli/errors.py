"""CLI errors and exit codes (see DESIGN.md): every failure the user can cause ends in one of these."""

from __future__ import annotations

OK = 0
FAILED = 1
USAGE = 2  # usage or validation error
UNREACHABLE = 3  # cannot reach the scheduler, or not authenticated
NOT_FOUND = 4  # run (or node) not found
INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: int = FAILED) -> None:
        self.code = code
        super().__init__(message)
