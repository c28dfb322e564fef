"""FedML's run states and how fedml launch's map onto them."""

from __future__ import annotations

from enum import Enum, unique


@unique
class RunStatus(Enum):
    """FedML's run states (its scripts compare against these). Ours map as FROM_OURS says."""

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

    @classmethod
    def of(cls, ours: str, stop_requested: bool = False) -> RunStatus:
        """FedML's state for one of ours: a run asked to stop that has not ended yet is STOPPING; LOST (its node
        went away and it was not retried) is ABANDONED; the rest have the same name."""
        if stop_requested and ours in ("QUEUED", "STARTING", "RUNNING"):
            return cls.STOPPING
        return FROM_OURS.get(ours, cls.UNDETERMINED)


FROM_OURS = {"QUEUED": RunStatus.QUEUED, "STARTING": RunStatus.STARTING, "RUNNING": RunStatus.RUNNING,
             "FINISHED": RunStatus.FINISHED, "FAILED": RunStatus.FAILED, "KILLED": RunStatus.KILLED,
             "LOST": RunStatus.ABANDONED}
