"""What the scheduler refuses, by kind, and the one table that maps each kind to an HTTP status.

The server's code raises these (never an HTTP status); scheduler/app.py answers with STATUS[kind]; a client
turns a status back into the kind with `from_status`. The CLI's exit codes (fedml_cli/errors.py) follow from
the kind: 3 for Unauthenticated, 4 for NotFound, 2 for Invalid and BadRequest.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the scheduler refuses; the message is the answer's `detail`, shown to the user as it is."""

    def __str__(self) -> str:  # as written, also where a subclass is a KeyError too (which would quote it)
        return str(self.args[0]) if self.args else ""


class BadRequest(ApiError):
    """Malformed: not a digest, an upload that does not match its name, an archive that cannot be read."""


class Unauthenticated(ApiError):
    """No key, or a key that is unknown, revoked or expired."""


class Forbidden(ApiError):
    """A known principal asking for what is not its own (another user's run, a node key launching)."""


class NotFound(ApiError):
    """No such run, node, endpoint, key or blob (or none the caller may know of)."""


class Conflict(ApiError):
    """The state forbids it now: a name that exists already, a run that has ended, a node that is draining."""


class Gone(ApiError):
    """It existed and has been used up or removed (a spent join token)."""


class TooLarge(ApiError):
    """A body or an archive over its limit."""


class Invalid(ApiError):
    """Well-formed but not acceptable: a job spec, a value out of range, a job that can never run here."""


class BadGateway(ApiError):
    """An endpoint's replica answered with something that is not HTTP, or not at all."""


class Unavailable(ApiError):
    """Not now: no ready replica, the store out of space."""


class GatewayTimeout(ApiError):
    """An endpoint's replica did not answer in time."""


STATUS: dict[type[ApiError], int] = {
    BadRequest: 400, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409, Gone: 410,
    TooLarge: 413, Invalid: 422, BadGateway: 502, Unavailable: 503, GatewayTimeout: 504,
}


def status_of(exc: ApiError) -> int:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 400


def from_status(status: int, detail: str) -> ApiError:
    """The error a client raises for an answer with this status (ApiError itself for one not in the table)."""
    for kind, code in STATUS.items():
        if code == status:
            return kind(detail)
    return ApiError(detail)
