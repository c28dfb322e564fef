"""The serve supervisor's file protocol: one definition for both sides of a serve run's directory.

The agent writes CONFIG once and CONTROL when the endpoint is scaled; the supervisor (runtime/workloads/serve.py,
which runs as the job) keeps STATE current and the agent reports it to the scheduler. STATE is written by the
job, so the agent reads it bounded and trusts nothing in it (ports it did not assign are dropped).
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field

CONFIG = "serve.json"  # agent -> supervisor, once: ServeConfig
CONTROL = "control.json"  # agent -> supervisor, on scale: Control
STATE = "replicas.json"  # supervisor -> agent: {"replicas": [replica view...], "want": N, "ports": {...}}
MODULE = "runtime.workloads.serve"  # what the agent runs as the job: python -m MODULE --dir RUN_DIR


@dataclass
class ServeConfig:
    readiness_path: str = "/health"
    replicas: int = 1
    ports: dict[str, int] = field(default_factory=dict)  # replica index -> port, chosen by the agent
    gpus: list[str] = field(default_factory=list)  # shared by the replicas round robin
    grace: float = 8.0  # seconds a replica gets between SIGTERM and SIGKILL

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str | bytes) -> ServeConfig:
        doc = json.loads(text)
        return cls(readiness_path=str(doc.get("readiness_path", "/health")), replicas=int(doc.get("replicas", 1)),
                   ports={str(k): int(v) for k, v in (doc.get("ports") or {}).items()},
                   gpus=[str(g) for g in doc.get("gpus") or []], grace=float(doc.get("grace", 8.0)))


@dataclass
class Control:
    replicas: int
    ports: dict[str, int] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str | bytes) -> Control:
        doc = json.loads(text)
        return cls(replicas=int(doc["replicas"]), ports={str(k): int(v) for k, v in (doc.get("ports") or {}).items()})


def free_port() -> int:
    """A TCP port free now (the agent assigns replicas' ports with it; the supervisor only when none came)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
