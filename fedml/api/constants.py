"""FedML's run states (fedml launch's map onto them: fedml_cli/fedml_names.py)."""

from __future__ import annotations

from enum import Enum, unique


@unique
class RunStatus(Enum):
    """FedML's run states (its scripts compare against these)."""

    NOT_STARTED = "NOT_STARTED"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    KILLED = "KILLED"
    FAILED = "FAILED"
    FINISHED = "FINISHED"
    ABANDONED = "ABANDONED"
    LAUNCHED = "LAUNCHED"
    ERROR = "ERROR"
    BLOCKED = "BLOCKED"
    PRE_QUEUE = "PRE_QUEUE"
    INVALID = "INVALID"
    CLUSTER_QUEUE = "CLUSTER_QUEUE"
    PROVISIONING = "PROVISIONING"
    UNDETERMINED = "UNDETERMINED"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def get_run_enum_from_str(cls, run_status_str: str) -> RunStatus:
        for status in cls:
            if status.value == run_status_str:
                return status
        return cls.UNDETERMINED
