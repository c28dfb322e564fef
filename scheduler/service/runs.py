"""Runs: launch (validated, placed once to refuse what can never run), read, list, stop."""

from __future__ import annotations

import re
from pathlib import Path

from .. import access
from ..contract.errors import ApiError, BadRequest, Conflict, Invalid
from ..contract.jobload import load_text, unknown_keys, validate
from ..contract.jobspec import JobSpec, JobSpecError, env_problem
from ..contract.models import (
    Dependency,
    Endpoint,
    Principal,
    Run,
    RunCreate,
    RunStatus,
)
from ..placement import Request
from ..store import NotFound
from .core import LOCAL, SchedulerBase, new_run_id


class RunsMixin(SchedulerBase):
    def create_run(self, req: RunCreate, who: Principal = LOCAL) -> Run:
        run = self._new_run(req, who)
        self._group.create(self.store, run)
        self.kick()
        return run

    def create_runs(self, reqs: list[RunCreate], who: Principal = LOCAL) -> list[Run]:
        """Several runs at once (sweeps): every one validated before any is written, then written in one durable
        commit (SQLite: one transaction). An invalid one refuses them all, naming its index."""
        runs = []
        for i, req in enumerate(reqs):
            if req.job_text is not None:  # up to 1,000 texts parsed as YAML would hold the scheduler for minutes
                raise Invalid(f"runs[{i}]: a batch takes job documents (`job`), not job files' text (`job_text`)")
            try:
                run = self._new_run(req, who)
            except ApiError as exc:
                raise type(exc)(f"runs[{i}]: {exc}") from None
            if run.endpoint is not None:  # its name must be unique among endpoints: checked one at a time
                raise Invalid(f"runs[{i}]: an endpoint (serve/deploy job) is launched on its own, not in a batch")
            runs.append(run)
        self.store.create_runs(runs)  # all or none
        self.kick()
        return runs

    def _new_run(self, req: RunCreate, who: Principal) -> Run:
        access.require_not_node(who, "launch")
        warnings: list[str] = []
        try:
            if req.job_text is not None:  # the file as written: read here, errors with its name and line
                spec = load_text(req.job_text, file=req.job_file or "job.yaml")
                warnings = unknown_keys(spec, req.job_file or "job.yaml")
            else:
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
        never = self.never_fits(request)
        if never is not None:
            raise Invalid(f"cannot ever run here: {never}")
        run = Run(
            id=new_run_id(),
            name=req.name or spec.job_name or (Path(req.job_file).stem if req.job_file else "job"),
            job=spec,
            job_file=Path(req.job_file).name if req.job_file else None,
            warnings=warnings,
            workspace_sha=req.workspace_sha,
            env=req.env,
            priority=spec.priority,
            owner=who.owner,
            num_nodes=request.count,
            # Its shape found no room in the last pass: it waits for the same reason, written with it rather than
            # by the next pass (a run at a time: 10,000 submissions into a full cluster cost 10,000 more writes).
            reason=blocked.summary if (blocked := self._waiting.get(request)) is not None else None,
        )
        if spec.serves:
            run.endpoint = self._new_endpoint(spec, run)
        if req.after:
            pending = self._dependencies(run, req.after, who)
            if pending:
                run.reason = f"waiting for {', '.join(pending)} to end"
        return run

    def _dependencies(self, run: Run, after: list[str], who: Principal) -> list[str]:
        """Check `after` (RUN_ID[:ok|:any]: runs the caller may see) and set run.after; the runs still to end.
        A dependency that already failed where it had to finish refuses the launch (it could never start)."""
        deps: list[Dependency] = []
        pending: list[str] = []
        for text in after:
            try:
                dep = Dependency.parse(text)
            except ValueError as exc:
                raise Invalid(f"after: {exc}") from None
            try:
                ahead = self.get_run(dep.run_id, who)
            except NotFound:
                raise Invalid(f"after: no run {dep.run_id}") from None
            if ahead.terminal:
                if dep.when == "ok" and ahead.status != RunStatus.FINISHED:
                    raise Conflict(f"after: {dep.run_id} ended {ahead.status.value}; this run would wait for it to "
                                   f"finish (`--after {dep.run_id}:any` waits for any ending)")
            elif dep.run_id not in pending:
                pending.append(dep.run_id)
            if dep not in deps:
                deps.append(dep)
        run.after = deps
        return pending

    def _new_endpoint(self, spec: JobSpec, run: Run) -> Endpoint:
        svc = spec.service_config()
        taken = {r.endpoint.name: r.id for r in self.store.endpoint_runs() if r.endpoint}
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
        return self.waiting(run)

    def list_runs(self, who: Principal, status: list[RunStatus] | None, limit: int) -> list[Run]:
        return [self.waiting(r) for r in self.store.list_runs(status=status, limit=limit,
                                                              owner=access.runs_listed_for(who))]

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
