"""The one model set shared by CLI, API and agent: runs, nodes, log lines, and the run state machine.

Kept free of FastAPI so the CLI can import it.
One module, a little over the usual size: the wire's nouns read best side by side (what a poll carries
next to what a run holds).
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import time
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_serializer,
    field_validator,
    model_validator,
)

from .jobspec import JobSpec, NotifyTarget
from .jobyaml import JOB_TEXT_MAX


class RunStatus(str, Enum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    LOST = "LOST"
    # Being stopped for a run that outranks it (docs/teams.md: preemption): its GPUs are held until its ranks
    # have stopped (SIGTERM, then the job's grace); then it is QUEUED again as its next attempt.
    PREEMPTED = "PREEMPTED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED})
UNSETTLED = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING, RunStatus.LOST,
             RunStatus.PREEMPTED)  # not ended yet

# The run state machine, in one place. LOST (node vanished) goes back to QUEUED when the retry policy allows.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.STARTING, RunStatus.KILLED, RunStatus.FAILED}),
    RunStatus.STARTING: frozenset({RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED,
                                   RunStatus.LOST, RunStatus.QUEUED, RunStatus.PREEMPTED}),
    # RUNNING -> QUEUED: a failed attempt retried (retry.on: [error]).
    RunStatus.RUNNING: frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED, RunStatus.LOST,
                                  RunStatus.QUEUED, RunStatus.PREEMPTED}),
    # PREEMPTED -> QUEUED once its ranks have stopped (the next attempt); KILLED when a stop was asked meanwhile;
    # FINISHED or FAILED when its ranks ended that way before the stop reached them.
    RunStatus.PREEMPTED: frozenset({RunStatus.QUEUED, RunStatus.KILLED, RunStatus.FINISHED, RunStatus.FAILED}),
    RunStatus.LOST: frozenset({RunStatus.QUEUED, RunStatus.FAILED, RunStatus.KILLED}),
    RunStatus.FINISHED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.KILLED: frozenset(),
}


class InvalidTransition(Exception):
    def __init__(self, run_id: str, current: RunStatus, wanted: RunStatus) -> None:
        self.run_id, self.current, self.wanted = run_id, current, wanted
        super().__init__(f"run {run_id} is {current.value}; it cannot become {wanted.value}")


def check_transition(run_id: str, current: RunStatus, wanted: RunStatus) -> None:
    if wanted not in TRANSITIONS[current]:
        raise InvalidTransition(run_id, current, wanted)


TEAM_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"  # a team's name (docs/teams.md)


class Spent(BaseModel):
    """A run's use of GPUs: GPU-seconds over all its attempts, and their cost (node price x GPUs x time)."""

    gpu_seconds: float = 0.0
    cost: float = 0.0


class Preemption(BaseModel):
    """Why a run is PREEMPTED: the run it makes room for, whose it is, and why that run outranks it."""

    by: str  # the run it makes room for
    owner: str
    team: str | None = None
    why: str  # "priority 10 over 0 in team vision", "team vision reclaims its quota of 4 A100 GPUs"
    grace: float = 30.0  # seconds its ranks get between SIGTERM and SIGKILL (the job's preemption.grace)
    requeue: bool = True  # False: a stop was asked while it was being preempted (it ends KILLED)
    at: float = Field(default_factory=time.time)

    def text(self) -> str:
        return f"preempted by {self.by} of {self.owner}" + (f" (team {self.team})" if self.team else "") + \
            f": {self.why}"


class Placement(BaseModel):
    """One rank of a run on one node. A run with num_nodes: N has N, on N distinct nodes."""

    rank: int
    node_id: str
    gpus: list[int] = Field(default_factory=list)
    status: RunStatus = RunStatus.STARTING
    exit_code: int | None = None
    reason: str | None = None
    price_per_gpu_hour: float | None = None  # its node's price when it was placed (what its GPU-hours cost)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL or self.status == RunStatus.LOST


