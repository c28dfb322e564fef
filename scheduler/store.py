"""The store interface: everything the scheduler persists, behind one small surface.

SQLite (sqlite_store.py) is the embedded default; a Redis store implements the same methods for scale-out.
Every method that changes state has committed it durably when it returns, so an API handler that calls
it may acknowledge.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable
from typing import Any

from .models import ApiKey, LogRow, Node, Run, RunStatus


class NotFound(KeyError):
    pass


class SeqGap(Exception):
    """A log batch starts after the next expected sequence number: lines in between were never received."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        super().__init__(f"expected sequence {expected}")


class Store(abc.ABC):
    # -- runs --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_run(self, run: Run) -> Run: ...

    @abc.abstractmethod
    def get_run(self, run_id: str) -> Run | None: ...

    @abc.abstractmethod
    def list_runs(self, *, status: Iterable[RunStatus] | None = None, node_id: str | None = None,
                  owner: str | None = None, limit: int = 1000) -> list[Run]: ...

    @abc.abstractmethod
    def transition(self, run_id: str, to: RunStatus, **fields: object) -> Run:
        """Move a run to `to` if the state machine allows it from its current state (compare-and-set),
        setting `fields` in the same write. Raises InvalidTransition or NotFound."""

    @abc.abstractmethod
    def update_run(self, run_id: str, **fields: object) -> Run:
        """Change fields other than status (reason, stop_requested...)."""

    # -- logs --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def append_logs(self, run_id: str, attempt: int, rank: int, first_seq: int,
                    lines: list[tuple[float, str, str]]) -> int:
        """Store lines first_seq.. for (run, attempt, rank); lines below the next expected seq are duplicates
        and are dropped. Returns the next expected seq. Raises SeqGap if first_seq is beyond it."""

    @abc.abstractmethod
    def read_logs(self, run_id: str, after: int = -1, limit: int = 5000,
                  rank: int | None = None) -> list[LogRow]:
        """Lines with pos > after, in order."""

    @abc.abstractmethod
    def next_seq(self, run_id: str, attempt: int, rank: int) -> int: ...

    # -- nodes -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def upsert_node(self, node: Node) -> Node: ...

    @abc.abstractmethod
    def get_node(self, node_id: str) -> Node | None: ...

    @abc.abstractmethod
    def list_nodes(self) -> list[Node]: ...

    @abc.abstractmethod
    def node_by_name(self, name: str) -> Node | None: ...

    @abc.abstractmethod
    def touch_node(self, node_id: str, ts: float) -> Node:
        """Record a heartbeat; an OFFLINE node becomes ONLINE. Returns the node. Raises NotFound."""

    @abc.abstractmethod
    def delete_node(self, node_id: str) -> None: ...

    # -- API keys ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    def key_by_hash(self, digest: str) -> ApiKey | None: ...

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    def batch(self) -> Any:
        """Group several writes into one durable commit (nothing is acknowledged before it ends)."""
        return contextlib.nullcontext()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
