"""CLI errors and exit codes (see DESIGN.md): every failure the user can cause ends in one of these.

`CliError(message, code)` is one of the classes named after its exit code (Failed, Invalid, Unreachable,
NotFound), so Python callers (fedml_cli.client, fedml.api) catch what they mean: `except NotFound`."""

from __future__ import annotations

from typing import Any

OK = 0
FAILED = 1
USAGE = 2  # usage or validation error
UNREACHABLE = 3  # cannot reach the scheduler, or not authenticated
NOT_FOUND = 4  # run (or node) not found
INTERRUPTED = 130


class CliError(Exception):
    default_code = FAILED

    def __new__(cls, message: str = "", code: int | None = None, *args: Any) -> CliError:
        if cls is CliError:
            cls = _BY_CODE.get(FAILED if code is None else code, CliError)
        return super().__new__(cls)

    def __init__(self, message: str = "", code: int | None = None) -> None:
        self.code = self.default_code if code is None else code
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled by its message and code, as it was made)
        return type(self), (str(self), self.code)


class Failed(CliError):
    """Exit 1: the job failed, or the scheduler refused for a reason of its own."""


class Invalid(CliError):
    """Exit 2: a usage or validation error (a bad job file, option, name); nothing was submitted."""

    default_code = USAGE


class Unreachable(CliError):
    """Exit 3: the scheduler cannot be reached, the key is refused, or it cannot store anything now."""

    default_code = UNREACHABLE


class NotFound(CliError):
    """Exit 4: no such run, node, endpoint, sweep, cluster or stored object (or not yours to see)."""

    default_code = NOT_FOUND


_BY_CODE: dict[int, type[CliError]] = {FAILED: Failed, USAGE: Invalid, UNREACHABLE: Unreachable, NOT_FOUND: NotFound}
