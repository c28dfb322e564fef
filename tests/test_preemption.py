"""Preemption and borrowing (docs/teams.md): the choice of victims (scheduler/preemption.py, pure), then the
scheduler in process over a real SQLite store, with the agents' side played by its own calls (polls, reports).
The same end to end, with real agents and jobs, is in tests/test_preemption_e2e.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scheduler import auth
from scheduler.contract.errors import Invalid
from scheduler.contract.models import (
    GpuInfo,
    NodeInfo,
    Principal,
    RunCreate,
    RunStatus,
    StatusReport,
    TeamCreate,
    TeamQuota,
    attempt_ref,
)
from scheduler.notify import Notifier
from scheduler.preemption import Need, Victim, choose
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit


# -- the choice ------------------------------------------------------------------------------------------------
def v(run_id: str, priority: int, started: float, freed: dict[str, int], quota: int = 0, team: str = "t") -> Victim:
    return Victim(run_id, priority, started, freed, quota, team)


def ids(got: list[Victim] | None) -> list[str] | None:
    return None if got is None else sorted(x.run_id for x in got)


def test_the_fewest_victims_then_the_lowest_priority_then_the_youngest() -> None:
    need = Need(gpus=2)
    # node a: two 1-GPU runs; node b: one 2-GPU run: stopping one run (b's) beats stopping two
    victims = [v("a1", 0, 10, {"a": 1}), v("a2", 0, 20, {"a": 1}), v("b1", 0, 5, {"b": 2})]
    assert ids(choose(need, {}, victims)) == ["b1"]
    # as few either way: the lower priority goes
    victims = [v("x", 1, 10, {"a": 2}), v("y", 0, 5, {"b": 2})]
    assert ids(choose(need, {}, victims)) == ["y"]
    # same priority: the youngest (latest started) goes
    victims = [v("old", 0, 10, {"a": 2}), v("young", 0, 20, {"b": 2})]
    assert ids(choose(need, {}, victims)) == ["young"]
    # a GPU free on a node counts: one victim there is enough
    victims = [v("a1", 0, 10, {"a": 1}), v("b1", 0, 20, {"b": 1})]
    assert ids(choose(need, {"a": 1}, victims)) == ["a1"]


def test_nothing_that_would_not_make_it_fit_is_stopped() -> None:
    assert choose(Need(gpus=4), {}, [v("a", 0, 1, {"n": 2}), v("b", 0, 2, {"m": 2})]) is None
    assert choose(Need(gpus=1), {"n": 1}, [v("a", 0, 1, {"n": 1})]) == []  # it fits already


def test_a_gang_is_a_victim_whole_and_a_gang_needs_enough_nodes() -> None:
    # A 2-node victim frees a GPU on each of two nodes: one victim gives a 2-node waiting run what it needs.
    gang = v("gang", 0, 1, {"a": 1, "b": 1})
    singles = [v("s1", 0, 9, {"a": 1}), v("s2", 0, 8, {"b": 1})]
    assert ids(choose(Need(gpus=1, nodes=2), {}, [gang, *singles])) == ["gang"]
    # a 1-node waiting run does not need to stop the gang when a single does it
    assert ids(choose(Need(gpus=1), {}, [gang, *singles])) == ["s1"]


def test_a_team_gives_back_no_more_than_it_borrowed() -> None:
    victims = [v("r1", 0, 10, {"a": 1}, team="red"), v("r2", 0, 20, {"a": 1}, team="red")]

    def one_of_red(x: Victim, chosen: list[Victim]) -> bool:
        return sum(1 for c in chosen if c.team == "red") < 1

    assert choose(Need(gpus=2), {}, victims, one_of_red) is None
    assert ids(choose(Need(gpus=1), {}, victims, one_of_red)) == ["r2"]


def test_waiting_for_its_quota_it_stops_runs_of_that_quota() -> None:
    # GPUs are free, the team's quota is what is short: a run holding that quota is stopped, not one of another
    victims = [v("other", 0, 20, {"a": 1}, quota=0), v("mine", 0, 10, {"b": 1}, quota=1)]
    assert ids(choose(Need(gpus=1, quota=1), {"c": 1}, victims)) == ["mine"]
    # one run of the quota, on a node where the waiting run needs 2: stopping it alone gives the quota back and,
    # with the free GPU on c, room; on b the run would need it and the other run as well
    victims = [v("other", 0, 20, {"b": 1}, quota=0), v("mine", 0, 10, {"b": 1}, quota=2)]
    assert ids(choose(Need(gpus=2, quota=2), {"c": 2}, victims)) == ["mine"]


# -- in the scheduler -----------------------------------------------------------------------------------------
ONE = {"job": "x", "computing": {"minimum_num_gpus": 1}}


@pytest.fixture
def world(tmp_path: Path) -> tuple[Scheduler, Principal, dict[str, Principal]]:
    sched = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1e9, rng=random.Random(1))
    admin = auth.verify(sched.store, auth.issue(sched.store, name="root", scope="admin", owner="admin")[1])
    assert admin is not None
    people = {}
    for team in ("red", "blue"):
        sched.create_team(TeamCreate(name=team), admin)
        for user in ("a", "b"):
            who = auth.verify(sched.store, auth.issue(sched.store, name=f"{team}-{user}", scope="user",
                                                      owner=f"{team}-{user}", team=team)[1])
            assert who is not None
            people[f"{team}-{user}"] = who
    return sched, admin, people


def node(sched: Scheduler, admin: Principal, name: str, gpus: int = 2) -> str:
    return sched.register_node(NodeInfo(name=name, job_user="fedml-job", gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(gpus)]), admin).node.id


def launch(sched: Scheduler, who: Principal, priority: int = 0, **job: object) -> str:
    return sched.create_run(RunCreate(job={**ONE, "priority": priority, **job}), who).id


def running(sched: Scheduler, run_id: str) -> None:
    for p in sched.get_run(run_id).placements:
        sched.report(run_id, StatusReport(status=RunStatus.RUNNING), p.node_id)


def stopped(sched: Scheduler, run_id: str) -> None:
    """Each rank's agent stopped it (as an agent reports a stop it was told of: KILLED)."""
    r = sched.get_run(run_id)
    for p in r.placements:
        sched.report(run_id, StatusReport(status=RunStatus.KILLED, attempt=r.attempt, reason="preempted"), p.node_id)


