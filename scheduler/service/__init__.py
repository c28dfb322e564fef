"""The scheduler's behaviour, independent of HTTP, one module per noun: runs, nodes, the agent side (polls,
reports, heartbeats) and placement passes, over a shared core (locks, caches, the run state's one writer).

Every method that takes a Principal asks scheduler/access.py who may do what.
"""

from .agents import AgentsMixin
from .clusters import ClustersMixin
from .core import ACTIVE, LOCAL, new_run_id
from .metrics import MetricsMixin
from .nodes import NodesMixin
from .placing import PlacementMixin
from .queue import QueueMixin
from .runs import RunsMixin
from .teams import TeamsMixin


class Scheduler(RunsMixin, NodesMixin, ClustersMixin, AgentsMixin, PlacementMixin, QueueMixin, MetricsMixin,
                TeamsMixin):
    """The one object routes and tests drive; each noun's methods live in their own module."""


__all__ = ["ACTIVE", "LOCAL", "Scheduler", "new_run_id"]
