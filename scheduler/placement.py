"""Placement: a pipeline of filter steps and score steps over candidate nodes (after Nomad's stack).

Each filter answers "why not" (a reason string) or None; each scorer returns a number, higher is better.
The pipeline is read top to bottom in `PIPELINE`. Like Nomad's limit iterator, a placement looks at nodes in
random order and stops after a few feasible ones (2 for a batch job, log2 n for a service, plus one per
extra gang member): it does not score all 10,000 nodes for every job.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from .contract.jobspec import JobSpec
from .contract.models import GpuInfo, Node, NodeScore


@dataclass(frozen=True)
class Request:
    gpus: int = 0
    resource_type: str | None = None
    gpu_memory_mb: int = 0
    max_cost_per_hour: float | None = None
    labels: tuple[tuple[str, str], ...] = ()
    runtime: str = "process"
    count: int = 1  # nodes wanted (a gang: num_nodes, or federate's server + clients)
    service: bool = False  # long-lived (deploy/serve): worth a wider look for the best node
    owner: str | None = None  # whose run: private nodes take only their owner's
    cpus: float = 0.0  # computing.cpus / memory_gb: the node must have at least this much (0: any)
    memory_mb: int = 0
    team: str | None = None  # whose quota it is charged to (runs of different teams are different shapes)
    preemptible: bool = True  # the job's `preemptible` (only those may use GPUs borrowed from other teams)

    @classmethod
    def of(cls, spec: JobSpec, owner: str | None = None, team: str | None = None) -> Request:
        c = spec.computing
        want_gpu = c.device_type != "CPU"
        return cls(
            gpus=c.minimum_num_gpus if want_gpu else 0,
            resource_type=(c.resource_type or None) if want_gpu and c.minimum_num_gpus else None,
            gpu_memory_mb=int((c.minimum_gpu_memory_gb or 0) * 1024),
            max_cost_per_hour=c.maximum_cost_per_hour,
            labels=tuple(sorted(spec.labels.items())),
            runtime="docker" if spec.containerize else "process",
            count=spec.num_nodes if spec.job_type != "federate" else (
                1 + (spec.federate.clients if spec.federate else max(spec.num_nodes - 1, 1))),
            service=spec.job_type in ("deploy", "serve"),
            owner=owner,
            cpus=float(c.cpus or 0.0),
            memory_mb=int((c.memory_gb or 0) * 1024),
            team=team,
            preemptible=spec.preemptible,
        )

    def shortfall(self) -> str:
        """'no node with 2 free A100-80G GPUs', 'fewer than 3 nodes with 1 free GPU each'."""
        kind = f" {self.resource_type}" if self.resource_type else ""
        what = f" with {self.gpus} free{kind} GPU{'s' if self.gpus > 1 else ''}" if self.gpus else ""
        if self.count > 1:
            return f"fewer than {self.count} nodes" + (f"{what} each" if what else " free")
        return f"no node{what}" if what else "no free node"


@dataclass
class Candidate:
    node: Node
    free: list[GpuInfo]
    now: float
    heartbeat_timeout: float
    last_seen: float | None = None  # the latest heartbeat, when newer than node.last_seen (heartbeats are soft state)


@dataclass
class Choice:
    """One node chosen for a rank, and its GPUs (the store's record of it is models.Placement)."""

    node: Node
    gpus: list[int]
    score: float = 0.0  # the weighted mean of the scorers
    scores: dict[str, float] = field(default_factory=dict)  # each scorer's value, by name
    runners_up: list[NodeScore] = field(default_factory=list)  # (on the first choice) feasible nodes not chosen


@dataclass
class NoFit:
    reason: str  # with the counts of this moment: "no node with 2 free A100-80G GPUs (3 nodes have them busy)"
    never: bool = False  # no node could take it even when idle
    counts: dict[str, int] = field(default_factory=dict)
    summary: str = ""  # what stays true while it waits: "no node with 2 free A100-80G GPUs" (the stored reason)

    def __post_init__(self) -> None:
        self.summary = self.summary or self.reason


_NOISE = {"NVIDIA", "GEFORCE", "TESLA", "GPU"}


def _tokens(name: str) -> set[str]:
    """Whole model tokens; only sizes and form factors are normalised: "80 GB"/"80GB" -> 80G, SXM4 -> SXM.
    NVML names an H100/H200 SXM part by its memory ("H100 80GB HBM3"): HBM3 implies SXM there."""
    s = re.sub(r"(\d+)\s*GB\b", r"\1G", name.upper())
    out = {re.sub(r"^SXM\d$", "SXM", t) for t in re.split(r"[^A-Z0-9]+", s) if t and t not in _NOISE}
    if out & {"HBM3", "HBM3E"} and out & {"H100", "H200"}:
        out.add("SXM")
    return out


@functools.lru_cache(maxsize=4096)
def gpu_matches(wanted: str | None, gpu_name: str) -> bool:
    """Every token of `wanted` is a whole token of the GPU's name: 'A100-80G' matches 'NVIDIA A100 80GB PCIe',
    'TESLA_T4' matches 'Tesla T4'; 'L4' does not match 'L40S', 'T4' not 'T400', 'V100' not 'V100S'."""
    if not wanted:
        return True
    return _tokens(wanted) <= _tokens(gpu_name)


# wanted GPU type -> {GPU name: matches}: placement asks this for every GPU of every node it visits (~10 lists
# of 8 a placement), and a dict lookup is a third of the cached call's cost. Both levels are bounded (the types
# come from users' job files, the names from agents): past the bound a table starts again empty.
_NAME_TABLES: dict[str | None, dict[str, bool]] = {}
_TABLES_MAX, _NAMES_MAX = 256, 4096


def _names_matching(wanted: str | None) -> dict[str, bool]:
    table = _NAME_TABLES.get(wanted)
    if table is None:
        if len(_NAME_TABLES) >= _TABLES_MAX:
            _NAME_TABLES.clear()
        table = _NAME_TABLES[wanted] = {}
    elif len(table) >= _NAMES_MAX:
        table.clear()
    return table


def _matching(req: Request, gpus: Iterable[GpuInfo]) -> list[GpuInfo]:
    """The GPUs of `gpus` of the type and memory `req` asks for."""
    wanted, memory = req.resource_type, req.gpu_memory_mb
    if wanted is None:
        return [g for g in gpus if g.memory_mb >= memory]
    table = _names_matching(wanted)
    out = []
    for g in gpus:
        ok = table.get(g.name)
        if ok is None:
            ok = table[g.name] = gpu_matches(wanted, g.name)
        if ok and g.memory_mb >= memory:
            out.append(g)
    return out


# -- filters -----------------------------------------------------------------------------------------------
Filter = Callable[[Request, Candidate], str | None]


def online(req: Request, c: Candidate) -> str | None:
    seen = c.node.last_seen if c.last_seen is None else c.last_seen
    if c.node.state == "OFFLINE" or c.now - seen > c.heartbeat_timeout:
        return "offline"
    return None


def not_draining(req: Request, c: Candidate) -> str | None:
    return "draining" if c.node.draining else None


def has_runtime(req: Request, c: Candidate) -> str | None:
    return None if req.runtime in c.node.runtimes else f"have no {req.runtime} runtime"


def owner_allows(req: Request, c: Candidate) -> str | None:
    # A private node (joined with a user key, or one whose agent cannot keep jobs from its key) runs only its
    # owner's runs: another user's job there could read that agent's key and act as the node.
    owner = c.node.owner
    return None if owner is None or owner == req.owner else "are private to another user"


def team_allows(req: Request, c: Candidate) -> str | None:
    # A node joined with a token for some teams (`fedml scheduler token create --node --team T`) runs only theirs.
    teams = c.node.teams
    return None if not teams or req.team in teams else "are reserved for other teams"


def labels_match(req: Request, c: Candidate) -> str | None:
    for k, v in req.labels:
        if c.node.labels.get(k) != v:
            return f"lack label {k}={v}"
    return None


def cost_cap(req: Request, c: Candidate) -> str | None:
    price = c.node.price_per_gpu_hour
    if req.max_cost_per_hour is None or price is None or not req.gpus:
        return None
    return "cost more than the cap" if price > req.max_cost_per_hour else None


def cpus_memory(req: Request, c: Candidate) -> str | None:
    # What the node has in all (a node reporting none, e.g. an old agent, is not judged on it).
    if req.cpus and c.node.cpus and c.node.cpus < req.cpus:
        return f"have fewer than {req.cpus:g} CPUs"
    if req.memory_mb and c.node.memory_mb and c.node.memory_mb < req.memory_mb:
        return f"have less than {req.memory_mb / 1024:g} GB of memory"
    return None


def _enough(req: Request, gpus: Iterable[GpuInfo]) -> bool:
    """At least req.gpus of `gpus` are of the type and memory asked for (looks no further than that many)."""
    wanted, memory, need = req.resource_type, req.gpu_memory_mb, req.gpus
    table = None if wanted is None else _names_matching(wanted)
    for g in gpus:
        if table is not None:
            ok = table.get(g.name)
            if ok is None:
                ok = table[g.name] = gpu_matches(wanted, g.name)
            if not ok:
                continue
        if g.memory_mb >= memory:
            need -= 1
            if need <= 0:
                return True
    return need <= 0


def gpus_exist(req: Request, c: Candidate) -> str | None:
    if req.gpus and not _enough(req, c.node.gpus):
        return f"have fewer than {req.gpus}" + (f" {req.resource_type}" if req.resource_type else " GPUs")
    return None


def gpus_free(req: Request, c: Candidate) -> str | None:
    if req.gpus and not _enough(req, c.free):
        return "have them busy"
    return None


# -- scorers -----------------------------------------------------------------------------------------------
# Each scorer answers in [0, 1] (higher is better) and has a name and a weight; a node's score is the weighted
# mean. The values are recorded with the placement (Run.scores) so `fedml run status --explain` can say why one
# node beat another, like Nomad's score metadata.
@dataclass(frozen=True)
class Scorer:
    name: str
    weight: float
    score: Callable[[Request, Candidate], float]


def binpack(req: Request, c: Candidate) -> float:
    """Fewer GPUs left idle after placing is better: keeps whole nodes free for large jobs. 1 when the run leaves
    none idle (a node without GPUs has none to leave), 1/2 with one idle, 1/(1 + idle) in general."""
    return 1.0 / (1.0 + max(len(c.free) - req.gpus, 0)) if c.node.gpus else 1.0


PRICE_SCALE = 2.0  # $ per GPU-hour that scores 1/2 on cost


def cheap(req: Request, c: Candidate) -> float:
    """1 for a node with no price, 1/2 at PRICE_SCALE per GPU-hour, toward 0 as the price grows."""
    return 1.0 / (1.0 + (c.node.price_per_gpu_hour or 0.0) / PRICE_SCALE)


# Packing comes first; cost decides between nodes that pack alike, and wins only when prices differ a lot.
SCORERS: list[Scorer] = [Scorer("binpack", 1.0, binpack), Scorer("cost", 0.25, cheap)]
WEIGHTS = {s.name: s.weight for s in SCORERS}


def scores(req: Request, c: Candidate) -> tuple[float, dict[str, float]]:
    """(weighted mean, each scorer's value) for one node."""
    each: dict[str, float] = {}
    total = weights = 0.0
    for s in SCORERS:  # (a loop, not comprehensions and sums over generators: twice per placement)
        each[s.name] = v = round(s.score(req, c), 4)
        total += s.weight * v
        weights += s.weight
    return round(total / weights, 4), each


# could this node ever?
STATIC_FILTERS: list[Filter] = [owner_allows, team_allows, has_runtime, labels_match, cost_cap, cpus_memory, gpus_exist]
PIPELINE: list[Filter] = [online, not_draining, *STATIC_FILTERS, gpus_free]


def sample_limit(req: Request, n_nodes: int) -> int:
    """How many feasible nodes to score before choosing, as Nomad does: batch jobs take the best of two
    (power of two choices), services the best of log2 n."""
    extra = max(2, math.ceil(math.log2(max(n_nodes, 2)))) if req.service else 2
    return req.count - 1 + extra


def place(req: Request, candidates: list[Candidate], *, reserved: frozenset[str] = frozenset(),
          rng: random.Random | None = None, kind: Container[str] | None = None) -> list[Choice] | NoFit:
    """`req.count` placements on distinct nodes, or NoFit with the reasons. `reserved` nodes are held for a
    job ahead in the queue and are not used. `kind`: the ids of the nodes with GPUs of the type asked for, where
    the caller knows them; the walk passes the others at once (a NoFit's counts leave them out)."""
    rng = rng or random
    n = len(candidates)
    limit = sample_limit(req, n)
    feasible: list[Candidate] = []
    why: dict[str, int] = {}
    # Visit nodes from a random offset with a random stride coprime to n: a random walk over all of them
    # without shuffling n items per job.
    start = rng.randrange(n) if n else 0
    stride = _coprime_stride(n, rng)
    pipeline = PIPELINE
    for k in range(n):
        c = candidates[(start + k * stride) % n]
        if kind is not None and c.node.id not in kind:
            continue
        reason = "are held for a job ahead in the queue" if c.node.id in reserved else None
        if reason is None:
            for f in pipeline:  # (a loop, not a generator per node: this runs for every node visited)
                if (reason := f(req, c)) is not None:
                    break
        if reason is None:
            feasible.append(c)
            if len(feasible) >= limit:
                break
        else:
            why[reason] = why.get(reason, 0) + 1
    if len(feasible) < req.count:
        if not candidates:
            return NoFit("no nodes have joined yet (make a join token with `fedml scheduler token create --node`, then "
                         "on the node: `fedml login --server URL --node`)")
        statically = sum(all(f(req, c) is None for f in STATIC_FILTERS) for c in candidates)
        detail = "; ".join(f"{n} node{'s' if n > 1 else ''} {r if n > 1 else _singular(r)}"
                           for r, n in sorted(why.items()))
        if feasible:
            detail = f"{len(feasible)} node{'s' if len(feasible) > 1 else ''} free; " + detail
        return NoFit(f"{req.shortfall()} ({detail})", never=statically < req.count, counts=why, summary=req.shortfall())
    scored = sorted(((scores(req, c), c) for c in feasible), key=lambda sc: sc[0][0], reverse=True)
    out = []
    for (total, each), c in scored[: req.count]:
        gpus = sorted(g.index for g in _matching(req, c.free))[: req.gpus]
        out.append(Choice(node=c.node, gpus=gpus, score=total, scores=each))
    out[0].runners_up = [NodeScore(node_id=c.node.id, total=total, scores=each, weights=WEIGHTS)
                         for (total, each), c in scored[req.count:]]
    return out


def _singular(reason: str) -> str:
    """"have them busy" -> "has them busy", "are held ..." -> "is held ..." (reasons are written for n nodes)."""
    for plural, one in (("have ", "has "), ("are ", "is "), ("cost ", "costs "), ("lack ", "lacks ")):
        if reason.startswith(plural):
            return one + reason[len(plural):]
    return reason


def _coprime_stride(n: int, rng: random.Random | object) -> int:
    if n <= 2:
        return 1
    for _ in range(8):
        s = rng.randrange(1, n)  # type: ignore[attr-defined]
        if math.gcd(s, n) == 1:
            return s
    return 1


def could_use(req: Request, c: Candidate) -> bool:
    """Could `req` ever run on this node (ignoring what is busy now)?"""
    return all(f(req, c) is None for f in STATIC_FILTERS)


def ranking(req: Request, candidates: list[Candidate]) -> list[str]:
    """Nodes the request could ever use (not draining), most matching GPUs first: the order `reservation` falls
    back on among nodes with none free. Static: a scheduler keeps it per shape until the nodes change."""
    usable = [c for c in candidates if not_draining(req, c) is None and could_use(req, c)]
    usable.sort(key=lambda c: (-len(_matching(req, c.node.gpus)), c.node.id))
    return [c.node.id for c in usable]


def usable_gpus(req: Request, node: Node) -> list[int]:
    """The node's GPUs (indexes) the request could run on, busy or not."""
    return [g.index for g in _matching(req, node.gpus)]


def free_matching(req: Request, c: Candidate) -> int:
    """How many of the node's free GPUs the request could use."""
    return len(_matching(req, c.free))


def reservation(req: Request, candidates: list[Candidate]) -> set[str]:
    """The nodes a blocked head-of-queue job holds: only the `count` it would get first (those it could use with
    the most matching GPUs free, i.e. the least to wait for), not every node it could use. Jobs behind it keep
    flowing on the rest (Slurm's backfill, Kubernetes' Reserve); the held nodes only fill up toward it."""
    usable = [c for c in candidates if online(req, c) is None and not_draining(req, c) is None and could_use(req, c)]
    usable.sort(key=lambda c: (-len(_matching(req, c.free)), -len(_matching(req, c.node.gpus)), c.node.id))
    return {c.node.id for c in usable[: req.count]}