class Artifact(BaseModel):
    """Files a rank left in its FEDML_ARTIFACT_DIR, kept by the scheduler as a content-addressed tar.gz."""

    rank: int
    attempt: int
    sha256: str
    size: int
    files: int


class ReplicaState(BaseModel):
    """One replica of an endpoint, as the node's serve supervisor reports it (runtime/workloads/serve.py)."""

    index: int
    port: int
    state: str  # starting | ready | unready | restarting | exited | stopping
    address: str = "127.0.0.1"  # filled in by the scheduler from the node's address
    node_id: str = ""
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    since: float = Field(default_factory=time.time)
    message: str | None = None


class Endpoint(BaseModel):
    """The serving side of a deploy/serve run: its name in the gateway, its scale and its replicas."""

    name: str
    replicas: int  # desired now (set by `fedml endpoint scale` or the autoscaler)
    min_replicas: int
    max_replicas: int
    states: list[ReplicaState] = Field(default_factory=list)
    attempt: int = 0  # the attempt the states belong to
    # From the job's typed service config (`service:` or FedML's request_timeout_sec), fixed at launch.
    request_timeout: float = 60.0
    predict_path: str = "/predict"
    target_inflight: float = 4.0
    scale_down_delay: float = 30.0

    @property
    def autoscale(self) -> bool:
        return self.min_replicas < self.max_replicas

    def ready(self) -> list[ReplicaState]:
        return [r for r in self.states if r.state == "ready"]


class ScaleRequest(BaseModel):
    replicas: int | None = Field(default=None, ge=0, le=64)
    min_replicas: int | None = Field(default=None, ge=0, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)


class ReplicaReport(BaseModel):
    attempt: int
    replicas: list[ReplicaState]


class NodeScore(BaseModel):
    """How placement scored one feasible node: each scorer's value in [0, 1] by name, and their weighted mean
    (`fedml run status --explain`; scheduler/placement.py has the scorers and weights)."""

    node_id: str
    rank: int | None = None  # the rank placed there; None: feasible, not chosen
    total: float
    scores: dict[str, float] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)  # each scorer's weight when it was scored


class AttemptRecord(BaseModel):
    """An attempt that has ended and was followed by another: where it ran and why it ended (`run status`)."""

    attempt: int
    placements: list[Placement] = Field(default_factory=list)
    reason: str | None = None
    started_at: float | None = None
    ended_at: float = Field(default_factory=time.time)
    preempted_by: str | None = None  # the run it was stopped for (PREEMPTED), if that is how it ended


class Dependency(BaseModel):
    """A run this one waits for (`fedml launch --after RUN[:ok|:any]`): it starts once that run has ended, and
    with "ok" only if it FINISHED (otherwise it fails, saying why)."""

    run_id: str = Field(max_length=64)
    when: Literal["ok", "any"] = "ok"

    @classmethod
    def parse(cls, text: str) -> Dependency:
        """"RUN_ID", "RUN_ID:ok" or "RUN_ID:any". ValueError saying what is wrong."""
        run_id, _, when = str(text).partition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", run_id) or when not in ("", "ok", "any"):
            raise ValueError(f'"{str(text)[:80]}": expected RUN_ID, RUN_ID:ok or RUN_ID:any')
        return cls(run_id=run_id, when=when or "ok")  # type: ignore[arg-type]


class SweepPoint(BaseModel):
    """A run that is one point of a sweep (`sweep:` in the job, `fedml launch --sweep`): the sweep's id (its
    parent, `fedml run status SWEEP`), the point's index among `size`, its values, and the most of the sweep's
    points queued or running at once."""

    id: str
    index: int
    size: int
    point: dict[str, Any] = Field(default_factory=dict)
    max_parallel: int | None = None


