"""Placement: a pipeline of filter steps and score steps over candidate nodes (after Nomad's stack).

Each filter answers "why not" (a reason string) or None; each scorer returns a number, higher is better.
The pipeline is read top to bottom in `PIPELINE`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .jobspec import JobSpec
from .models import GpuInfo, Node, Run


@dataclass(frozen=True)
class Request:
    gpus: int = 0
    resource_type: str | None = None
    gpu_memory_mb: int = 0
    max_cost_per_hour: float | None = None
    labels: tuple[tuple[str, str], ...] = ()
    runtime: str = "process"

    @classmethod
    def of(cls, spec: JobSpec) -> Request:
        c = spec.computing
        want_gpu = c.device_type != "CPU"
        return cls(
            gpus=c.minimum_num_gpus if want_gpu else 0,
            resource_type=(c.resource_type or None) if want_gpu and c.minimum_num_gpus else None,
            gpu_memory_mb=int((c.minimum_gpu_memory_gb or 0) * 1024),
            max_cost_per_hour=c.maximum_cost_per_hour,
            labels=tuple(sorted(spec.labels.items())),
            runtime="docker" if spec.containerize else "process",
        )

    def describe(self) -> str:
        if not self.gpus:
            return "a node"
        kind = f" {self.resource_type}" if self.resource_type else ""
        return f"{self.gpus} free{kind} GPU{'s' if self.gpus > 1 else ''}"


@dataclass
class Candidate:
    node: Node
    free: list[GpuInfo]
    now: float
    heartbeat_timeout: float


@dataclass
class Placement:
    node: Node
    gpus: list[int]


@dataclass
class NoFit:
    reason: str
    never: bool = False  # no node could take it even when idle
    counts: dict[str, int] = field(default_factory=dict)


_NOISE = {"NVIDIA", "GEFORCE", "TESLA", "GPU"}


def _tokens(name: str) -> list[str]:
    s = re.sub(r"(\d+)\s*GB\b", r"\1G", name.upper())
    return [t for t in re.split(r"[^A-Z0-9]+", s) if t and t not in _NOISE]


def gpu_matches(wanted: str | None, gpu_name: str) -> bool:
    """'A100-80G' matches 'NVIDIA A100 80GB PCIe'; 'TESLA_T4' matches 'Tesla T4'; a token may be a prefix."""
    if not wanted:
        return True
    have = _tokens(gpu_name)
    return all(any(h == w or h.startswith(w) for h in have) for w in _tokens(wanted))


def _matching(req: Request, gpus: Iterable[GpuInfo]) -> list[GpuInfo]:
    return [g for g in gpus if gpu_matches(req.resource_type, g.name) and g.memory_mb >= req.gpu_memory_mb]


# -- filters -----------------------------------------------------------------------------------------------
Filter = Callable[[Request, Candidate], str | None]


def online(req: Request, c: Candidate) -> str | None:
    if c.node.state == "OFFLINE" or c.now - c.node.last_seen > c.heartbeat_timeout:
        return "offline"
    return None


def not_draining(req: Request, c: Candidate) -> str | None:
    return "draining" if c.node.state == "DRAINING" else None


def has_runtime(req: Request, c: Candidate) -> str | None:
    return None if req.runtime in c.node.runtimes else f"no {req.runtime} runtime"


def labels_match(req: Request, c: Candidate) -> str | None:
    for k, v in req.labels:
        if c.node.labels.get(k) != v:
            return f"label {k}={v} missing"
    return None


def cost_cap(req: Request, c: Candidate) -> str | None:
    price = c.node.price_per_gpu_hour
    if req.max_cost_per_hour is None or price is None or not req.gpus:
        return None
    return "too expensive" if price > req.max_cost_per_hour else None


def gpus_exist(req: Request, c: Candidate) -> str | None:
    if req.gpus and len(_matching(req, c.node.gpus)) < req.gpus:
        return f"fewer than {req.gpus} matching GPUs"
    return None


def gpus_free(req: Request, c: Candidate) -> str | None:
    if req.gpus and len(_matching(req, c.free)) < req.gpus:
        return "GPUs busy"
    return None


# -- scorers -----------------------------------------------------------------------------------------------
Scorer = Callable[[Request, Candidate], float]


def binpack(req: Request, c: Candidate) -> float:
    # Fewer GPUs left idle after placing is better: keeps whole nodes free for large jobs.
    return -float(len(c.free) - req.gpus) if c.node.gpus else 0.0


def cheap(req: Request, c: Candidate) -> float:
    return -(c.node.price_per_gpu_hour or 0.0) / 1000.0


STATIC_FILTERS: list[Filter] = [has_runtime, labels_match, cost_cap, gpus_exist]  # could this node ever?
PIPELINE: list[Filter] = [online, not_draining, *STATIC_FILTERS, gpus_free]
SCORERS: list[Scorer] = [binpack, cheap]


def free_gpus(node: Node, active_runs: Iterable[Run]) -> list[GpuInfo]:
    held = {i for r in active_runs if r.node_id == node.id for i in r.gpus}
    return [g for g in node.gpus if g.index not in held]


def place(req: Request, candidates: list[Candidate]) -> Placement | NoFit:
    feasible: list[Candidate] = []
    why: dict[str, int] = {}
    for c in candidates:
        reason = next((r for f in PIPELINE if (r := f(req, c)) is not None), None)
        if reason is None:
            feasible.append(c)
        else:
            why[reason] = why.get(reason, 0) + 1
    if not feasible:
        never = not any(all(f(req, c) is None for f in STATIC_FILTERS) for c in candidates)
        if not candidates:
            return NoFit("no nodes have joined yet (start one with `fedml login`)", never=False)
        detail = "; ".join(f"{n} node{'s' if n > 1 else ''}: {r}" for r, n in sorted(why.items()))
        return NoFit(f"no node with {req.describe()} ({detail})", never=never, counts=why)
    best = max(feasible, key=lambda c: sum(s(req, c) for s in SCORERS))
    gpus = sorted(g.index for g in _matching(req, best.free))[: req.gpus]
    return Placement(node=best.node, gpus=gpus)
