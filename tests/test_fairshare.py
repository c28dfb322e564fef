"""Fair share among teams (docs/teams.md), in process over a real SQLite store, on a compressed clock: every call
of time.time() reads a clock the test moves (hours pass in no time), and the half-life is an hour."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from scheduler import auth
from scheduler.contract.models import GpuInfo, NodeInfo, Principal, RunCreate, RunStatus, StatusReport, TeamCreate
from scheduler.notify import Notifier
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit

ONE = {"job": "x", "computing": {"minimum_num_gpus": 1}}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # (from now on: pydantic's default created_at reads the real clock)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Scheduler, Clock, str, dict[str, Principal]]:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    monkeypatch.setenv("FEDML_FAIRSHARE_HALF_LIFE", "3600")
    sched = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1e9, rng=random.Random(1))
    sched.FAIR_REFRESH_S = 0.0  # type: ignore[misc]  # (counted at every pass here; a minute by default)
    admin = auth.verify(sched.store, auth.issue(sched.store, name="root", scope="admin", owner="admin")[1])
    assert admin is not None
    node = sched.register_node(NodeInfo(name="a", job_user="fedml-job", gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(2)]), admin).node.id
    people = {}
    for team in ("red", "blue"):
        sched.create_team(TeamCreate(name=team), admin)
        who = auth.verify(sched.store, auth.issue(sched.store, name=f"{team}-user", scope="user",
                                                  owner=f"{team}-user", team=team)[1])
        assert who is not None
        people[team] = who
    return sched, clock, node, people


def step(sched: Scheduler, clock: Clock, node: str, minutes: float = 10) -> list[str]:
    """Place what fits, let it run `minutes`, finish it. Returns the teams of the runs that ran."""
    while sched.schedule_pass():
        pass
    running = sched.store.list_runs(status=[RunStatus.STARTING], limit=100)
    for r in running:
        sched.report(r.id, StatusReport(status=RunStatus.RUNNING), node)
    clock.now += minutes * 60
    for r in running:
        sched.report(r.id, StatusReport(status=RunStatus.FINISHED, exit_code=0), node)
        sched.schedule_pass()  # (the report placed into its GPU already: SQLite)
    return [r.team or "" for r in running]


def test_two_teams_with_equal_shares_get_equal_gpu_hours_while_both_wait(world) -> None:  # type: ignore[no-untyped-def]
    sched, clock, node, people = world
    for team in ("red", "blue"):  # red's 50 jobs all arrive before blue's
        for _ in range(50):
            sched.create_run(RunCreate(job=ONE), people[team])  # type: ignore[arg-type]
            clock.now += 0.001
    got = {"red": 0, "blue": 0}
    for _ in range(20):  # both teams have runs waiting all along
        for team in step(sched, clock, node):
            got[team] += 1
    assert abs(got["red"] - got["blue"]) <= 0.1 * max(got.values()), got  # (first come, first served: 40 to 0)
    usage = {row["team"]: row["gpu_seconds"] for row in sched.usage(sched_admin(sched), "team", 86400 * 30)["rows"]}
    assert abs(usage["red"] - usage["blue"]) <= 0.1 * max(usage.values()), usage


def sched_admin(sched: Scheduler) -> Principal:
    who = auth.verify(sched.store, auth.issue(sched.store, name="usage", scope="admin", owner="admin")[1])
    assert who is not None
    return who


def test_a_team_that_used_much_waits_behind_an_idle_one_until_its_use_decays(world) -> None:  # type: ignore[no-untyped-def]
    sched, clock, node, people = world
    for _ in range(8):  # red uses both GPUs for 8 x 30 minutes
        sched.create_run(RunCreate(job=ONE), people["red"])  # type: ignore[arg-type]
    for _ in range(4):
        step(sched, clock, node, minutes=30)
    red = [sched.create_run(RunCreate(job=ONE), people["red"]).id for _ in range(2)]  # type: ignore[arg-type]
    clock.now += 1
    blue = [sched.create_run(RunCreate(job=ONE), people["blue"]).id for _ in range(2)]  # type: ignore[arg-type]
    assert sched.schedule_pass() == 2  # the two GPUs go to blue, who came later but used nothing
    assert {sched.get_run(r).status for r in blue} == {RunStatus.STARTING}
    assert {sched.get_run(r).status for r in red} == {RunStatus.QUEUED}
    q = sched.queue(sched_admin(sched))
    assert [r["id"] for r in q["runs"]] == red  # (the queue shows the order passes use)
    for r in blue:
        sched.report(r, StatusReport(status=RunStatus.FINISHED, exit_code=0), node)
    # Ten half-lives later red's past use weighs 1/1024 of what it was: arrival order again.
    clock.now += 10 * 3600
    more_blue = sched.create_run(RunCreate(job=ONE), people["blue"]).id  # type: ignore[arg-type]
    while sched.schedule_pass():
        pass
    assert {sched.get_run(r).status for r in red} == {RunStatus.STARTING}
    assert sched.get_run(more_blue).status == RunStatus.QUEUED