class Run(BaseModel):
    id: str
    name: str
    status: RunStatus = RunStatus.QUEUED
    job: JobSpec  # typed once where a run is read; on the wire and in the stores, the spec's document
    job_file: str | None = None
    job_text: str | None = None  # the job file as submitted (comments and all), when it came as text
    workspace_sha: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)  # keys of its job file that look like typos, when it came
    priority: int = 0
    owner: str = "local"
    num_nodes: int = 1
    placements: list[Placement] = Field(default_factory=list)  # of the current attempt
    scores: list[NodeScore] = Field(default_factory=list)  # how the current attempt's nodes were chosen
    master_port: int | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    endpoint: Endpoint | None = None  # deploy/serve runs
    node_id: str | None = None  # rank 0's node, for display
    gpus: list[int] = Field(default_factory=list)  # rank 0's GPUs, for display
    attempt: int = 1
    attempts: list[AttemptRecord] = Field(default_factory=list)  # earlier attempts, oldest first
    exit_code: int | None = None
    reason: str | None = None
    stop_requested: bool = False
    preempted: Preemption | None = None  # while PREEMPTED: for which run, and why
    after: list[Dependency] = Field(default_factory=list)  # runs it waits for (Dependency)
    sweep: SweepPoint | None = None  # the sweep it is a point of
    mounts: list[Mount] = Field(default_factory=list)  # storage objects unpacked into its workspace
    deliveries: list[Delivery] = Field(default_factory=list)  # its webhooks' deliveries, the latest 20
    team: str | None = None  # the team of the key that launched it (docs/teams.md)
    # "TEAM\tBUCKET" while placed against its team's quota for BUCKET (a GPU type, or "any"): the stores keep the
    # GPUs each key holds, and refuse a placement past the quota (Store.transition's quota_limit)
    quota_key: str | None = None
    # GPU-seconds and cost of its earlier attempts (spent() adds the current one's): kept when attempts are
    # dropped from `attempts`.
    gpu_seconds_done: float = 0.0
    cost_done: float = 0.0
    spent: Spent | None = None  # filled when a run is read (spent()): never stored
    log_count: int = 0
    node_names: dict[str, str] = Field(default_factory=dict)  # node id -> name, filled when a run is read
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    # The store's change counter at the write that made this object (set by a store on what it has just written;
    # None on what it reads, and on a copy being changed). The scheduler's book applies its own writes as it makes
    # them, and the change feed then leaves them out instead of reading them back (Store.runs_changed_since).
    _version: int | None = PrivateAttr(default=None)

    @property
    def version(self) -> int | None:
        """_version, read without pydantic's look-up of a private attribute (2.7 us: it asks the attribute's
        default for a descriptor and catches the AttributeError), which a pass made four times per placement."""
        return self.__pydantic_private__["_version"]  # type: ignore[index]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @field_serializer("job")
    def _job_document(self, job: JobSpec) -> dict[str, Any]:
        return job.model_dump(mode="json", exclude_none=True)

    def attempt_spent(self, now: float) -> tuple[float, float]:
        """(GPU-seconds, cost) of the current attempt: every GPU of its placements from its start (RUNNING) to its
        end (or `now`); cost at each node's price when it was placed (none: free)."""
        if self.started_at is None:
            return 0.0, 0.0
        seconds = max(0.0, (self.ended_at if self.ended_at is not None else now) - self.started_at)
        gpus = sum(len(p.gpus) for p in self.placements)
        cost = sum(len(p.gpus) * (p.price_per_gpu_hour or 0.0) for p in self.placements) * seconds / 3600
        return gpus * seconds, cost

    def spend(self, now: float) -> Spent:
        """What the run has used so far (docs/teams.md: usage)."""
        gpu_s, cost = self.attempt_spent(now)
        return Spent(gpu_seconds=round(self.gpu_seconds_done + gpu_s, 3), cost=round(self.cost_done + cost, 6))

    def gpu_claims(self) -> set[tuple[str, int]]:
        """The GPUs this run holds, as (node id, index): those of its unfinished placements while it is
        unfinished. Both stores refuse a write that would let two runs hold one GPU."""
        if self.terminal:
            return set()
        return {(p.node_id, g) for p in self.placements if not p.done for g in p.gpus}

    def changed(self, to: RunStatus | None = None, *, now: float | None = None, **fields: Any) -> Run:
        """This run with `fields` set (and, given `to`, moved to that status if the state machine allows it:
        InvalidTransition otherwise), stamped: started_at at its first RUNNING, ended_at when it ends,
        updated_at always; rank 0's node and GPUs copied for display. A store persists exactly this."""
        fields = dict(fields)  # (every field set by one copy: an attribute set on a model costs ~1.5 us)
        now = time.time() if now is None else now
        if to is not None:
            check_transition(self.id, self.status, to)
            fields["status"] = to
            if to == RunStatus.RUNNING and fields.get("started_at", self.started_at) is None:
                fields["started_at"] = now
            if to.terminal:
                fields["ended_at"] = now
        fields["updated_at"] = now
        if placements := fields.get("placements", self.placements):
            fields["node_id"], fields["gpus"] = placements[0].node_id, placements[0].gpus
        new = self.model_copy(update=fields)
        new._version = None  # (not written yet)
        return new

    def placement_on(self, node_id: str) -> Placement | None:
        return next((p for p in self.placements if p.node_id == node_id), None)

    def ran_on(self, attempt: int, node_id: str) -> bool:
        """Did `attempt` (an earlier one) have a rank on this node?"""
        return any(a.attempt == attempt and any(p.node_id == node_id for p in a.placements) for a in self.attempts)


