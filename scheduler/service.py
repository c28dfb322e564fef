"""The scheduler's behaviour, independent of HTTP: runs, nodes, placement, agent polls and reports, heartbeats.

Every method that takes a Principal enforces who may do what: a user key sees only its own runs (admin sees
all); a node key acts only for its own node and the runs placed on it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from . import access, auth
from .contract.errors import BadRequest, Conflict, Gone, Invalid, Unauthenticated
from .contract.jobspec import JobSpec, JobSpecError, env_problem, validate
from .contract.models import (
    SYSTEM_RANK,
    Artifact,
    Assignment,
    Endpoint,
    InvalidTransition,
    Node,
    NodeInfo,
    NodeScore,
    NodeView,
    Placement,
    PollResponse,
    Principal,
    Registered,
    Run,
    RunCreate,
    RunStatus,
    StatusReport,
    attempt_ref,
)
from .notify import Notifier
from .outcome import decide
from .placement import WEIGHTS, Candidate, NoFit, Request, place, reservation
from .store import GpuBusy, NotFound, Store

log = logging.getLogger("fedml.scheduler")

ACTIVE = (RunStatus.STARTING, RunStatus.RUNNING)
LIVE = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING, RunStatus.LOST)  # not settled yet
LOCAL = Principal(scope="admin", owner="admin", key_id="local")  # in-process callers and tests


def new_run_id() -> str:
    return "run-" + secrets.token_hex(4)


class Scheduler:
    def __init__(self, store: Store, notifier: Notifier, *, blob_exists: object = None,
                 heartbeat_interval: float = 10.0, rng: random.Random | None = None) -> None:
        self.store = store
        self.notifier = notifier
        self._blob_exists = blob_exists
        self.heartbeat_interval = heartbeat_interval
        # Fencing (runtime/fence.py): an agent's jobs die when its lease (renewed by each answered poll) runs out;
        # the node is written off only once the lease has certainly run out, with a slack for the guard to act
        # and for clocks, so a new attempt never starts while an old one may still run.
        # The slack: the guard's reaction (a tenth of a second; a container kill or a pod's grace is taken out of
        # what they are given) and the scheduler's own check cadence, which only adds to it. Half an interval,
        # at least 1 s: 25 s of lease at the 10 s default, 5 s at 2 s, 2 s at 1 s.
        self.heartbeat_timeout = 3 * heartbeat_interval  # a node silent for 3 intervals is OFFLINE
        self.lease = self.heartbeat_timeout - max(0.5 * heartbeat_interval, min(heartbeat_interval, 1.0))
        assert self.heartbeat_timeout >= self.lease + min(heartbeat_interval, 1.0)
        # (run ref, node) -> when a RUNNING placement was first missing from its node's polls (soft state)
        self._missing: dict[tuple[str, str], float] = {}
        self.rng = rng or random.Random()
        self._schedule_lock = threading.Lock()
        # Rank reports of one run may arrive together from several agents (at several replicas sharing a
        # store): read-modify-write under this lock and the store's lock on the run.
        self._runs_lock = threading.RLock()
        # Heartbeats are soft state (Store.heartbeat: in memory, or a Redis hash the replicas share): a durable
        # write per heartbeat would cap a 10,000-node cluster at the disk's fsync rate. Only ONLINE <-> OFFLINE
        # changes are persisted. After a restart every node gets one full timeout to check in again.
        self._started = time.time()
        # Node records change rarely (join, drain, remove, offline); placement reads them for every launch.
        # Cached here, dropped on every change (the "nodes" wake-up, which a shared store relays from the
        # other replicas), and at most NODE_CACHE_S old in any case.
        self._nodes: tuple[float, int, list[Node]] | None = None

    NODE_CACHE_S = 2.0

    def nodes(self) -> list[Node]:
        cached = self._nodes
        ticket = self.notifier.ticket("nodes")
        if cached is None or cached[1] != ticket or time.monotonic() - cached[0] > self.NODE_CACHE_S:
            cached = (time.monotonic(), ticket, self.store.list_nodes())
            self._nodes = cached
        return cached[2]

    def _nodes_changed(self) -> None:
        self._nodes = None
        self.notifier.notify("nodes")

    def last_seen(self, node: Node, seen: dict[str, float] | None = None) -> float:
        beats = self.store.heartbeats() if seen is None else seen
        return max(node.last_seen, beats.get(node.id) or 0.0, self._started)

    @contextlib.contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """One run's read-modify-write at a time: across this process's threads, and across replicas (the store's
        lock)."""
        with self._runs_lock, self.store.lock(f"run:{run_id}"):
            yield

    # -- runs --------------------------------------------------------------------------------------------
    def create_run(self, req: RunCreate, who: Principal = LOCAL) -> Run:
        access.require_not_node(who, "launch")
        try:
            spec = validate(req.job, file=req.job_file or "job")
        except JobSpecError as exc:
            raise Invalid(str(exc)) from None
        for k, v in req.env.items():
            if (why := env_problem(k, v)) is not None:
                raise Invalid(f"env: {why}")
        if not spec.commands().strip():
            raise Invalid(f"{req.job_file or 'job'}: job: this file refers to a job stored on FedML's "
                                "platform (job_args); this scheduler needs the commands in `job`")
        # Only a workspace the caller uploaded (or, for an admin, any): a hash alone must not lend a user someone
        # else's files. The same answer whether it exists or not, so it tells nothing about others' blobs.
        if req.workspace_sha and callable(self._blob_exists) and not self._blob_exists(req.workspace_sha, who):
            raise BadRequest(f"workspace {req.workspace_sha[:12]} has not been uploaded")
        request = Request.of(spec, who.owner)
        active = self.store.list_runs(status=ACTIVE, limit=1_000_000)
        verdict = place(request, self._candidates(active), rng=self.rng)
        if isinstance(verdict, NoFit) and verdict.never:
            raise Invalid(f"cannot ever run here: {verdict.reason}")
        run = Run(
            id=new_run_id(),
            name=req.name or spec.job_name or (Path(req.job_file).stem if req.job_file else "job"),
            job=spec,
            job_file=req.job_file,
            workspace_sha=req.workspace_sha,
            env=req.env,
            priority=spec.priority,
            owner=who.owner,
            num_nodes=request.count,
            reason=verdict.reason if isinstance(verdict, NoFit) else None,
        )
        if spec.serves:
            run.endpoint = self._new_endpoint(spec, run)
        self.store.create_run(run)
        self.kick()
        return run

    def _new_endpoint(self, spec: JobSpec, run: Run) -> Endpoint:
        svc = spec.service_config()
        taken = {r.endpoint.name: r.id for r in self.store.list_runs(status=LIVE, limit=1_000_000) if r.endpoint}
        name = svc.name
        if name is not None and name in taken:
            raise Conflict(f"endpoint {name} is served by {taken[name]} already: `fedml endpoint delete "
                                f"{name}` first, or give this one another service.name")
        if name is None:  # derived from the run's name; made unique rather than refused
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name).strip("-.")[:40] or "endpoint"
            if name in taken:
                name = f"{name}-{run.id.removeprefix('run-')}"
        lo, hi = svc.bounds
        return Endpoint(name=name, replicas=svc.replicas, min_replicas=lo, max_replicas=hi,
                        request_timeout=svc.request_timeout, predict_path=svc.predict_path,
                        target_inflight=svc.target_inflight, scale_down_delay=svc.scale_down_delay)

    def get_run(self, run_id: str, who: Principal = LOCAL) -> Run:
        run = self.store.get_run(run_id)
        if run is None or not access.may_see_run(who, run):
            raise NotFound(f"run {run_id} not found")
        return run

    def list_runs(self, who: Principal, status: list[RunStatus] | None, limit: int) -> list[Run]:
        return self.store.list_runs(status=status, limit=limit, owner=access.runs_listed_for(who))

    def stop_run(self, run_id: str, who: Principal = LOCAL) -> Run:
        access.require_not_node(who, "stop")
        with self.run_lock(run_id):
            run = self.get_run(run_id, who)
            if run.terminal:
                return run
            if run.status in (RunStatus.QUEUED, RunStatus.LOST):
                run = self.store.transition(run_id, RunStatus.KILLED, reason="stopped before it started")
                self.run_changed(run)
                return run
            run = self.store.update_run(run_id, stop_requested=True, reason="stop requested")
        self.run_changed(run)
        return run

    # -- nodes -------------------------------------------------------------------------------------------
    def register_node(self, info: NodeInfo, who: Principal, peer: str | None = None) -> Registered:
        """Who may register what (docs/security.md):
        - a node key: its own node coming back (new inventory; id, owner and enforced labels kept);
        - an admin key or a join token: a shared node, if its agent isolates jobs from itself (runs them as
          another user); else a node private to whoever joined it;
        - a user key: a node private to that user, reached at the address its registration came from.
        A name held by a node is never re-taken this way: that node's key, or an admin's `fedml node remove`."""
        now = time.time()
        if who.scope == "node":
            existing = self.store.get_node(who.owner)
            if existing is None:
                raise Gone("this node was removed; join it again with an admin key or a join token")
            owner = existing.owner  # a user's node stays that user's; any other follows what its agent can do now
            if not existing.peer_address:
                owner = None if info.job_user else (existing.joined_by or "admin")
            node = Node(**info.model_dump(exclude={"name", "labels", "address"}), id=existing.id, name=existing.name,
                        labels={**info.labels, **existing.enforced_labels}, enforced_labels=existing.enforced_labels,
                        address=(peer or existing.address) if existing.peer_address else info.address,
                        peer_address=existing.peer_address,
                        owner=owner, joined_by=existing.joined_by, draining=existing.draining,
                        registered_at=existing.registered_at, last_seen=now)
            self.store.upsert_node(node)
            self._nodes_changed()
            self.kick()
            return Registered(node=node)
        access.require_may_register(who)
        same = self.store.node_by_name(info.name)
        if same is not None:
            raise Conflict(f"a node named {info.name} exists already ({same.id}, {same.state.lower()}): pick "
                                f"another --name, come back with that node's key, or have an admin remove it "
                                f"first (`fedml node remove {info.name}`)")
        enforced: dict[str, str] = {}
        if who.scope == "join":
            try:
                token = auth.use_join(self.store, who.key_id)
            except ValueError as exc:
                raise Unauthenticated(str(exc)) from None
            enforced = dict(token.labels)
        if who.scope == "user":
            owner: str | None = who.owner
        else:
            owner = None if info.job_user else who.owner
        # A user's node is reached where its registration came from: a user cannot point the scheduler's
        # gateway at an address of their choosing (SSRF). Admins and join tokens vouch for what the agent says.
        address = (peer or info.address) if who.scope == "user" else info.address
        node = Node(**info.model_dump(exclude={"labels", "address"}), labels={**info.labels, **enforced},
                    address=address, peer_address=who.scope == "user", enforced_labels=enforced, owner=owner, joined_by=who.owner,
                    id="node-" + secrets.token_hex(4), registered_at=now, last_seen=now)
        # The key first: a scheduler that dies between the two leaves an unused key, never a node that holds its
        # name with no key to come back with.
        _, token_secret = auth.issue(self.store, name=f"node {node.name}", scope="node", owner=node.id)
        self.store.upsert_node(node)
        self._nodes_changed()
        log.info("node %s (%s) registered by %s (%s)%s", node.name, node.id, who.owner, who.scope,
                 f", private to {owner}" if owner else "")
        self.kick()
        return Registered(node=node, node_token=token_secret)

    def node_views(self) -> list[NodeView]:
        active = self.store.list_runs(status=ACTIVE, limit=1_000_000)
        count: dict[str, int] = {}
        for r in active:
            for p in r.placements:
                if not p.done:
                    count[p.node_id] = count.get(p.node_id, 0) + 1
        return [NodeView(**c.node.model_dump(exclude={"last_seen"}), last_seen=self.last_seen(c.node, {}),
                         gpus_free=[g.index for g in c.free], active_runs=count.get(c.node.id, 0))
                for c in self._candidates(active)]

    def find_node(self, ref: str) -> Node:
        node = self.store.get_node(ref) or self.store.node_by_name(ref)
        if node is None:
            raise NotFound(f"node {ref} not found")
        return node

    def set_draining(self, ref: str, draining: bool, who: Principal) -> Node:
        access.require_admin(who, "only an admin key can drain nodes")
        node = self.find_node(ref).model_copy(update={"draining": draining})
        self.store.upsert_node(node)
        self._nodes_changed()
        self.kick()
        return node

    def remove_node(self, ref: str, who: Principal) -> Node:
        node = self.find_node(ref)
        access.require_may_remove_node(who, node)
        for run in self.store.list_runs(status=ACTIVE, node_id=node.id, limit=1_000_000):
            self._rank_update(run.id, node.id, RunStatus.LOST, None, f"node {node.name} was removed")
        self.store.delete_node(node.id)
        self._nodes_changed()
        for k in self.store.list_keys():
            if k.scope == "node" and k.owner == node.id and k.revoked_at is None:
                auth.revoke(self.store, k, why="node removed")  # its agent is told to exit, not to join again
        self.kick()
        return node

    # -- the agent side ----------------------------------------------------------------------------------
    def poll_once(self, node_id: str, running: list[str], who: Principal = LOCAL) -> PollResponse:
        access.require_acts_for_node(who, node_id)
        now = time.time()
        before, runs = self.store.heartbeat_and_runs(node_id, now, ACTIVE)
        if not before:
            try:  # first heartbeat since start, or back from OFFLINE: persist the state change
                self.store.touch_node(node_id, now)
                self._nodes_changed()
            except NotFound:
                self.store.heartbeat(node_id, 0.0)  # so that every poll of it is refused
                raise NotFound(f"node {node_id} is not registered") from None
        have = set(running)
        start: list[Assignment] = []
        wanted: set[str] = set()
        scale: dict[str, int] = {}
        for run in runs:
            p = run.placement_on(node_id)
            if p is None or p.done:
                continue
            ref = attempt_ref(run.id, run.attempt)
            if run.stop_requested:
                if ref not in have and p.status == RunStatus.STARTING:  # nothing to kill: settle it here
                    self._rank_update(run.id, node_id, RunStatus.KILLED, None, run.reason or "stopped")
                continue
            wanted.add(ref)
            if p.status == RunStatus.RUNNING and ref not in have:
                # The node no longer has it, and its final report never came (lost with the agent's state):
                # after a grace period the rank is LOST rather than RUNNING for ever.
                since = self._missing.setdefault((ref, node_id), now)
                if now - since > self.heartbeat_timeout:
                    self._missing.pop((ref, node_id), None)
                    name = (self.store.get_node(node_id) or Node(id=node_id, name=node_id)).name
                    self._rank_update(run.id, node_id, RunStatus.LOST, None,
                                      f"node {name} no longer runs it (its final report was lost)",
                                      attempt=run.attempt)
                continue
            self._missing.pop((ref, node_id), None)
            if p.status == RunStatus.STARTING and ref not in have:
                rank0 = self.store.get_node(run.placements[0].node_id)
                start.append(Assignment(run=run, rank=p.rank, num_nodes=len(run.placements), gpus=p.gpus,
                                        node0_addr=rank0.address if rank0 else "127.0.0.1",
                                        node0_port=run.master_port or 29500))
            if run.endpoint is not None:
                scale[ref] = run.endpoint.replicas
        # Whatever the node runs that is no longer its to run is stopped: reconciliation after restarts.
        stop = [rid for rid in running if rid not in wanted]
        return PollResponse(start=start, stop=stop, scale=scale, heartbeat_interval=self.heartbeat_interval,
                            lease=self.lease)

    def report(self, run_id: str, rep: StatusReport, node_id: str, who: Principal = LOCAL) -> Run:
        access.require_acts_for_node(who, node_id)
        return self._rank_update(run_id, node_id, rep.status, rep.exit_code, rep.reason, attempt=rep.attempt)

    def check_log_writer(self, run_id: str, who: Principal, attempt: int | None = None, *, logs: bool = False) -> None:
        access.require_log_writer(who, run_id, None if who.admin else self.store.get_run(run_id), attempt, logs=logs)

    def add_artifact(self, run_id: str, art: Artifact, who: Principal) -> Run:
        self.check_log_writer(run_id, who, art.attempt)
        with self.run_lock(run_id):
            run = self.get_run(run_id)
            keep = [a for a in run.artifacts if (a.rank, a.attempt) != (art.rank, art.attempt)]
            return self.store.update_run(run_id, artifacts=[*keep, art])

    def _rank_update(self, run_id: str, node_id: str, status: RunStatus, exit_code: int | None,
                     reason: str | None, attempt: int | None = None) -> Run:
        with self.run_lock(run_id):
            run = self.store.get_run(run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            if attempt is not None and attempt != run.attempt:
                raise Conflict(f"run {run_id} is on attempt {run.attempt}; attempt {attempt} was superseded")
            p = run.placement_on(node_id)
            if p is None:
                raise Conflict(f"run {run_id} is not placed on node {node_id}")
            if p.done or run.terminal or p.status == status:
                return run  # a resend, or a report about an attempt already settled
            p.status, p.exit_code, p.reason = status, exit_code, reason
            run = self._settle(run)
        self.run_changed(run)
        self.kick()
        return run

    def _settle(self, run: Run) -> Run:
        """Apply the outcome policy (scheduler/outcome.py) to the run's ranks: the new state in one write."""
        out = decide(run, run.job, run.placements)
        if out.retried:
            log.info("run %s: %s", run.id, out.fields["reason"])
        if out.status is None:
            return self.store.update_run(run.id, **out.fields)
        return self.store.transition(run.id, out.status, **out.fields)

    def run_changed(self, run: Run) -> None:
        self.notifier.notify(f"run:{run.id}")
        for p in run.placements:
            self.notifier.notify(f"node:{p.node_id}")

    # -- heartbeats --------------------------------------------------------------------------------------
    def check_heartbeats(self) -> list[Node]:
        """Mark silent nodes OFFLINE and their ranks LOST. Returns the nodes that went offline."""
        with self.store.lock("heartbeats", ttl=10.0):  # one replica at a time
            return self._check_heartbeats()

    def _check_heartbeats(self) -> list[Node]:
        now = time.time()
        gone = []
        beats = self.store.heartbeats()
        for node in self.store.list_nodes():
            seen = self.last_seen(node, beats)
            if node.state == "ONLINE" and now - seen > self.heartbeat_timeout:
                node = node.model_copy(update={"state": "OFFLINE", "last_seen": seen})
                self.store.upsert_node(node)
                self._nodes_changed()
                self.store.heartbeat(node.id, 0.0)  # its next heartbeat persists ONLINE again
                gone.append(node)
                log.warning("node %s (%s) is offline: no heartbeat for %.0f s", node.name, node.id, now - seen)
                for run in self.store.list_runs(status=ACTIVE, node_id=node.id, limit=1_000_000):
                    self._rank_update(run.id, node.id, RunStatus.LOST, None,
                                      f"node {node.name} went offline (no heartbeat for "
                                      f"{self.heartbeat_timeout:.0f} s)")
        return gone

    # -- placement ---------------------------------------------------------------------------------------
    def kick(self) -> None:
        self.notifier.notify("schedule")

    def _candidates(self, active: list[Run]) -> list[Candidate]:
        now = time.time()
        held: dict[str, set[int]] = {}
        for r in active:
            for p in r.placements:
                if not p.done:
                    held.setdefault(p.node_id, set()).update(p.gpus)
        seen = self.store.heartbeats()
        return [Candidate(node=n if n.id not in seen else n.model_copy(update={"last_seen": self.last_seen(n, seen)}),
                          free=[g for g in n.gpus if g.index not in held.get(n.id, set())], now=now,
                          heartbeat_timeout=self.heartbeat_timeout)
                for n in self.nodes()]

    def schedule_pass(self) -> int:
        """Place queued runs: higher priority first, FIFO within a priority. The first run that cannot be
        placed reserves the nodes it would get (as many as it needs, those closest to fitting it), so smaller
        runs behind it cannot starve it; they still start on every other node (backfill). Returns how many
        runs were placed."""
        # One pass at a time across replicas, for efficiency only: the store refuses a stale placement anyway,
        # so a pass that outlives the lock's TTL is harmless, and a replica killed mid-pass blocks no one long.
        with self._schedule_lock, self.store.lock("schedule", ttl=5.0):
            queued = self.store.list_runs(status=[RunStatus.QUEUED], limit=1_000_000)
            if not queued:
                return 0
            queued.sort(key=lambda r: (-r.priority, r.created_at))
            candidates = self._candidates(self.store.list_runs(status=ACTIVE, limit=1_000_000))
            pass_state = _Pass(candidates)
            placed = 0
            for start in range(0, len(queued), 256):
                changed: list[Run] = []
                with self.store.batch():  # one durable commit per chunk; other requests get the store between
                    for run in queued[start:start + 256]:
                        if self._place_one(run, pass_state):
                            changed.append(run)
                placed += len(changed)
                self._announce(changed)
            return placed

    def _place_one(self, run: Run, ps: _Pass) -> bool:
        req = Request.of(run.job, run.owner)
        # Nothing is freed during a pass: a request shape that found no room once will not find it again.
        verdict = ps.no_room.get(req) or place(req, ps.candidates, reserved=frozenset(ps.reserved), rng=self.rng)
        if isinstance(verdict, NoFit):
            ps.no_room[req] = verdict
            if not ps.head_blocked and not verdict.never:
                ps.head_blocked = True
                ps.reserved |= reservation(req, ps.candidates)
            if run.reason != verdict.reason and not (run.reason or "").startswith(verdict.reason):
                self.store.update_run(run.id, reason=verdict.reason)
            return False
        placements = [Placement(rank=i, node_id=pl.node.id, gpus=pl.gpus) for i, pl in enumerate(verdict)]
        scores = [NodeScore(node_id=pl.node.id, rank=i, total=pl.score, scores=pl.scores, weights=WEIGHTS)
                  for i, pl in enumerate(verdict)] + verdict[0].runners_up
        try:
            self.store.transition(run.id, RunStatus.STARTING, placements=placements, scores=scores, reason=None,
                                  master_port=self.rng.randrange(20000, 40000))
        except InvalidTransition:
            return False  # stopped meanwhile
        except GpuBusy as busy:  # another replica placed a run there: this pass's view of that node is stale
            if busy.node_id in ps.by_id:
                ps.by_id[busy.node_id].free = []
            self.kick()
            return False
        run.placements = placements
        for pl in verdict:
            c = ps.by_id[pl.node.id]
            c.free = [g for g in c.free if g.index not in pl.gpus]
        if run.attempt > 1:  # the log says where each attempt ran and why the one before it ended
            names = ", ".join(pl.node.name for pl in verdict)
            why = run.attempts[-1].reason if run.attempts else None
            self.store.append_logs(run.id, run.attempt, SYSTEM_RANK, 0, [(
                time.time(), "fedml", f"── attempt {run.attempt} on node {names}" + (f": {why}" if why else ""))])
        return True

    def _announce(self, runs: list[Run]) -> None:
        # After the commit: an agent woken by this must find its assignment in the store.
        for run in runs:
            self.run_changed(run)
        runs.clear()


class _Pass:
    """What one scheduling pass knows: candidates with their free GPUs, and the head job's reservation."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        self.by_id = {c.node.id: c for c in candidates}
        self.reserved: set[str] = set()
        self.head_blocked = False
        self.no_room: dict[Request, NoFit] = {}


__all__ = ["LOCAL", "Scheduler"]
