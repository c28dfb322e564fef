"""The run-outcome policy: what a run becomes, given its ranks' latest states. Pure: the service applies the
answer with one store write (so a scheduler that dies between two writes cannot leave a run half-settled).

- A gang (num_nodes: N) succeeds only if every rank does: one rank failing or lost stops the others.
- A federation's outcome is its server's (rank 0): clients may fail or vanish (the server carries on with the
  rest, down to its min_clients); when the server ends, the clients are stopped.
- A failed or lost attempt is retried (QUEUED again, attempt + 1) when `retry.on` names why and attempts are left;
  else the run FAILED. A stop that was asked for ends KILLED; otherwise every rank finished: FINISHED.
- A PREEMPTED run whose ranks have all stopped is QUEUED again as its next attempt (not counted against
  `retry.max_attempts`: it did nothing wrong), unless a stop was asked meanwhile (KILLED) or every rank finished
  before the stop reached it (FINISHED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .contract.jobspec import JobSpec
from .contract.models import AttemptRecord, Placement, Run, RunStatus

KEEP_ATTEMPTS = 50  # earlier attempts remembered per run (`run status` lists them)


@dataclass(frozen=True)
class Outcome:
    status: RunStatus | None  # the run's new status; None: it stays, only `fields` change
    fields: dict[str, Any] = field(default_factory=dict)  # written in the same store write as the status

    @property
    def retried(self) -> bool:
        return self.status == RunStatus.QUEUED


def decide(run: Run, spec: JobSpec, placements: list[Placement]) -> Outcome:
    """`placements` are the run's ranks with the latest reports applied."""
    ps = placements
    multi = len(ps) > 1
    federation = spec.job_type == "federate" and multi

    def label(p: Placement) -> str:
        return f"rank {p.rank}: {p.reason}" if multi else (p.reason or "")

    if not all(p.done for p in ps):
        fields: dict[str, Any] = {"placements": ps}
        if federation:
            server = ps[0]
            if server.done and not run.stop_requested:
                why = "the server finished" if server.status == RunStatus.FINISHED else label(server)
                fields.update(stop_requested=True, reason=f"{why}; stopping the clients")
        else:
            bad = next((p for p in ps if p.status in (RunStatus.FAILED, RunStatus.LOST)), None)
            if bad is not None and not run.stop_requested:
                fields.update(stop_requested=True, reason=f"{label(bad)}; stopping the other ranks")
        if run.status == RunStatus.STARTING and any(p.status == RunStatus.RUNNING for p in ps):
            return Outcome(RunStatus.RUNNING, fields)
        return Outcome(None, fields)
    deciding = ps[:1] if federation else ps
    if run.status == RunStatus.PREEMPTED and run.preempted is not None:
        if all(p.status == RunStatus.FINISHED for p in deciding):
            return Outcome(RunStatus.FINISHED, {"placements": ps, "exit_code": 0, "reason": None, "preempted": None})
        if run.preempted.requeue:
            return _requeue(run, ps, run.preempted.text(), preempted_by=run.preempted.by,
                            why=f"{run.preempted.text()}; requeued as attempt {run.attempt + 1}")
        return Outcome(RunStatus.KILLED, {"placements": ps, "reason": run.reason, "preempted": None})
    failed = [p for p in deciding if p.status == RunStatus.FAILED]
    lost = [p for p in deciding if p.status == RunStatus.LOST]
    if failed:
        first = failed[0]
        if "error" in spec.retry.on and run.attempt < spec.retry.max_attempts:
            return _retry(run, spec, ps, label(first))
        return Outcome(RunStatus.FAILED, {"placements": ps, "exit_code": first.exit_code, "reason": label(first)})
    if lost:
        if "lost" in spec.retry.on and run.attempt < spec.retry.max_attempts:
            return _retry(run, spec, ps, label(lost[0]))
        return Outcome(RunStatus.FAILED, {"placements": ps, "reason": f"lost: {label(lost[0])} (no retries left)"})
    if any(p.status == RunStatus.KILLED for p in deciding):
        return Outcome(RunStatus.KILLED, {"placements": ps,
                                          "exit_code": next((p.exit_code for p in ps if p.exit_code), None),
                                          "reason": run.reason if run.stop_requested else label(ps[0])})
    return Outcome(RunStatus.FINISHED, {"placements": ps, "exit_code": 0, "reason": None})


def _retry(run: Run, spec: JobSpec, ps: list[Placement], why: str) -> Outcome:
    n = run.attempt + 1
    return _requeue(run, ps, why, why=f"{why}; retrying (attempt {n} of {spec.retry.max_attempts})")


def _requeue(run: Run, ps: list[Placement], ended: str, *, why: str, preempted_by: str | None = None) -> Outcome:
    """QUEUED again as the next attempt; the one that ended (`ended`: why) is kept in `attempts`."""
    done = AttemptRecord(attempt=run.attempt, placements=ps, reason=ended, started_at=run.started_at,
                         preempted_by=preempted_by)
    gpu_s, cost = run.attempt_spent(done.ended_at)  # (what this attempt used is kept: attempts are dropped)
    return Outcome(RunStatus.QUEUED, {
        "gpu_seconds_done": run.gpu_seconds_done + gpu_s, "cost_done": run.cost_done + cost,
        "placements": [], "scores": [], "attempt": run.attempt + 1, "stop_requested": False, "exit_code": None,
        "master_port": None, "started_at": None, "attempts": [*run.attempts, done][-KEEP_ATTEMPTS:],
        "preempted": None, "reason": why})