class GpuInfo(BaseModel):
    index: int
    name: str
    memory_mb: int = 0
    utilization: int | None = None


def parse_gpu_decl(decl: str) -> list[GpuInfo]:
    """`A100-80G:4` or `A100-80G:4:81920` (memory MB), comma-separated: declared GPUs, like Slurm's gres."""
    out: list[GpuInfo] = []
    for part in filter(None, (p.strip() for p in decl.split(","))):
        bits = part.split(":")
        if len(bits) not in (2, 3) or not bits[0]:
            raise ValueError(f"--gpus {part!r}: expected TYPE:COUNT or TYPE:COUNT:MEMORY_MB")
        try:
            count = int(bits[1])
            mem = int(bits[2]) if len(bits) == 3 else 0
        except ValueError:
            raise ValueError(f"--gpus {part!r}: COUNT and MEMORY_MB must be integers") from None
        base = len(out)
        out.extend(GpuInfo(index=base + i, name=bits[0], memory_mb=mem) for i in range(count))
    return out


class NodeInfo(BaseModel):
    """What an agent reports about its machine when it registers."""

    name: str
    gpus: list[GpuInfo] = Field(default_factory=list)
    cpus: int = 1
    memory_mb: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    price_per_gpu_hour: float | None = None
    runtimes: list[str] = Field(default_factory=lambda: ["process"])
    address: str = "127.0.0.1"
    agent_version: str = ""
    # The user the agent runs jobs as when that is not the agent's own user (a root agent): only then can jobs
    # of several users share the node. None: jobs run as the agent's user, so the node is single-tenant.
    job_user: str | None = None


class Node(NodeInfo):
    id: str
    # Set: a private node, placed only runs of this owner (joined with a user key, or an agent that cannot keep
    # jobs from its own key). None: shared by every user (joined with an admin key or a join token).
    owner: str | None = None
    joined_by: str = ""  # who registered it (a user, "admin", or a join token's maker)
    enforced_labels: dict[str, str] = Field(default_factory=dict)  # from the join token: the agent cannot drop them
    teams: list[str] = Field(default_factory=list)  # from the join token: only these teams' runs (empty: anyone's)
    peer_address: bool = False  # joined with a user key: reached where its requests come from, not where it says
    state: str = "ONLINE"  # ONLINE | OFFLINE
    draining: bool = False  # no new runs; running ones finish
    autostop_minutes: float | None = None  # `fedml cluster autostop`: drained after this long without a run
    autostop_agents: bool = False  # ... and then its agent told to exit (`--stop-agents`)
    stop_agent: bool = False  # its agent exits at its next poll without runs (cleared when it registers again)
    # GPUs a process that belongs to no run of the node is using (an orphan of a stopped run, something started
    # outside the scheduler), from the agent's NVML samples: not offered to runs until it is gone.
    gpus_busy_outside: list[int] = Field(default_factory=list)
    registered_at: float = Field(default_factory=time.time)
    last_seen: float = Field(default_factory=time.time)


