"""Preemption and borrowing end to end (docs/teams.md): a real head, real agents (one declared GPU each), real
jobs that save a checkpoint on SIGTERM; several users of two teams, through the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import Cluster, start_cluster
from .procs import wait_for

NODES = ("g1", "g2", "g3")
GRACE = 5.0

# Counts to 40 (a step every 0.25 s), from where the attempt before it stopped: on SIGTERM it saves its step in
# FEDML_ARTIFACT_DIR, which the next attempt starts with.
RESUMING = r"""
s=$(cat "$FEDML_ARTIFACT_DIR/step" 2>/dev/null || echo 0)
echo "attempt $FEDML_ATTEMPT rank $NODE_RANK resumes at $s"
trap 'echo "$s" > "$FEDML_ARTIFACT_DIR/step"; echo "saved $s"; exit 0' TERM
while [ "$s" -lt 40 ]; do s=$((s+1)); sleep 0.25; done
echo "rank $NODE_RANK done at $s"
"""
FOREVER = "trap 'echo stopping; exit 0' TERM; while true; do sleep 0.2; done"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    args = {n: ["--gpus", "A100-80G:1"] for n in NODES}
    yield from start_cluster(tmp_path_factory.mktemp("preempt"), NODES, torch=False, heartbeat=0.5, node_args=args)


def key(c: Cluster, name: str, team: str) -> str:
    if c.fedml("team", "show", team).returncode != 0:
        assert c.fedml("team", "create", team).returncode == 0
    r = c.fedml("scheduler", "key", "create", name, "--team", team)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def launch(c: Cluster, who: str, job: str, tmp: Path, **extra: Any) -> str:
    import yaml

    spec = {"job": job, "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G"},
            "preemption": {"grace": f"{GRACE:g}s"}, **extra}
    path = tmp / f"job-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = c.fedml("launch", str(path), "--detach", key=who)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def run(c: Cluster, run_id: str) -> dict[str, Any]:
    return c.json("run", "status", run_id)  # type: ignore[no-any-return]


def status_of(c: Cluster, run_id: str, *want: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(f"{run_id} to be {'/'.join(want)}", lambda: (r := run(c, run_id))["status"] in want and r,
                    timeout=timeout)


def test_priority_preempts_a_whole_gang_that_resumes_from_its_checkpoint(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    alice, bob = key(c, "alice", "red"), key(c, "bob", "red")
    gang = launch(c, alice, RESUMING, tmp_path, num_nodes=2)
    status_of(c, gang, "RUNNING")
    fixed = launch(c, bob, FOREVER, tmp_path, preemptible=False)  # the third GPU; never a victim
    status_of(c, fixed, "RUNNING")
    wait_for("the gang to count a few steps", lambda: all(len(v) >= 1 for v in c.logs(gang).values()), timeout=30)
    time.sleep(1.0)  # (a few steps in: there is something to save)
    urgent = launch(c, bob, "echo urgent; sleep 1", tmp_path, priority=10)
    got = status_of(c, gang, "PREEMPTED", "QUEUED", "STARTING", "RUNNING", timeout=30)
    assert got["attempt"] >= 1
    done = status_of(c, urgent, "FINISHED", timeout=60)
    assert done["attempt"] == 1
    # The gang was stopped whole, requeued as attempt 2, and finished from where it stopped
    final = status_of(c, gang, "FINISHED", timeout=90)
    assert final["attempt"] == 2, final
    first = final["attempts"][0]
    assert first["preempted_by"] == urgent and "priority 10 over 0 in team red" in first["reason"]
    assert len(first["placements"]) == 2 and {p["status"] for p in first["placements"]} == {"KILLED"}
    logs = c.logs(gang)
    for rank in (0, 1):
        lines = logs[rank]
        saved = [int(ln.split()[1]) for ln in lines if ln.startswith("saved ")]
        resumed = [ln for ln in lines if ln.startswith("attempt 2 ")]
        assert saved and saved[0] > 0, lines
        assert resumed == [f"attempt 2 rank {rank} resumes at {saved[0]}"], lines
        assert f"rank {rank} done at 40" in lines
    sys_lines = "\n".join(logs.get(-1, []))
    assert f"preempted by {urgent}" in sys_lines
    # the job that may not be preempted ran all along, as its first attempt
    kept = run(c, fixed)
    assert kept["status"] == "RUNNING" and kept["attempt"] == 1
    assert c.fedml("run", "stop", fixed).returncode == 0
    status_of(c, fixed, "KILLED")


def test_a_team_borrows_idle_quota_and_the_owner_reclaims_it_within_a_pass_and_the_grace(
        cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    carol, dave = key(c, "carol", "vision"), key(c, "dave", "speech")
    for team, args in (("vision", ["--gpus", "any:1", "--borrow-limit", "1"]), ("speech", ["--gpus", "any:2"])):
        if c.fedml("team", "show", team).returncode != 0:
            assert c.fedml("team", "create", team).returncode == 0
        r = c.fedml("team", "quota", team, *args)
        assert r.returncode == 0, r.stderr
    mine = [launch(c, carol, FOREVER, tmp_path) for _ in range(3)]
    for r in mine[:2]:  # its quota, and one borrowed of speech's idle two (its borrow limit)
        status_of(c, r, "RUNNING")
    waiting = run(c, mine[2])
    assert waiting["status"] == "QUEUED" and "team vision holds its quota of 1 GPU" in waiting["reason"]
    shown = c.fedml("team", "show", "vision").stdout
    assert "any: 2 of 1 GPUs held (1 borrowed)" in shown and "borrows up to 1" in shown, shown
    first = launch(c, dave, FOREVER, tmp_path)  # speech's first run takes the free GPU
    status_of(c, first, "RUNNING")
    t0 = time.monotonic()
    theirs = launch(c, dave, FOREVER, tmp_path)  # its second, within its quota: it reclaims the lent GPU
    got = status_of(c, theirs, "RUNNING", timeout=GRACE + 30)
    took = time.monotonic() - t0
    assert took < GRACE + 10, took  # a pass, the victim's stop (it exits at SIGTERM), its report
    victims = [r for r in mine if run(c, r)["attempt"] == 2]
    assert len(victims) == 1, [run(c, r) for r in mine]
    v = run(c, victims[0])
    assert v["status"] == "QUEUED" and v["attempts"][0]["preempted_by"] == theirs
    assert "team speech reclaims its quota of 2 GPUs, lent to team vision" in v["attempts"][0]["reason"]
    assert got["attempt"] == 1
    # vision holds its own quota (not preempted), and does not borrow again while speech uses its GPUs
    time.sleep(2)
    assert sum(run(c, r)["status"] == "RUNNING" for r in mine) == 1
    for r in [*mine, first, theirs]:
        c.fedml("run", "stop", r)
    for r in [*mine, first, theirs]:
        status_of(c, r, "KILLED", "FINISHED")
