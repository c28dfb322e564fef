"""A scheduler whose disk fills up: writes answer 503 with the reason (not a bare 500), /healthz says it is
degraded, a run that ends meanwhile is not lost, and once space is freed everything settles by itself.

Real processes: a head scheduler whose FEDML_HOME (SQLite store, blobs) is a 16 MiB tmpfs this test mounts
(root), and a real agent beside it. The disk is filled with a plain file, as a full disk is in life.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.contract.transport import httpx

from .cluster import Cluster, start_cluster
from .conftest import needs, write_job
from .procs import wait_for


@pytest.fixture
def full_head(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    needs("root (to mount a small tmpfs as the scheduler's disk)", os.geteuid() == 0, "run as root")
    home = tmp_path / "head"
    home.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(home)],
                       capture_output=True, text=True)
    needs("a tmpfs mount", r.returncode == 0, r.stderr.strip())
    try:
        yield from ((c, home) for c in start_cluster(tmp_path, ("d1",), torch=False))
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write until the disk has not one block left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_answers_503_reports_degraded_and_settles_when_space_returns(
        full_head: tuple[Cluster, Path], tmp_path: Path) -> None:
    c, disk = full_head
    go = tmp_path / "go"
    run_id = c.fedml("launch", str(write_job(tmp_path / "a", f"echo before\nwhile [ ! -e {go} ]; do sleep 0.1; done\n"
                                                            "echo after; exit 3")), "--detach").stdout.strip()
    assert run_id.startswith("run-"), run_id
    wait_for("the run to be RUNNING", lambda: c.json("run", "status", run_id)["status"] == "RUNNING", timeout=30)
    wait_for("its first line", lambda: c.logs(run_id).get(0) == ["before"], timeout=20)

    filler = fill(disk)
    r = c.fedml("launch", str(write_job(tmp_path / "b", "echo never")), "--detach")
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "disk is full" in r.stderr and "nothing was changed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    health = httpx.get(c.url + "/healthz", timeout=5)
    assert health.status_code == 503 and "disk is full" in health.json()["degraded"], health.text
    listed = c.json("run", "list")  # reads keep working
    assert [x["id"] for x in listed] == [run_id], listed

    go.touch()  # the job ends while nothing can be stored: its report and its last line wait on the node
    wait_for("the job's process to end", lambda: not any(
        run_id in " ".join(p) for p in _cmdlines()), timeout=20)
    assert c.json("run", "status", run_id)["status"] == "RUNNING"

    filler.unlink()
    wait_for("/healthz OK again", lambda: httpx.get(c.url + "/healthz", timeout=5).status_code == 200, timeout=20)
    run = wait_for("the run to settle", lambda: (x := c.json("run", "status", run_id))["status"] != "RUNNING" and x,
                   timeout=30)
    assert run["status"] == "FAILED" and run["exit_code"] == 3, run  # its real outcome, not LOST
    assert c.logs(run_id)[0] == ["before", "after"]
    again = c.fedml("launch", str(write_job(tmp_path / "c", "echo works again")))
    assert again.returncode == 0 and again.stdout.strip() == "works again", (again.stdout, again.stderr)
    # no run was half-created by the refused launch
    assert len(json.loads(c.fedml("run", "list", "--json").stdout)) == 2


def _cmdlines() -> list[list[str]]:
    import psutil

    out = []
    for p in psutil.process_iter(["environ"]):
        try:
            out.append([f"{k}={v}" for k, v in (p.info["environ"] or {}).items() if k == "FEDML_CURRENT_RUN_ID"])
        except psutil.Error:
            continue
    return out