CLUSTER_LABEL = "fedml.cluster/"  # + NAME: "true", an enforced label on each node of the cluster NAME
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class NodeView(Node):
    """A node as `fedml node list` shows it: with what is free now."""

    gpus_free: list[int] = Field(default_factory=list)
    active_runs: int = 0
    gpu_samples: list[GpuSample] = Field(default_factory=list)  # the latest the scheduler answering got


class ClusterCreate(BaseModel):
    """POST /clusters/{name}: these nodes (ids or names), and/or every node carrying `label` (k=v) now."""

    nodes: list[str] = Field(default_factory=list, max_length=10_000)
    label: str | None = Field(default=None, max_length=300)


class Cluster(BaseModel):
    """A named set of nodes (`fedml cluster ...`): `fedml launch -c NAME` places runs only there."""

    name: str
    nodes: list[NodeView] = Field(default_factory=list)
    gpus: int = 0
    gpus_free: int = 0
    active_runs: int = 0
    draining: int = 0  # nodes of it that take no new runs
    autostop_minutes: float | None = None
    autostop_agents: bool = False


SYSTEM_RANK = -1  # log lines the scheduler writes itself (stream "fedml"): attempt markers


class LogRow(NamedTuple):
    """A stored log line as the store returns it (a tuple: cheap to read by the hundred thousand)."""

    pos: int
    rank: int
    seq: int
    ts: float
    stream: str
    line: str
    attempt: int = 1

    def to_json(self) -> str:
        return (f'{{"pos":{self.pos},"rank":{self.rank},"attempt":{self.attempt},"seq":{self.seq},'
                f'"ts":{self.ts:.6f},"stream":{json.dumps(self.stream)},'
                f'"line":{json.dumps(self.line, ensure_ascii=False)}}}')


STORAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class StoragePut(BaseModel):
    """PUT /storage/{name}: name an uploaded blob (a tar.gz of a file or a directory) for its owner."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: Literal["file", "dir"] = "dir"
    filename: str | None = Field(default=None, max_length=255)  # a file's own name (kind "file")
    files: int = Field(default=0, ge=0)
    description: str = Field(default="", max_length=1000)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)


class StorageObject(StoragePut):
    """A named file or directory in the scheduler's storage (`fedml storage ...`), its owner's alone."""

    name: str
    owner: str
    size: int = 0
    created_at: float = Field(default_factory=time.time)


class Delivery(BaseModel):
    """A webhook's delivery for one of the run's events (`notify:` in the job): what was sent where, and how it
    went (`fedml run status RUN`). The URL is kept without its query (which may hold a token)."""

    event: str
    attempt: int  # the run's attempt it was about
    url: str
    state: Literal["delivered", "failed"]
    tries: int
    code: int | None = None  # the receiver's last HTTP status
    error: str | None = None
    at: float = Field(default_factory=time.time)


class Mount(BaseModel):
    """A storage object a run gets in its workspace (`storage:` in the job), as resolved when it was launched:
    a later upload under the same name does not change what the run reads."""

    name: str
    path: str
    sha256: str
    kind: Literal["file", "dir"] = "dir"
    filename: str | None = None


class RunCreate(BaseModel):
    """A run to start: the job as a document (`job`), or as the job file's text (`job_text`), which the scheduler
    reads and validates itself, with errors naming `job_file` and the line, and typo warnings in the answer
    (`fedml launch` sends the text: it need not load the job's schema to submit)."""

    job: dict[str, Any] | None = None
    job_text: str | None = Field(default=None, max_length=JOB_TEXT_MAX)
    name: str | None = None
    job_file: str | None = Field(default=None, max_length=4096)
    workspace_sha: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    after: list[str] = Field(default_factory=list, max_length=100)  # "RUN_ID[:ok|:any]": runs it waits for
    # A sweep's parameters, over the job's own `sweep:` ({name: [values]}; `fedml launch --sweep`), and the most
    # of its points queued or running at once. The answer is the first point's run; run.sweep.id names them all.
    sweep: dict[str, list[StrictBool | StrictInt | StrictFloat | StrictStr]] | None = Field(default=None,
                                                                                            max_length=16)
    max_parallel: int | None = Field(default=None, ge=1, le=1000)
    cluster: str | None = Field(default=None, max_length=63)  # `fedml launch -c NAME`: only on that cluster's nodes
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)  # node labels asked for, over the job's

    @model_validator(mode="after")
    def _one_job(self) -> RunCreate:
        if (self.job is None) == (self.job_text is None):
            raise ValueError("give the job as `job` (a document) or as `job_text` (the file's text), not both")
        return self


