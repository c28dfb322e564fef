"""Run behaviour both stores rely on (contract/models.py): stamping a change, the state machine, GPU claims."""

from __future__ import annotations

import pytest

from scheduler.contract.models import InvalidTransition, Placement, Run, RunStatus

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def queued() -> Run:
    return Run(id="run-1", name="r", job={"job": "echo"})  # type: ignore[arg-type]


def test_a_change_is_stamped_and_copies_rank_0_for_display() -> None:
    r = queued()
    ps = [Placement(rank=0, node_id="a", gpus=[1, 2]), Placement(rank=1, node_id="b", gpus=[0])]
    starting = r.changed(RunStatus.STARTING, now=10.0, placements=ps)
    assert (starting.status, starting.node_id, starting.gpus, starting.updated_at) == (RunStatus.STARTING, "a", [1, 2], 10.0)
    assert starting.started_at is None and starting.ended_at is None
    running = starting.changed(RunStatus.RUNNING, now=11.0)
    assert running.started_at == 11.0
    assert running.changed(reason="x", now=12.0).started_at == 11.0  # stamped once
    done = running.changed(RunStatus.FINISHED, now=20.0, exit_code=0)
    assert (done.ended_at, done.exit_code, done.updated_at) == (20.0, 0, 20.0)
    assert r.status == RunStatus.QUEUED and r.placements == []  # the original is untouched


def test_the_state_machine_refuses_and_plain_updates_keep_the_status() -> None:
    r = queued()
    with pytest.raises(InvalidTransition):
        r.changed(RunStatus.RUNNING)  # QUEUED cannot skip STARTING
    with pytest.raises(InvalidTransition):
        r.changed(RunStatus.KILLED).changed(RunStatus.QUEUED)
    assert r.changed(reason="waiting", now=5.0).status == RunStatus.QUEUED


def test_gpu_claims_are_unfinished_placements_of_an_unfinished_run() -> None:
    ps = [Placement(rank=0, node_id="a", gpus=[0, 1]), Placement(rank=1, node_id="b", gpus=[3], status=RunStatus.FAILED)]
    r = queued().changed(RunStatus.STARTING, placements=ps)
    assert r.gpu_claims() == {("a", 0), ("a", 1)}
    assert r.changed(RunStatus.KILLED).gpu_claims() == set()
