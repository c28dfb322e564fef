"""fedml launch: a self-hosted launcher and scheduler for AI jobs."""

from scheduler.contract import __version__

__all__ = ["__version__"]