class RunBatch(BaseModel):
    """POST /runs/batch: runs written together in one durable commit (a sweep), all or none."""

    runs: list[RunCreate] = Field(min_length=1, max_length=1000)


class JoinTokenCreate(BaseModel):
    ttl: float | None = Field(default=3600.0, gt=0, le=10 * 365 * 86400)  # seconds; None: never expires
    uses: int | None = Field(default=1, ge=1, le=1_000_000)  # None: any number until it expires
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    name: str | None = Field(default=None, max_length=100)
    teams: list[Annotated[str, Field(pattern=TEAM_NAME)]] = Field(default_factory=list, max_length=32)


class StatusReport(BaseModel):
    status: RunStatus
    attempt: int | None = None  # reports about an attempt that was superseded (requeued) are refused
    exit_code: int | None = None
    reason: str | None = None


class LogBatch(BaseModel):
    """Lines of one rank of one attempt, numbered from first_seq, in sequence order. Sent as columns: `text` (a
    line each), `ts` and `stream` (one value for every line, or one per line). The scheduler parses a column of
    strings at 0.2 us a line; `lines`, a (timestamp, stream, text) triple per line (agents before), cost 0.6."""

    rank: int = 0
    attempt: int = 1
    first_seq: int = Field(ge=0)
    text: list[str] | None = None
    ts: float | list[float] | None = None
    stream: str | list[str] | None = None
    lines: list[tuple[float, str, str]] | None = None  # the row form

    @model_validator(mode="after")
    def _one_form(self) -> LogBatch:
        if (self.text is None) == (self.lines is None):
            raise ValueError("give either text (with ts and stream) or lines")
        if self.text is not None:
            n = len(self.text)
            for name in ("ts", "stream"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{name}: required with text")
                if isinstance(value, list) and len(value) != n:
                    raise ValueError(f"{name}: {len(value)} values for {n} lines")
        return self

    def count(self) -> int:
        return len(self.text if self.text is not None else self.lines or ())

    def rows(self) -> list[tuple[float, str, str]]:
        """A (timestamp, stream, text) triple per line, whichever form was sent."""
        if self.text is None:
            return self.lines or []
        ts, stream, n = self.ts, self.stream, len(self.text)
        return list(zip(ts if isinstance(ts, list) else itertools.repeat(ts, n),  # (lengths checked: _one_form)
                        stream if isinstance(stream, list) else itertools.repeat(stream, n), self.text, strict=True))


def attempt_ref(run_id: str, attempt: int) -> str:
    """What an agent runs is one attempt of a run: "run-1a2b3c4d.2". A run requeued back onto the same node
    is a new attempt, never mistaken for the old one."""
    return f"{run_id}.{attempt}"


def parse_ref(ref: str) -> tuple[str, int]:
    run_id, _, attempt = ref.rpartition(".")
    return (run_id, int(attempt)) if run_id and attempt.isdigit() else (ref, 0)


# What a GPU sample may say (a node is not trusted: a value past these is refused, 422, as its poll is). Wide
# enough for any real GPU; an agent leaves out what NVML reports past them (agents/telemetry.py).
GPU_SAMPLE_BOUNDS: dict[str, tuple[float, float]] = {
    "util": (0, 100), "mem_used_mb": (0, 16_000_000), "mem_total_mb": (0, 16_000_000), "power_w": (0, 100_000),
    "temp_c": (-273, 1_000), "ecc_uncorrected": (0, 2**53)}
XID_MAX = 2**32


def _sampled(name: str) -> Any:
    """An optional reading of a GPU sample, within GPU_SAMPLE_BOUNDS[name]."""
    lo, hi = GPU_SAMPLE_BOUNDS[name]
    return Field(default=None, ge=lo, le=hi, allow_inf_nan=False) if name == "power_w" else \
        Field(default=None, ge=lo, le=hi)


class GpuSample(BaseModel):
    """One GPU as the agent's NVML sample saw it (agents/telemetry.py), sent with its polls."""

    index: int = Field(ge=0, le=1023)
    util: int | None = _sampled("util")  # % of the last sample period busy
    mem_used_mb: int | None = _sampled("mem_used_mb")
    mem_total_mb: int | None = _sampled("mem_total_mb")
    power_w: float | None = _sampled("power_w")
    temp_c: int | None = _sampled("temp_c")
    pids: list[int] = Field(default_factory=list, max_length=256)  # compute processes on it
    outside: list[int] = Field(default_factory=list, max_length=256)  # of those, the ones no run of this node owns
    misplaced: list[str] = Field(default_factory=list, max_length=64)  # runs using it without having been given it
    ecc_uncorrected: int | None = _sampled("ecc_uncorrected")  # uncorrected ECC errors (volatile count)
    # critical (XID) errors since the last sample
    xid: list[Annotated[int, Field(ge=0, le=XID_MAX)]] = Field(default_factory=list, max_length=16)


class PollRequest(BaseModel):
    running: list[str] = Field(default_factory=list)  # attempt refs
    wait: float = Field(default=20.0, ge=0, le=60)
    gpus: list[GpuSample] | None = Field(default=None, max_length=64)  # the latest NVML sample, when there is one


class Assignment(BaseModel):
    run: Run
    rank: int = 0
    num_nodes: int = 1
    gpus: list[int] = Field(default_factory=list)
    node0_addr: str = "127.0.0.1"
    node0_port: int = 29500


class PollResponse(BaseModel):
    start: list[Assignment] = Field(default_factory=list)
    stop: list[str] = Field(default_factory=list)  # attempt refs
    grace: dict[str, float] = Field(default_factory=dict)  # ref -> seconds between SIGTERM and SIGKILL (preemptions)
    scale: dict[str, int] = Field(default_factory=dict)  # attempt ref of an endpoint -> replicas wanted
    heartbeat_interval: float = 5.0
    # Seconds the node's lease lasts from when this poll was sent: the agent's guards kill its jobs once it runs
    # out unrenewed (runtime/fence.py). The scheduler writes a node off only after lease + slack.
    lease: float = 0.0
    shutdown: str | None = None  # the agent exits (`fedml cluster autostop --stop-agents`), saying this


class Registered(BaseModel):
    node: Node
    node_token: str | None = None  # only when a new token was issued


class ApiKey(BaseModel):
    """An API key as stored: never the secret itself, only its sha256."""

    id: str
    name: str
    scope: str  # admin | user | node | join
    owner: str  # user name; for a node key, the node id; for a join token, who made it
    hash: str
    prefix: str  # first characters of the secret, to recognise it in a list
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None
    revoked_why: str | None = None  # "node removed": the node's agent is told to exit rather than join again
    parent: str | None = None  # the key it was made from (a dashboard session): revoked with it
    # join tokens: registrations left (None: any number until it expires), expiry, labels every node gets
    uses_left: int | None = None
    expires_at: float | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    team: str | None = None  # user and admin keys: the team whose runs it launches (docs/teams.md)
    teams: list[str] = Field(default_factory=list)  # join tokens: the teams whose runs their nodes take (empty: any)


class Principal(BaseModel):
    scope: str
    owner: str
    key_id: str
    team: str | None = None

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


class Team(BaseModel):
    """A team (`fedml team create`): the keys that belong to it launch its runs (docs/teams.md). Its webhook
    targets are the default of its runs whose job names none."""

    name: str = Field(pattern=TEAM_NAME)
    shares: int = Field(default=1, ge=1, le=1_000_000)  # its weight among teams (fair share)
    notify: list[NotifyTarget] = Field(default_factory=list, max_length=8)
    # GPUs its runs may hold at once, per GPU type ("A100-80G") or "any" (every GPU job not charged to a type of
    # its own): its nominal quota (docs/teams.md)
    quotas: dict[str, int] = Field(default_factory=dict, max_length=32)
    # Per quota: how many GPUs over it the team may borrow from other teams' idle quota of the same GPU type
    # (borrowed GPUs are reclaimed by preemption when their team needs them), and how many of its own idle quota
    # it lends (None: all of it). Kueue's borrowingLimit and lendingLimit.
    borrow_limit: int = Field(default=0, ge=0, le=1_000_000)
    lend_limit: int | None = Field(default=None, ge=0, le=1_000_000)
    # Money its runs may cost per period (node price x GPUs x time, runs created in the period): once spent, its
    # runs wait until the next period (docs/teams.md). None: no budget.
    budget: float | None = Field(default=None, ge=0)
    budget_period: Literal["day", "week", "month"] = "month"
    created_at: float = Field(default_factory=time.time)

    def period_start(self, now: float) -> float:
        """When the budget's current period began (UTC: midnight, Monday, the 1st)."""
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(hour=0, minute=0, second=0,
                                                                                 microsecond=0)
        if self.budget_period == "week":
            day -= datetime.timedelta(days=day.weekday())
        elif self.budget_period == "month":
            day = day.replace(day=1)
        return day.timestamp()

    def bucket(self, resource_type: str | None) -> str | None:
        """The quota a GPU job of `resource_type` is charged to: its type's, else "any", else none."""
        if resource_type and resource_type in self.quotas:
            return resource_type
        return "any" if "any" in self.quotas else None


class TeamCreate(BaseModel):
    name: str = Field(pattern=TEAM_NAME, description="lower-case letters, digits, - and _; 40 at most")
    shares: int = Field(default=1, ge=1, le=1_000_000)


class TeamQuota(BaseModel):
    gpus: dict[str, int] | None = Field(default=None, max_length=32,
                                        description='GPU type or "any" -> GPUs ({}: none; None: unchanged)')
    borrow_limit: int | None = Field(default=None, ge=0, le=1_000_000, description="None: unchanged")
    lend_limit: int | None = Field(default=None, ge=-1, le=1_000_000, description="None: unchanged; -1: all of it")

    @field_validator("gpus")
    @classmethod
    def _sane(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for kind, n in (v or {}).items():
            if not kind or len(kind) > 64 or "\t" in kind:
                raise ValueError(f"quota: {kind[:64]!r} is not a GPU type")
            if not 0 <= n <= 1_000_000:
                raise ValueError(f"quota: {kind}: {n} GPUs is not between 0 and 1,000,000")
        return v


class TeamBudget(BaseModel):
    amount: float | None = Field(default=None, ge=0, le=1e12, description="None: no budget")
    period: Literal["day", "week", "month"] = "month"


class TeamNotify(BaseModel):
    notify: list[NotifyTarget] = Field(default_factory=list, max_length=8)
