"""The scheduler's behaviour, independent of HTTP: creating runs, placing them, agent polls, reports, stop."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from .jobspec import JobSpec, JobSpecError, validate
from .models import (
    TERMINAL,
    Assignment,
    InvalidTransition,
    Node,
    NodeInfo,
    PollResponse,
    Run,
    RunCreate,
    RunStatus,
    StatusReport,
)
from .notify import Notifier
from .placement import Candidate, NoFit, Placement, Request, free_gpus, place
from .store import NotFound, Store

log = logging.getLogger("fedml.scheduler")

ACTIVE = (RunStatus.STARTING, RunStatus.RUNNING)


class Rejected(Exception):
    """A request the scheduler refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def new_run_id() -> str:
    return "run-" + secrets.token_hex(4)


class Scheduler:
    def __init__(self, store: Store, notifier: Notifier, *, blob_exists: object = None,
                 poll_wait: float = 15.0, heartbeat_timeout: float = 60.0) -> None:
        self.store = store
        self.notifier = notifier
        self._blob_exists = blob_exists
        self.poll_wait = poll_wait
        self.heartbeat_timeout = heartbeat_timeout
        self._schedule_lock = threading.Lock()

    # -- runs --------------------------------------------------------------------------------------------
    def create_run(self, req: RunCreate, owner: str = "local") -> Run:
        try:
            spec = validate(req.job, file=req.job_file or "job")
        except JobSpecError as exc:
            raise Rejected(422, str(exc)) from None
        if not spec.commands().strip():
            raise Rejected(422, f"{req.job_file or 'job'}: job: this file refers to a job stored on FedML's "
                                "platform (job_args); this scheduler needs the commands in `job`")
        if req.workspace_sha and callable(self._blob_exists) and not self._blob_exists(req.workspace_sha):
            raise Rejected(400, f"workspace {req.workspace_sha[:12]} has not been uploaded")
        verdict = self._place(Request.of(spec), self.store.list_runs(status=ACTIVE))
        if isinstance(verdict, NoFit) and verdict.never:
            raise Rejected(422, f"cannot ever run: {verdict.reason}")
        run = Run(
            id=new_run_id(),
            name=req.name or spec.job_name or (Path(req.job_file).stem if req.job_file else "job"),
            job=spec.model_dump(mode="json", exclude_none=True),
            job_file=req.job_file,
            workspace_sha=req.workspace_sha,
            env=req.env,
            priority=spec.priority,
            owner=owner,
            reason="waiting for a node" if isinstance(verdict, NoFit) else None,
        )
        self.store.create_run(run)
        self.kick()
        return run

    def get_run(self, run_id: str) -> Run:
        run = self.store.get_run(run_id)
        if run is None:
            raise Rejected(404, f"run {run_id} not found")
        return run

    def stop_run(self, run_id: str) -> Run:
        run = self.get_run(run_id)
        if run.terminal:
            return run
        if run.status in (RunStatus.QUEUED, RunStatus.LOST):
            try:
                run = self.store.transition(run_id, RunStatus.KILLED, reason="stopped before it started")
            except InvalidTransition:  # placed meanwhile: ask its node instead
                return self.stop_run(run_id)
            self._run_changed(run)
            return run
        run = self.store.update_run(run_id, stop_requested=True, reason="stop requested")
        if run.node_id:
            self.notifier.notify(f"node:{run.node_id}")
        return run

    # -- agent side --------------------------------------------------------------------------------------
    def register_node(self, info: NodeInfo, node_id: str | None = None) -> Node:
        existing = self.store.get_node(node_id) if node_id else None
        if existing is None:
            same_name = [n for n in self.store.list_nodes() if n.name == info.name]
            existing = same_name[0] if same_name else None
        now = time.time()
        node = Node(**info.model_dump(), id=existing.id if existing else "node-" + secrets.token_hex(4),
                    state="DRAINING" if existing and existing.state == "DRAINING" else "ONLINE",
                    registered_at=existing.registered_at if existing else now, last_seen=now)
        self.store.upsert_node(node)
        self.kick()
        return node

    def poll_once(self, node_id: str, running: list[str]) -> PollResponse:
        try:
            self.store.touch_node(node_id, time.time())
        except NotFound:
            raise Rejected(404, f"node {node_id} is not registered") from None
        mine = self.store.list_runs(status=ACTIVE, node_id=node_id)
        have = set(running)
        start = [Assignment(run=r, rank=0, num_nodes=1) for r in mine
                 if r.status == RunStatus.STARTING and r.id not in have and not r.stop_requested]
        # Stop whatever the node runs that is not (or no longer) its to run: reconciliation after restarts.
        wanted = {r.id for r in mine if not r.stop_requested}
        stop = [rid for rid in running if rid not in wanted]
        # A run stopped before its agent picked it up has nothing to kill: settle it here.
        for r in mine:
            if r.stop_requested and r.id not in have and r.status == RunStatus.STARTING:
                self._finish(r.id, StatusReport(status=RunStatus.KILLED, reason="stopped before it started"))
        return PollResponse(start=start, stop=stop, heartbeat_interval=self.poll_wait)

    def report(self, run_id: str, rep: StatusReport, node_id: str | None = None) -> Run:
        run = self.get_run(run_id)
        if node_id is not None and run.node_id != node_id:
            raise Rejected(409, f"run {run_id} is not assigned to node {node_id}")
        if run.status == rep.status:
            return run  # a resend of a report already applied
        if rep.status in TERMINAL:
            return self._finish(run_id, rep)
        try:
            run = self.store.transition(run_id, rep.status, reason=rep.reason)
        except InvalidTransition as exc:
            raise Rejected(409, str(exc)) from None
        self._run_changed(run)
        return run

    def _finish(self, run_id: str, rep: StatusReport) -> Run:
        status = rep.status
        run = self.get_run(run_id)
        if run.terminal:
            return run
        if status == RunStatus.FAILED and run.stop_requested:
            status = RunStatus.KILLED
        try:
            run = self.store.transition(run_id, status, exit_code=rep.exit_code, reason=rep.reason)
        except InvalidTransition as exc:
            raise Rejected(409, str(exc)) from None
        self._run_changed(run)
        self.kick()
        return run

    def _run_changed(self, run: Run) -> None:
        self.notifier.notify(f"run:{run.id}")
        if run.node_id:
            self.notifier.notify(f"node:{run.node_id}")

    # -- placement ---------------------------------------------------------------------------------------
    def kick(self) -> None:
        self.notifier.notify("schedule")

    def _candidates(self, active: list[Run]) -> list[Candidate]:
        now = time.time()
        return [Candidate(node=n, free=free_gpus(n, active), now=now, heartbeat_timeout=self.heartbeat_timeout)
                for n in self.store.list_nodes()]

    def _place(self, req: Request, active: list[Run]) -> Placement | NoFit:
        return place(req, self._candidates(active))

    def schedule_pass(self) -> int:
        """Place queued runs, highest priority first, FIFO within a priority. Returns how many were placed."""
        with self._schedule_lock:
            queued = self.store.list_runs(status=[RunStatus.QUEUED], limit=100_000)
            if not queued:
                return 0
            queued.sort(key=lambda r: (-r.priority, r.created_at))
            active = self.store.list_runs(status=ACTIVE, limit=100_000)
            placed = 0
            for run in queued:
                spec = JobSpec.model_validate(run.job)
                verdict = self._place(Request.of(spec), active)
                if isinstance(verdict, NoFit):
                    if run.reason != verdict.reason:
                        self.store.update_run(run.id, reason=verdict.reason)
                    continue
                try:
                    run = self.store.transition(run.id, RunStatus.STARTING, node_id=verdict.node.id,
                                                gpus=verdict.gpus, reason=None)
                except InvalidTransition:
                    continue  # stopped meanwhile
                active.append(run)
                placed += 1
                self._run_changed(run)
            return placed
