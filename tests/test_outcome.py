"""The run-outcome policy (scheduler/outcome.py) as a table: ranks' states in, the run's next state out."""

from __future__ import annotations

import pytest

from scheduler.contract.jobspec import JobSpec
from scheduler.contract.models import Placement, Run, RunStatus
from scheduler.outcome import KEEP_ATTEMPTS, decide

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)

S, R, F, X, K, L = (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED,
                    RunStatus.LOST)


def ranks(*states: RunStatus) -> list[Placement]:
    return [Placement(rank=i, node_id=f"n{i}", status=s, exit_code=3 if s == X else None, reason=s.value.lower())
            for i, s in enumerate(states)]


def run(job_type: str = "train", retry: dict | None = None, **kw: object) -> tuple[Run, JobSpec]:
    doc = {"job": "echo", "job_type": job_type, **({"retry": retry} if retry else {})}
    r = Run(**{"id": "run-1", "name": "r", "job": doc, "status": RunStatus.RUNNING, **kw})  # type: ignore[arg-type]
    return r, r.job


@pytest.mark.parametrize("states, status, exit_code", [
    ((F,), F, 0), ((F, F, F), F, 0), ((X,), X, 3), ((F, X), X, 3), ((L,), X, None), ((K,), K, None),
])
def test_ended_gangs(states: tuple[RunStatus, ...], status: RunStatus, exit_code: int | None) -> None:
    r, spec = run()
    out = decide(r, spec, ranks(*states))
    assert (out.status, out.fields.get("exit_code")) == (status, exit_code)


def test_a_failed_rank_stops_the_others_and_the_run_waits_for_them() -> None:
    r, spec = run()
    out = decide(r, spec, ranks(R, X, R))
    assert out.status is None and out.fields["stop_requested"] and out.fields["reason"].startswith("rank 1: failed")
    r2, _ = run(stop_requested=True, reason="already stopping")
    assert "stop_requested" not in decide(r2, spec, ranks(R, X, R)).fields  # asked once


def test_starting_becomes_running_with_the_first_running_rank() -> None:
    r, spec = run(status=RunStatus.STARTING)
    assert decide(r, spec, ranks(S, R)).status == R
    assert decide(r, spec, ranks(S, S)).status is None


def test_a_federation_is_its_server() -> None:
    r, spec = run("federate")
    assert decide(r, spec, ranks(R, X, L)).status is None  # clients may fail; the server carries on
    assert "stop_requested" not in decide(r, spec, ranks(R, X, L)).fields
    out = decide(r, spec, ranks(F, R, R))
    assert out.status is None and out.fields["reason"] == "the server finished; stopping the clients"
    assert decide(r, spec, ranks(F, X, K)).status == F
    assert decide(r, spec, ranks(X, F, F)).status == X


@pytest.mark.parametrize("on, state, retried", [(["lost"], L, True), (["lost"], X, False), (["error"], X, True),
                                                (["error"], L, False), (["lost", "error"], X, True)])
def test_retries_follow_retry_on(on: list[str], state: RunStatus, retried: bool) -> None:
    r, spec = run(retry={"max_attempts": 3, "on": on})
    out = decide(r, spec, ranks(state))
    assert out.retried is retried
    if retried:
        f = out.fields
        assert (f["attempt"], f["placements"], f["stop_requested"]) == (2, [], False)
        assert f["attempts"][-1].attempt == 1 and f["attempts"][-1].placements[0].status == state
        assert f["reason"].endswith("retrying (attempt 2 of 3)")


def test_no_retry_past_max_attempts_and_history_is_bounded() -> None:
    r, spec = run(retry={"max_attempts": 3, "on": ["lost"]}, attempt=3)
    out = decide(r, spec, ranks(L))
    assert out.status == X and out.fields["reason"] == "lost: lost (no retries left)"
    from scheduler.contract.models import AttemptRecord

    many = [AttemptRecord(attempt=i) for i in range(1, KEEP_ATTEMPTS + 5)]
    r, spec = run(retry={"max_attempts": 100, "on": ["lost"]}, attempt=KEEP_ATTEMPTS + 5, attempts=many)
    assert len(decide(r, spec, ranks(L)).fields["attempts"]) == KEEP_ATTEMPTS


def test_a_stop_that_was_asked_for_keeps_its_reason() -> None:
    r, spec = run(stop_requested=True, reason="stop requested")
    assert decide(r, spec, ranks(K, K)).fields["reason"] == "stop requested"
