"""fedml launch: a self-hosted launcher and scheduler for AI jobs."""

__version__ = "0.1.0"