def status(sched: Scheduler, run_id: str) -> RunStatus:
    return sched.get_run(run_id).status


def test_a_higher_priority_run_preempts_the_youngest_lower_one_of_its_team(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    n = node(sched, admin, "n")
    old = launch(sched, people["red-a"], preemption={"grace": "45s"})
    sched.schedule_pass()
    young = launch(sched, people["red-b"], preemption={"grace": "45s"})
    sched.schedule_pass()
    for r in (old, young):
        running(sched, r)
    keep = launch(sched, people["blue-a"], priority=100)  # another team's: no GPU for it, and it preempts no one
    sched.schedule_pass()
    assert status(sched, keep) == RunStatus.QUEUED and {status(sched, r) for r in (old, young)} == {RunStatus.RUNNING}
    urgent = launch(sched, people["red-a"], priority=10)
    sched.schedule_pass()
    got = sched.get_run(young)
    assert got.status == RunStatus.PREEMPTED and got.stop_requested and got.preempted is not None
    assert got.preempted.by == urgent and "priority 10 over 0 in team red" in got.reason
    assert status(sched, old) == RunStatus.RUNNING
    assert "preempting 1 run" in (sched.get_run(urgent).reason or "")
    # The agent is told to stop it, with the job's grace
    poll = sched.poll_once(n, [attempt_ref(old, 1), attempt_ref(young, 1)], admin)
    assert poll.stop == [attempt_ref(young, 1)] and poll.grace == {attempt_ref(young, 1): 45.0}
    sched.schedule_pass()  # (a pass while it stops: its GPU stays its own; nothing more is preempted)
    assert status(sched, old) == RunStatus.RUNNING and status(sched, urgent) == RunStatus.QUEUED
    stopped(sched, young)
    # Requeued as attempt 2 (the attempt it was: PREEMPTED by `urgent`); `urgent` took its GPU, not blue's run
    got = sched.get_run(young)
    assert got.status == RunStatus.QUEUED and got.attempt == 2 and got.attempts[-1].preempted_by == urgent
    assert got.preempted is None and not got.stop_requested
    assert status(sched, urgent) == RunStatus.STARTING and status(sched, keep) == RunStatus.QUEUED
    sched.schedule_pass()
    assert status(sched, young) == RunStatus.QUEUED  # no GPU for it, and it preempts no one (lower priority)
    assert sched.tally.snapshot()[0].get("preemptions") == 1


def test_a_gang_is_stopped_whole_and_a_non_preemptible_run_never(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    a, b = node(sched, admin, "a", 1), node(sched, admin, "b", 1)
    gang = launch(sched, people["red-a"], num_nodes=2)
    sched.schedule_pass()
    running(sched, gang)
    solo = launch(sched, people["red-b"], priority=5)
    sched.schedule_pass()
    got = sched.get_run(gang)
    assert got.status == RunStatus.PREEMPTED and {p.node_id for p in got.placements} == {a, b}
    for nid in (a, b):  # both ranks are told to stop
        assert sched.poll_once(nid, [attempt_ref(gang, 1)], admin).stop == [attempt_ref(gang, 1)]
    r0 = got.placements[0]
    sched.report(gang, StatusReport(status=RunStatus.KILLED, attempt=1), r0.node_id)
    # one rank stopped: the run is still being preempted (its other rank holds its GPU); solo takes the freed one
    assert status(sched, gang) == RunStatus.PREEMPTED and status(sched, solo) == RunStatus.STARTING
    sched.report(gang, StatusReport(status=RunStatus.KILLED, attempt=1), got.placements[1].node_id)
    assert status(sched, gang) == RunStatus.QUEUED and sched.get_run(gang).attempt == 2
    sched.stop_run(gang, admin)  # (else, first in line, it would hold the free node for itself)
    # The other node is free; a run that may not be preempted takes it. A higher priority stops solo, never it.
    fixed = launch(sched, people["red-a"], preemptible=False)
    sched.schedule_pass()
    assert status(sched, fixed) == RunStatus.STARTING
    top = launch(sched, people["red-b"], priority=50)
    sched.schedule_pass()
    assert status(sched, solo) == RunStatus.PREEMPTED and status(sched, fixed) == RunStatus.STARTING
    assert sched.get_run(solo).preempted.by == top  # type: ignore[union-attr]


def test_a_stop_asked_while_preempted_ends_it_killed(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    n = node(sched, admin, "n", 2)
    stopping = launch(sched, people["red-a"])  # being stopped by its user: no one's victim (it would be requeued)
    low = launch(sched, people["red-a"])
    sched.schedule_pass()
    running(sched, low)
    running(sched, stopping)
    sched.stop_run(stopping, people["red-a"])
    launch(sched, people["red-b"], priority=1)
    sched.schedule_pass()
    assert status(sched, low) == RunStatus.PREEMPTED
    assert sched.get_run(stopping).status == RunStatus.RUNNING
    sched.stop_run(low, people["red-a"])
    stopped(sched, low)
    got = sched.get_run(low)
    assert got.status == RunStatus.KILLED and got.attempt == 1
    sched.report(stopping, StatusReport(status=RunStatus.KILLED), n)
    assert sched.get_run(stopping).status == RunStatus.KILLED


def quota(sched: Scheduler, admin: Principal, team: str, gpus: int, borrow: int | None = None) -> None:
    sched.set_team_quota(team, TeamQuota(gpus={"any": gpus}, borrow_limit=borrow), admin)


def test_a_team_borrows_idle_quota_and_the_owner_reclaims_it(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    node(sched, admin, "n", 2)
    quota(sched, admin, "red", 1, borrow=1)
    quota(sched, admin, "blue", 1)
    reds = [launch(sched, people["red-a"]) for _ in range(3)]
    sched.schedule_pass()
    # red holds its quota and borrows blue's idle one: two run, the third waits (its borrow limit is 1)
    assert [status(sched, r) for r in reds] == [RunStatus.STARTING, RunStatus.STARTING, RunStatus.QUEUED]
    fixed = launch(sched, people["red-b"], preemptible=False)  # would never borrow
    for r in reds[:2]:
        running(sched, r)
    blue = launch(sched, people["blue-a"])
    sched.schedule_pass()
    # blue reclaims its quota: red's borrowed run (the youngest) is preempted, not its own quota's
    victim = sched.get_run(reds[1])
    assert victim.status == RunStatus.PREEMPTED and "team blue reclaims its quota of 1 GPUs, lent to team red" in \
        (victim.reason or "")
    assert status(sched, reds[0]) == RunStatus.RUNNING
    stopped(sched, reds[1])
    assert status(sched, blue) == RunStatus.STARTING
    sched.schedule_pass()
    # red's victim is back in the queue and does not borrow again (blue's quota is in use: nothing idle to lend)
    assert status(sched, reds[1]) == RunStatus.QUEUED and status(sched, fixed) == RunStatus.QUEUED
    assert sched.get_run(reds[1]).attempt == 2


def test_no_borrowing_while_the_lender_waits_and_a_hard_cap_without_a_borrow_limit(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    node(sched, admin, "n", 2)
    quota(sched, admin, "red", 1)  # no borrow limit: a cap
    quota(sched, admin, "blue", 1, borrow=1)
    reds = [launch(sched, people["red-a"]) for _ in range(2)]
    sched.schedule_pass()
    assert [status(sched, r) for r in reds] == [RunStatus.STARTING, RunStatus.QUEUED]
    assert "team red holds its quota of 1 GPU" in (sched.get_run(reds[1]).reason or "")
    # blue may borrow, but only red's idle quota: red uses it, so blue's second run waits
    blues = [launch(sched, people["blue-a"]) for _ in range(2)]
    sched.schedule_pass()
    assert [status(sched, r) for r in blues] == [RunStatus.STARTING, RunStatus.QUEUED]


def test_a_run_past_its_quota_and_borrow_limit_is_refused_at_launch(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    node(sched, admin, "n", 4)
    quota(sched, admin, "red", 1, borrow=1)
    with pytest.raises(Invalid, match="quota for them is 1, 1 more borrowed"):
        launch(sched, people["red-a"], computing={"minimum_num_gpus": 3})
    launch(sched, people["red-a"], computing={"minimum_num_gpus": 2})
    with pytest.raises(Invalid, match="preemptible: false"):
        launch(sched, people["red-a"], computing={"minimum_num_gpus": 2}, preemptible=False)


def test_preemption_needs_a_team(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, _ = world
    node(sched, admin, "n", 1)
    plain = auth.verify(sched.store, auth.issue(sched.store, name="p", scope="user", owner="p")[1])
    assert plain is not None
    low = launch(sched, plain)
    sched.schedule_pass()
    high = launch(sched, plain, priority=9)
    sched.schedule_pass()
    assert status(sched, low) == RunStatus.STARTING and status(sched, high) == RunStatus.QUEUED


def test_the_queue_counts_a_teams_quota_in_its_estimates_and_names_the_team_ahead(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    n = node(sched, admin, "n", 2)
    quota(sched, admin, "red", 1)
    first = launch(sched, people["red-a"], max_duration="10m")
    sched.schedule_pass()
    running(sched, first)
    second = launch(sched, people["red-a"], max_duration="10m")
    big = launch(sched, people["blue-a"], computing={"minimum_num_gpus": 2})
    sched.schedule_pass()
    q = {r["id"]: r for r in sched.queue(admin)["runs"]}
    started = sched.get_run(first).started_at
    assert started is not None and n
    # a GPU is free, but red's quota is not: it starts when `first` is expected to end
    assert q[second]["start_at"] == pytest.approx(started + 600, abs=1)
    assert "team red holds its quota of 1 GPU" in q[second]["reason"]
    assert q[big]["ahead"]["owners"] == [{"owner": "red-a", "team": "red", "runs": 1, "gpus": 1}]


def test_shapes_skipped_while_no_gpu_is_free_still_show_their_counts(world) -> None:  # type: ignore[no-untyped-def]
    sched, admin, people = world
    n = node(sched, admin, "n", 2)
    busy = [launch(sched, people["red-a"]), launch(sched, people["red-b"])]
    sched.schedule_pass()
    waiting = [launch(sched, people[p]) for p in ("blue-a", "blue-b", "red-a", "red-b")]  # four shapes
    sched.schedule_pass()  # (each told "no node with 1 free GPU")
    sched.report(busy[0], StatusReport(status=RunStatus.FINISHED, exit_code=0), n)  # a pass places one of them
    started = [r for r in waiting if status(sched, r) == RunStatus.STARTING]
    assert len(started) == 1
    reasons = sorted(sched.get_run(r).reason or "" for r in waiting if r not in started)
    # the first blocked holds the node; those the pass then skipped (no GPU free, nothing to preempt) are counted
    assert reasons == ["no node with 1 free GPU (1 node has them busy)"] + \
        ["no node with 1 free GPU (1 node is held for a job ahead in the queue)"] * 2, reasons
