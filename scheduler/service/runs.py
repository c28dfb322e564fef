"""Runs: launch (validated, placed once to refuse what can never run), read, list, stop."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from .. import access
from ..contract.errors import ApiError, BadRequest, Conflict, Invalid
from ..contract.jobload import load_text_lines, unknown_keys, validate
from ..contract.jobspec import JobSpec, JobSpecError, env_problem, sweep_points
from ..contract.models import (
    TERMINAL,
    Dependency,
    Endpoint,
    Mount,
    Principal,
    Run,
    RunCreate,
    RunStatus,
    SweepPoint,
)
from ..contract.runenv import job_env, shown
from ..placement import Request
from ..store import NotFound
from .clusters import cluster_key
from .core import LOCAL, SchedulerBase, new_run_id


class RunsMixin(SchedulerBase):
    def create_run(self, req: RunCreate, who: Principal = LOCAL) -> Run:
        run = self._new_run(req, who)
        grid = self._grid(run.job, req)
        if grid is not None:  # a sweep: one run per point, all written in one commit; the answer is the first
            runs = self._points(run, grid, req.max_parallel or run.job.max_parallel)
            self.store.create_runs(runs)
            self.wrote(*runs)
            self.tally.add("runs_created", len(runs))
            self.kick()
            return runs[0]
        self._group.create(self.store, run)
        self.wrote(run)
        self.tally.add("runs_created")
        self.kick()
        return run

    @staticmethod
    def _grid(spec: JobSpec, req: RunCreate) -> dict[str, list[Any]] | None:
        """The sweep's parameters: the job's `sweep:` with the request's (`--sweep`) over it."""
        if not spec.sweep and not req.sweep:
            if req.max_parallel is not None:
                raise Invalid("max_parallel: only with a sweep (the most of its points queued or running at once)")
            return None
        if spec.serves:
            raise Invalid("sweep: an endpoint (job_type serve or deploy) is not swept: launch one per setting")
        grid = {**(spec.sweep or {}), **(req.sweep or {})}
        try:
            sweep_points(grid)
        except ValueError as exc:
            raise Invalid(f"sweep: {exc}") from None
        return grid

    def _points(self, first: Run, grid: dict[str, list[Any]], max_parallel: int | None) -> list[Run]:
        """The runs of a sweep: `first` for point 0 and a copy per further point, each with its values in
        FEDML_SWEEP_<NAME> (and FEDML_SWEEP_ID, _INDEX, _SIZE), created a microsecond apart so the queue takes
        them in order."""
        points = sweep_points(grid)
        sweep_id = "sweep-" + secrets.token_hex(8)
        runs = []
        for i, point in enumerate(points):
            env = {**first.env, "FEDML_SWEEP_ID": sweep_id, "FEDML_SWEEP_INDEX": str(i),
                   "FEDML_SWEEP_SIZE": str(len(points)),
                   **{f"FEDML_SWEEP_{k.upper()}": _text(v) for k, v in point.items()}}
            for k, v in env.items():
                if (why := env_problem(k, v)) is not None:
                    raise Invalid(f"sweep: {why}")
            sweep = SweepPoint(id=sweep_id, index=i, size=len(points), point=point, max_parallel=max_parallel)
            held = max_parallel is not None and i >= max_parallel
            runs.append(first.model_copy(update={"id": first.id if i == 0 else new_run_id(), "env": env,
                                                 "sweep": sweep, "created_at": first.created_at + i * 1e-6,
                                                 **({"reason": _held(max_parallel)} if held else {})}))
        return runs

    def sweep(self, sweep_id: str, who: Principal = LOCAL) -> list[Run]:
        """The runs of a sweep the caller may see (each point's first run and its retries), oldest first.
        NotFound when there are none."""
        runs = [self.waiting(r) for r in self.store.sweep_runs(sweep_id) if access.may_see_run(who, r)]
        if not runs:
            raise NotFound(f"sweep {sweep_id} not found")
        return runs

    def stop_sweep(self, sweep_id: str, who: Principal = LOCAL) -> list[Run]:
        """Stop every unfinished run of the sweep (as stop_run does each). Returns the sweep's runs."""
        for run in self.sweep(sweep_id, who):
            if not run.terminal:
                self.stop_run(run.id, who)
        return self.sweep(sweep_id, who)

    def retry_sweep(self, sweep_id: str, who: Principal = LOCAL, *, all_points: bool = False) -> list[Run]:
        """Launch again each point whose latest run ended without finishing (all ended points with
        `all_points`): new runs of the same sweep, written in one commit. Returns the new runs."""
        access.require_not_node(who, "launch")
        latest: dict[int, Run] = {}
        for run in self.sweep(sweep_id, who):
            assert run.sweep is not None
            latest[run.sweep.index] = run  # (oldest first: the last one is the newest)
        again = [r for _, r in sorted(latest.items()) if r.status in TERMINAL
                 and (all_points or r.status != RunStatus.FINISHED)]
        if not again:
            return []
        now = time.time()
        runs = [_again(r, now + i * 1e-6, **({"reason": _held(r.sweep.max_parallel)} if r.sweep and
                                             r.sweep.max_parallel else {})) for i, r in enumerate(again)]
        self.store.create_runs(runs)
        self.wrote(*runs)
        self.tally.add("runs_created", len(runs))
        self.kick()
        return runs

    def retry_run(self, run_id: str, who: Principal = LOCAL) -> Run:
        """Launch an ended run again (the dashboard's Retry, `fedml run retry RUN`): a new run of the same job,
        workspace, environment and owner, as its sweep's point when it was one. Refused while it has not ended."""
        access.require_not_node(who, "launch")
        run = self.get_run(run_id, who)
        if not run.terminal:
            raise Conflict(f"run {run_id} is {run.status.value}: stop it first, or wait for it to end")
        if run.endpoint is not None:
            raise Conflict(f"run {run_id} served endpoint {run.endpoint.name}: launch the serve job again")
        again = _again(run, time.time())
        self.store.create_runs([again])
        self.wrote(again)
        self.tally.add("runs_created")
        self.kick()
        return again

    def run_env(self, run_id: str, who: Principal, rank: int = 0) -> dict[str, str]:
        """What the scheduler and the job file put in rank `rank`'s environment (its current or last
        placement), secret-looking values hidden; the agent adds its own PATH, locale and CUDA settings."""
        run = self.get_run(run_id, who)
        if not 0 <= rank < run.num_nodes:
            raise Invalid(f"run {run_id} has no rank {rank} (its ranks are 0..{run.num_nodes - 1})")
        placed = {p.rank: p for p in run.placements}
        nodes = {n.id: n for n in self.nodes()}
        node0 = nodes.get(placed[0].node_id) if 0 in placed else None
        mine = placed.get(rank)
        env = job_env(run_id=run.id, spec=run.job, node_id=mine.node_id if mine else "(not placed yet)", rank=rank,
                      num_nodes=run.num_nodes, node0_addr=node0.address if node0 else "(rank 0's node)",
                      node0_port=run.master_port or 29500, gpus=mine.gpus if mine else [], attempt=run.attempt,
                      artifact_dir="(a directory of the run's, made by the agent)", overrides=run.env)
        return shown(env)

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
            if self._grid(run.job, req) is not None:
                raise Invalid(f"runs[{i}]: a sweep is launched on its own (POST /runs), not in a batch")
            runs.append(run)
        self.store.create_runs(runs)  # all or none
        self.wrote(*runs)
        self.tally.add("runs_created", len(runs))
        self.kick()
        return runs

    def _new_run(self, req: RunCreate, who: Principal) -> Run:
        access.require_not_node(who, "launch")
        warnings: list[str] = []
        try:
            if req.job_text is not None:  # the file as written: read here, errors with its name and line
                spec, lines = load_text_lines(req.job_text, file=req.job_file or "job.yaml")
                warnings = unknown_keys(spec, req.job_file or "job.yaml", lines)
            else:
                spec = validate(req.job, file=req.job_file or "job")
        except JobSpecError as exc:
            raise Invalid(str(exc)) from None
        for k, v in req.env.items():
            if (why := env_problem(k, v)) is not None:
                raise Invalid(f"env: {why}")
        if req.labels:
            spec = spec.model_copy(update={"labels": {**spec.labels, **req.labels}})
        if req.cluster is not None:  # its nodes carry the cluster's label (clusters.py): ask for it
            key = cluster_key(req.cluster)
            if not any(n.enforced_labels.get(key) == "true" for n in self.nodes()):
                raise Invalid(f"cluster: no cluster {req.cluster} (`fedml cluster list`; an admin makes one with "
                              "`fedml cluster create NAME NODE...`)")
            spec = spec.model_copy(update={"labels": {**spec.labels, key: "true"}})
        if not spec.commands().strip():
            raise Invalid(f"{req.job_file or 'job'}: job: this file refers to a job stored on FedML's "
                                "platform (job_args); this scheduler needs the commands in `job`")
        # Only a workspace the caller uploaded (or, for an admin, any): a hash alone must not lend a user someone
        # else's files. The same answer whether it exists or not, so it tells nothing about others' blobs.
        if req.workspace_sha and callable(self._blob_exists) and not self._blob_exists(req.workspace_sha, who):
            raise BadRequest(f"workspace {req.workspace_sha[:12]} has not been uploaded")
        mounts = self._mounts(spec, who, req.job_file or "job")
        request = Request.of(spec, who.owner, who.team)
        never = self.never_fits(request)
        if never is not None:
            raise Invalid(f"cannot ever run here: {never}")
        quota = self._quota(request)  # type: ignore[attr-defined]  # (PlacementMixin's)
        if quota is not None and request.gpus * request.count > (most := self.store_limit(request, quota)):  # type: ignore[attr-defined]
            borrow = f", {most - quota[2]} more borrowed" if most > quota[2] else (
                " (`preemptible: false` runs do not borrow)" if not request.preemptible
                and (t := self.team_cached(who.team or "")) is not None and t.borrow_limit else "")
            raise Invalid(f"cannot ever run here: it needs {request.gpus * request.count} GPUs and team {who.team}'s "
                          f"quota for them is {quota[2]}{borrow} ({quota[1]}; `fedml team show {who.team}`)")
        run = Run(
            id=new_run_id(),
            name=req.name or spec.job_name or (Path(req.job_file).stem if req.job_file else "job"),
            job=spec,
            job_file=Path(req.job_file).name if req.job_file else None,
            job_text=req.job_text,
            warnings=warnings,
            workspace_sha=req.workspace_sha,
            env=req.env,
            mounts=mounts,
            priority=spec.priority,
            owner=who.owner,
            team=who.team,
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

    def _mounts(self, spec: JobSpec, who: Principal, file: str) -> list[Mount]:
        """The job's `storage:` resolved to the caller's objects now (a later upload under the name does not
        change this run's inputs). Invalid naming the one missing."""
        out: list[Mount] = []
        for i, m in enumerate(spec.storage or []):
            obj = self._storage(who.owner, m.name) if callable(self._storage) else None
            if obj is None:
                raise Invalid(f"{file}: storage.{i}.name: no storage object {m.name} (`fedml storage list`; "
                              f"upload it with "
                              f"`fedml storage upload PATH -n {m.name}`)")
            out.append(Mount(name=m.name, path=m.where, sha256=obj.sha256, kind=obj.kind, filename=obj.filename))
        return out

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

    def list_runs(self, who: Principal, status: list[RunStatus] | None, limit: int, *,
                  before: tuple[float, str] | None = None, node_id: str | None = None,
                  owner: str | None = None) -> list[Run]:
        """Newest first: those `who` may list (`owner`: only that owner's, within them)."""
        mine = access.runs_listed_for(who)
        if mine is not None and owner not in (None, mine):
            return []
        return [self.waiting(r) for r in self.store.list_runs(status=status, limit=limit, before=before,
                                                              node_id=node_id, owner=mine or owner)]

    def stop_run(self, run_id: str, who: Principal = LOCAL, reason: str = "stop requested") -> Run:
        access.require_not_node(who, "stop")
        self.get_run(run_id, who)  # (may `who` see it: NotFound, as for a run that does not exist, if not)

        def change(run: Run) -> Run | None:  # decided on the run as stored (Store.modify): no run lock
            if run.terminal:
                return None
            if run.status in (RunStatus.QUEUED, RunStatus.LOST):
                return run.changed(RunStatus.KILLED, reason="stopped before it started")
            if run.status == RunStatus.PREEMPTED and run.preempted is not None:  # stopping already: not requeued
                return run.changed(reason=reason, preempted=run.preempted.model_copy(update={"requeue": False}))
            return run.changed(stop_requested=True, reason=reason)

        before, run = self.store.modify(run_id, change)
        if run is not before:
            self.run_changed(run)
            self.moved(before, run)
        return run


def _again(r: Run, now: float, **fields: Any) -> Run:
    """A new run of `r`'s job (same spec, workspace, environment, owner, sweep point), queued afresh."""
    return r.model_copy(update={
        "id": new_run_id(), "status": RunStatus.QUEUED, "placements": [], "scores": [], "master_port": None,
        "artifacts": [], "node_id": None, "gpus": [], "attempt": 1, "attempts": [], "exit_code": None,
        "reason": None, "stop_requested": False, "log_count": 0, "node_names": {}, "created_at": now,
        "updated_at": now, "started_at": None, "ended_at": None, "after": [], "gpu_seconds_done": 0.0,
        "cost_done": 0.0, **fields})


def _text(v: Any) -> str:
    """A sweep value as its environment variable holds it (true/false as YAML writes them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else json.dumps(v)


def _held(max_parallel: int | None) -> str:
    return f"waiting for room in its sweep (at most {max_parallel} of its points queued or running)"
