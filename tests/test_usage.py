"""What runs used (docs/teams.md: usage): GPU-seconds and cost per attempt, kept across retries, and the report
that sums them by team, user or run (`fedml usage`). In process, over a real SQLite store."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from scheduler import auth
from scheduler.contract.models import GpuInfo, NodeInfo, Principal, RunCreate, RunStatus, StatusReport, Team
from scheduler.notify import Notifier
from scheduler.service import Scheduler
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit


@pytest.fixture
def sched(tmp_path: Path) -> Scheduler:
    return Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0, rng=random.Random(3))


def person(s: Scheduler, name: str, scope: str = "user", team: str | None = None) -> Principal:
    who = auth.verify(s.store, auth.issue(s.store, name=name, scope=scope, owner=name if scope == "user" else "admin",
                                          team=team)[1])
    assert who is not None
    return who


def test_each_attempt_is_counted_at_its_nodes_price_and_kept_across_a_retry(sched: Scheduler) -> None:
    admin = person(sched, "root", "admin")
    a = sched.register_node(NodeInfo(name="a", job_user="fedml-job", price_per_gpu_hour=2.0, gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(2)]), admin).node.id
    rid = sched.create_run(RunCreate(job={"job": "x", "computing": {"minimum_num_gpus": 2},  # type: ignore[arg-type]
                                          "retry": {"max_attempts": 2, "on": ["error"]}})).id
    assert sched.schedule_pass() == 1
    assert sched.get_run(rid).placements[0].price_per_gpu_hour == 2.0
    assert sched.get_run(rid).spend(time.time()).gpu_seconds == 0.0  # placed, not started: nothing yet
    sched.report(rid, StatusReport(status=RunStatus.RUNNING), a)
    time.sleep(0.05)
    sched.report(rid, StatusReport(status=RunStatus.FAILED, exit_code=1), a)  # retried: attempt 2, placed again
    run = sched.get_run(rid)
    first = run.attempts[0]
    assert run.attempt == 2 and first.started_at is not None
    assert run.gpu_seconds_done == pytest.approx(2 * (first.ended_at - first.started_at), abs=1e-6)
    assert run.cost_done == pytest.approx(2 * 2.0 * (first.ended_at - first.started_at) / 3600, abs=1e-9)
    sched.report(rid, StatusReport(status=RunStatus.RUNNING, attempt=2), a)
    sched.report(rid, StatusReport(status=RunStatus.FINISHED, exit_code=0, attempt=2), a)
    run = sched.get_run(rid)
    assert run.started_at is not None and run.ended_at is not None
    second = 2 * (run.ended_at - run.started_at)
    spent = run.spend(time.time() + 3600)  # (ended: no more is counted later)
    assert spent.gpu_seconds == round(run.gpu_seconds_done + second, 3)
    assert spent.cost == round(run.cost_done + second * 2.0 / 3600, 6)


def test_the_usage_report_adds_up_to_the_runs_exactly_and_a_person_sees_their_own(sched: Scheduler) -> None:
    admin = person(sched, "root", "admin")
    nodes = [sched.register_node(NodeInfo(name=n, job_user="fedml-job", price_per_gpu_hour=price, gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(8)]), admin).node.id
        for n, price in (("a", 1.5), ("b", None))]
    for t in ("vision", "nlp"):
        sched.store.put_team(Team(name=t), new=True)
    people = {"ann": person(sched, "ann", team="vision"), "ben": person(sched, "ben", team="vision"),
              "cat": person(sched, "cat", team="nlp")}
    runs = []
    for i in range(9):
        who = list(people.values())[i % 3]
        runs.append(sched.create_run(RunCreate(job={"job": "x", "computing": {"minimum_num_gpus": 1 + i % 2}}),  # type: ignore[arg-type]
                                     who).id)
    while sched.schedule_pass():
        pass
    for rid in runs:
        r = sched.store.get_run(rid)
        assert r is not None and r.status == RunStatus.STARTING and r.placements[0].node_id in nodes
        sched.report(rid, StatusReport(status=RunStatus.RUNNING), r.placements[0].node_id)
    time.sleep(0.02)
    for rid in runs:
        r = sched.store.get_run(rid)
        assert r is not None
        sched.report(rid, StatusReport(status=RunStatus.FINISHED, exit_code=0), r.placements[0].node_id)
    ended = [sched.store.get_run(rid) for rid in runs]
    each = {r.id: r.spend(time.time()) for r in ended if r is not None}
    assert all(s.gpu_seconds > 0 for s in each.values()) and any(s.cost > 0 for s in each.values())
    by_run = sched.usage(admin, "run", 3600)
    assert {row["run"]: row["gpu_seconds"] for row in by_run["rows"]} == {k: v.gpu_seconds for k, v in each.items()}
    by_team = {row["team"]: row for row in sched.usage(admin, "team", 3600)["rows"]}
    for t, members in (("vision", {"ann", "ben"}), ("nlp", {"cat"})):
        mine = [each[r.id] for r in ended if r is not None and r.owner in members]
        assert by_team[t]["runs"] == len(mine)
        assert by_team[t]["gpu_seconds"] == round(sum(s.gpu_seconds for s in mine), 3)
        assert by_team[t]["cost"] == round(sum(s.cost for s in mine), 4)
    total = sched.usage(admin, "user", 3600)["total"]
    assert total["runs"] == 9 and total["gpu_hours"] == round(sum(s.gpu_seconds for s in each.values()) / 3600, 4)
    ann = sched.usage(people["ann"], "user", 3600)  # a person's report: their own runs only
    assert [row["user"] for row in ann["rows"]] == ["ann"] and ann["rows"][0]["runs"] == 3
    assert sched.usage(admin, "team", 3600, team="nlp")["total"]["runs"] == 3
    assert sched.usage(admin, "team", 0.000001)["rows"] == []  # (none created in the last microsecond)


def test_a_team_at_its_quota_waits_while_others_run_and_starts_when_its_gpus_come_back(sched: Scheduler) -> None:
    from scheduler.contract.errors import Invalid
    from scheduler.contract.models import TeamCreate, TeamQuota

    admin = person(sched, "root", "admin")
    a = sched.register_node(NodeInfo(name="a", job_user="fedml-job", gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(6)]), admin).node.id
    for t in ("ml", "cv"):
        sched.create_team(TeamCreate(name=t), admin)
    sched.set_team_quota("ml", TeamQuota(gpus={"any": 2, "A100-80G": 1}), admin)
    ann, cal = person(sched, "ann", team="ml"), person(sched, "cal", team="cv")
    one = {"job": "x", "computing": {"minimum_num_gpus": 1}}
    mine = [sched.create_run(RunCreate(job=one), ann).id for _ in range(3)]  # type: ignore[arg-type]
    typed = sched.create_run(RunCreate(job={"job": "x", "computing": {  # type: ignore[arg-type]
        "minimum_num_gpus": 1, "resource_type": "A100-80G"}}), ann).id
    typed2 = sched.create_run(RunCreate(job={"job": "x", "computing": {  # type: ignore[arg-type]
        "minimum_num_gpus": 1, "resource_type": "A100-80G"}}), ann).id
    theirs = [sched.create_run(RunCreate(job=one), cal).id for _ in range(2)]  # type: ignore[arg-type]
    while sched.schedule_pass():
        pass
    status = {r: sched.get_run(r).status for r in [*mine, typed, typed2, *theirs]}
    assert [status[r] for r in mine] == [RunStatus.STARTING, RunStatus.STARTING, RunStatus.QUEUED]
    assert (status[typed], status[typed2]) == (RunStatus.STARTING, RunStatus.QUEUED)  # its type's own quota
    assert all(status[r] == RunStatus.STARTING for r in theirs)  # another team is not held back (6 GPUs: 5 used)
    assert sched.get_run(mine[2], admin).reason == "team ml holds its quota of 2 GPUs (docs/teams.md)"
    assert sched.get_run(typed2, admin).reason == "team ml holds its quota of 1 A100-80G GPU (docs/teams.md)"
    q = sched.queue(admin, team="ml")  # (`fedml queue --team ml`)
    assert {r["id"] for r in q["runs"]} == {mine[2], typed2} and all(r["team"] == "ml" for r in q["runs"])
    assert all("holds its quota" in r["reason"] for r in q["runs"]) and sched.queue(admin, team="cv")["runs"] == []
    view = sched.team_view("ml", admin)
    assert view["quota_held"] == {"any": 2, "A100-80G": 1} and view["gpus_held"] == 3
    listed = {t["name"]: t["quota_held"] for t in sched.teams_held(ann)}  # (the dashboard's quota bars)
    assert listed == {"ml": {"any": 2, "A100-80G": 1}}
    sched.report(mine[0], StatusReport(status=RunStatus.FINISHED, exit_code=0), a)  # one of its GPUs back
    assert sched.get_run(mine[2]).status == RunStatus.STARTING
    with pytest.raises(Invalid) as e:  # more than its quota could ever give: refused at launch
        sched.create_run(RunCreate(job={"job": "x", "computing": {"minimum_num_gpus": 3}}), ann)  # type: ignore[arg-type]
    assert "team ml's quota for them is 2" in str(e.value)
    sched.set_team_quota("ml", TeamQuota(gpus={}), admin)  # no quota: only the GPUs limit it
    while sched.schedule_pass():
        pass
    assert sched.get_run(typed2).status == RunStatus.STARTING
    assert sched.get_run(typed2).quota_key is None and sched.get_run(mine[2]).quota_key == "ml\tany"


def test_a_team_that_spent_its_budget_waits_with_the_reason_until_it_has_one_again(sched: Scheduler) -> None:
    from scheduler.contract.models import TeamBudget, TeamCreate

    admin = person(sched, "root", "admin")
    a = sched.register_node(NodeInfo(name="a", job_user="fedml-job", price_per_gpu_hour=3600.0, gpus=[
        GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(2)]), admin).node.id
    sched.create_team(TeamCreate(name="ml"), admin)
    sched.set_team_budget("ml", TeamBudget(amount=0.05, period="day"), admin)  # 0.05 at 1 per GPU-second
    ann = person(sched, "ann", team="ml")
    one = {"job": "x", "computing": {"minimum_num_gpus": 1}}
    first = sched.create_run(RunCreate(job=one), ann).id  # type: ignore[arg-type]
    assert sched.schedule_pass() == 1  # nothing spent yet
    sched.report(first, StatusReport(status=RunStatus.RUNNING), a)
    time.sleep(0.1)
    sched.report(first, StatusReport(status=RunStatus.FINISHED, exit_code=0), a)
    spent = sched.get_run(first).spend(time.time()).cost
    assert spent >= 0.05  # (0.1 s of one GPU at 1 a second)
    sched.BUDGET_REFRESH_S = 0.0  # type: ignore[misc]  # (counted at every pass here; 30 s by default)
    second = sched.create_run(RunCreate(job=one), ann).id  # type: ignore[arg-type]
    assert sched.schedule_pass() == 0
    assert sched.get_run(second).reason == "team ml has spent its budget of 0.05 this day (docs/teams.md)"
    view = sched.team_view("ml", admin)
    assert view["budget_spent"] == round(spent, 4) and view["budget"] == 0.05
    other = sched.create_run(RunCreate(job=one)).id  # type: ignore[arg-type]  # (no team: not held back)
    assert sched.schedule_pass() == 1 and sched.get_run(other).status == RunStatus.STARTING
    sched.set_team_budget("ml", TeamBudget(amount=None), admin)
    assert sched.schedule_pass() == 1 and sched.get_run(second).status == RunStatus.STARTING


def test_a_budgets_period_starts_at_midnight_monday_or_the_first_utc() -> None:
    import datetime

    from scheduler.contract.models import Team

    now = datetime.datetime(2026, 12, 6, 15, 30, tzinfo=datetime.UTC).timestamp()  # a Sunday
    day = lambda *a: datetime.datetime(*a, tzinfo=datetime.UTC).timestamp()  # noqa: E731
    assert Team(name="t", budget_period="day").period_start(now) == day(2026, 12, 6)
    assert Team(name="t", budget_period="week").period_start(now) == day(2026, 11, 30)
    assert Team(name="t", budget_period="month").period_start(now) == day(2026, 12, 1)
