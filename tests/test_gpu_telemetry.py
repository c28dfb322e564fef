"""GPU truth (agents/telemetry.py): the agent's NVML samples reach the scheduler with its polls; a GPU used by a
process that belongs to no run is marked on the node and not offered to runs until it is free; the samples show
in `fedml node list` and GET /metrics. There is no GPU in CI: these tests drive agents/nvml_double.py, a documented
test double of NVML whose state (GPUs, utilisation, processes) they write, with a real scheduler, agent and jobs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .conftest import Fedml, write_job
from .procs import wait_for


class Gpus:
    """The double's state file: two A100s; each GPU's compute processes are what a test puts there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pids: dict[int, list[int]] = {0: [], 1: []}
        self.util: dict[int, int] = {}  # (default: 40 % with a process on it, else 0)
        self.extra: dict[int, dict[str, Any]] = {}  # more of the double's fields: ecc_uncorrected, xid
        self.write()

    def write(self) -> None:
        gpus = [{"name": "NVIDIA A100 80GB PCIe", "memory_total_mb": 81920, "memory_used_mb": 2048 * len(p),
                 "utilization": self.util.get(i, 40 if p else 0), "power_w": 60.0, "temperature_c": 40, "pids": p,
                 **self.extra.get(i, {})} for i, p in sorted(self.pids.items())]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": gpus}))
        tmp.replace(self.path)


def node(fedml: Fedml) -> dict[str, Any]:
    nodes = json.loads(fedml("node", "list", "--json").stdout)
    assert len(nodes) == 1, nodes
    return nodes[0]


def status(fedml: Fedml, run_id: str) -> dict[str, Any]:
    return json.loads(fedml("run", "status", run_id, "--json").stdout)


def test_a_gpu_used_outside_the_scheduler_is_not_given_to_runs_until_it_is_free(fedml: Fedml, tmp_path: Path) -> None:
    gpus = Gpus(tmp_path / "nvml.json")
    env = {"FEDML_NVML_DOUBLE": str(gpus.path), "FEDML_GPU_SAMPLE_S": "0.2", "FEDML_HEARTBEAT_INTERVAL": "1"}
    one_gpu = "computing:\n  minimum_num_gpus: 1\n"
    pidfile = tmp_path / "job.pid"
    job = write_job(tmp_path / "a", f"echo $$ > {pidfile}\nexec sleep 60", extra=one_gpu)
    first = fedml("launch", str(job), "--detach", env=env)  # (starts the scheduler and its agent with the double)
    assert first.returncode == 0, first.stderr
    run_a = first.stdout.strip()
    # (--detach returns once the run is stored; the local agent it started may not have joined yet)
    joined = wait_for("the local agent's node", lambda: json.loads(fedml("node", "list", "--json").stdout))
    assert [g["name"] for g in joined[0]["gpus"]] == ["NVIDIA A100 80GB PCIe"] * 2  # the double's inventory
    pid = int(wait_for("the job's pid", lambda: pidfile.exists() and pidfile.read_text().strip()))
    held = status(fedml, run_a)["gpus"][0]
    gpus.pids[held] = [pid]  # the job's own process on its GPU: that is the run's, nothing is marked
    orphan = subprocess.Popen(["sleep", "60"])  # a process of no run (no FEDML_CURRENT_RUN_ID)
    try:
        gpus.pids[1 - held] = [orphan.pid]
        gpus.write()
        n = wait_for("the other GPU marked busy outside the scheduler",
                     lambda: (m := node(fedml))["gpus_busy_outside"] == [1 - held] and m, timeout=30)
        assert {s["index"]: s["pids"] for s in n["gpu_samples"]} == {held: [pid], 1 - held: [orphan.pid]}
        assert [s["outside"] for s in sorted(n["gpu_samples"], key=lambda s: s["index"])][held] == []
        assert n["gpus_free"] == []
        assert "busy outside the scheduler" in " ".join(fedml("node", "list").stdout.split())
        second = fedml("launch", str(write_job(tmp_path / "b", "echo second", extra=one_gpu)), "--detach")
        run_b = second.stdout.strip()
        r = wait_for("the second run waiting", lambda: (s := status(fedml, run_b))["reason"] and s)
        assert r["status"] == "QUEUED" and "no node with 1 free GPU" in r["reason"], r
    finally:
        orphan.kill()
        orphan.wait()
    gpus.pids[1 - held] = []
    gpus.write()
    wait_for("the GPU free again, and the waiting run placed on it",
             lambda: status(fedml, run_b)["status"] in ("STARTING", "RUNNING", "FINISHED"), timeout=30)
    assert status(fedml, run_b)["gpus"] == [1 - held]
    assert node(fedml)["gpus_busy_outside"] == []
    fedml("run", "stop", run_a)


def test_gpu_samples_are_in_the_metrics(fedml: Fedml, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from scheduler.contract.transport import httpx

    gpus = Gpus(tmp_path / "nvml.json")
    gpus.pids[0] = [999_999]  # (no such process: it belongs to no run)
    gpus.extra[1] = {"ecc_uncorrected": 2, "xid": [79, 48]}  # errors on the other GPU: counted once each
    gpus.write()
    env = {"FEDML_NVML_DOUBLE": str(gpus.path), "FEDML_GPU_SAMPLE_S": "0.2", "FEDML_HEARTBEAT_INTERVAL": "1"}
    assert fedml("run", "list", env=env).returncode == 0
    url = json.loads((fedml.home / "local" / "scheduler.json").read_text())["url"]
    admin = (fedml.home / "local" / "token").read_text().strip()

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {admin}"}).text
        m = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(text) for s in f.samples}
        return m if any(k[0] == "fedml_gpu_utilization_ratio" for k in m) else None

    # (the samples are shown from the first heartbeat that carries them; the GPU used outside runs once the node
    # is written with it, a moment later: a slow machine scraped in between)
    m = wait_for("per-GPU samples and the GPU used outside runs in /metrics", lambda: (x := scraped()) and x.get(
        ("fedml_gpus", (("state", "busy_outside"),))) == 1 and x, timeout=30)
    name = node(fedml)["name"]
    assert m[("fedml_gpu_utilization_ratio", (("gpu", "0"), ("node", name)))] == 0.4
    assert m[("fedml_gpu_memory_total_bytes", (("gpu", "1"), ("node", name)))] == 81920 * 1024 * 1024
    assert m[("fedml_gpu_processes", (("gpu", "0"), ("node", name), ("owner", "none")))] == 1
    assert m[("fedml_gpus", (("state", "busy_outside"),))] == 1
    assert m[("fedml_gpu_ecc_uncorrected", (("gpu", "1"), ("node", name)))] == 2
    m = wait_for("both XID errors counted", lambda: (x := scraped()) and x.get(
        ("fedml_gpu_xid_errors_total", (("gpu", "1"), ("node", name)))) == 2 and x, timeout=30)
    beats = m[("fedml_heartbeats_total", ())]  # several polls later (each with a sample): still counted once each
    later = wait_for("more polls", lambda: (x := scraped()) and x[("fedml_heartbeats_total", ())] >= beats + 5 and x,
                     timeout=30)
    assert later[("fedml_gpu_xid_errors_total", (("gpu", "1"), ("node", name)))] == 2


def test_gpu_series_are_kept_in_the_store_across_a_restart(fedml: Fedml, tmp_path: Path) -> None:
    """Each GPU's series and each run's are written to the store (every FEDML_SERIES_FLUSH_S; the default is a
    minute), so a restarted scheduler still shows them: GET /nodes/NODE/gpus and `fedml run metrics`."""
    from scheduler.contract.transport import httpx

    gpus = Gpus(tmp_path / "nvml.json")
    gpus.util = {0: 70, 1: 5}
    gpus.write()
    env = {"FEDML_NVML_DOUBLE": str(gpus.path), "FEDML_GPU_SAMPLE_S": "0.2", "FEDML_HEARTBEAT_INTERVAL": "1",
           "FEDML_SERIES_FLUSH_S": "0.5"}
    pidfile = tmp_path / "job.pid"
    job = write_job(tmp_path / "job", f"echo $$ > {pidfile}\nexec sleep 120",
                    extra="computing:\n  minimum_num_gpus: 1\n")
    r = fedml("launch", str(job), "--detach", env=env)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    pid = int(wait_for("the job's pid", lambda: pidfile.exists() and pidfile.read_text().strip()))
    gpus.pids[status(fedml, run_id)["gpus"][0]] = [pid]
    gpus.write()

    def gpu_points(name: str) -> dict[int, list[list[float]]]:
        local = json.loads((fedml.home / "local" / "scheduler.json").read_text())
        admin = (fedml.home / "local" / "token").read_text().strip()
        got = httpx.get(f"{local['url']}/api/v1/nodes/{name}/gpus", params={"since": 600},
                        headers={"authorization": f"Bearer {admin}"})
        assert got.status_code == 200, got.text
        return {g["index"]: g["points"] for g in got.json()["gpus"]}

    name = node(fedml)["name"]

    def two_points_each() -> dict[int, list[list[float]]] | None:  # (a point per 5 s at most)
        got = gpu_points(name)
        return got if all(len(p) >= 2 for p in got.values()) else None

    before = wait_for("two points of each GPU", two_points_each, timeout=30)
    assert [p[1] for p in before[0]][:2] == [70.0, 70.0] and before[1][0][1] == 5.0
    assert before[0][0][2] is not None and before[0][0][3] == 60.0  # memory used, power
    m = json.loads(fedml("run", "metrics", run_id, "--json").stdout)
    util = [s for s in m["series"] if s["name"] == "gpu/util_pct"]
    assert util and util[0]["points"], m
    fedml("run", "stop", run_id)
    wait_for("the run stopped", lambda: status(fedml, run_id)["status"] == "KILLED", timeout=60)
    fedml.stop()
    assert fedml("run", "list", env=env).returncode == 0  # a new scheduler process: nothing in its memory
    after = gpu_points(name)
    kept = [p for p in after[0] if p[0] <= before[0][-1][0]]
    assert kept[:len(before[0])] == before[0], (kept, before[0])  # the same points, read back from the store
    again = json.loads(fedml("run", "metrics", run_id, "--json").stdout)
    kept_util = [s for s in again["series"] if s["name"] == "gpu/util_pct"]
    assert kept_util and len(kept_util[0]["points"]) >= len(util[0]["points"]), again
    shown = fedml("node", "gpus", name, "--since", "10m")
    assert shown.returncode == 0 and "UTILISATION" in shown.stdout and "70%" in shown.stdout, shown
    assert json.loads(fedml("node", "gpus", name, "--json").stdout)["gpus"][0]["points"][0] == before[0][0]
    bad = fedml("node", "gpus", name, "--since", "9d")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --since: between 1s and 7d, got '9d'", bad


def test_an_idle_run_is_stopped_or_warned_about_by_its_utilization_policy(fedml: Fedml, tmp_path: Path) -> None:
    gpus = Gpus(tmp_path / "nvml.json")
    gpus.util = {0: 0, 1: 0}  # (its process sits on the GPU and does nothing)
    gpus.write()
    env = {"FEDML_NVML_DOUBLE": str(gpus.path), "FEDML_GPU_SAMPLE_S": "0.2", "FEDML_HEARTBEAT_INTERVAL": "1"}
    runs = {}
    for action in ("stop", "warn"):
        pidfile = tmp_path / f"{action}.pid"
        job = write_job(tmp_path / action, f"echo $$ > {pidfile}\nexec sleep 120", extra=(
            "computing:\n  minimum_num_gpus: 1\nutilization_policy:\n  min_gpu_utilization: 10\n"
            f"  time_window: 10s\n  action: {action}\n"))
        r = fedml("launch", str(job), "--detach", env=env)
        assert r.returncode == 0, r.stderr
        runs[action] = r.stdout.strip()
        pid = int(wait_for("the job's pid", lambda p=pidfile: p.exists() and p.read_text().strip()))
        gpus.pids[status(fedml, runs[action])["gpus"][0]] = [pid]
        gpus.write()
    stopped = wait_for("the idle run stopped by its policy",
                       lambda: (s := status(fedml, runs["stop"]))["status"] == "KILLED" and s, timeout=60)
    assert "GPU utilisation below 10% for 10s" in stopped["reason"], stopped
    said = fedml("logs", runs["stop"])  # (the scheduler's own lines go to standard error)
    assert "── stopping: GPU utilisation below 10% for 10s" in said.stderr, said
    warned = wait_for("a warning in the other run's log",
                      lambda: "── warning: GPU utilisation below 10%" in fedml("logs", runs["warn"]).stderr, timeout=30)
    assert warned and status(fedml, runs["warn"])["status"] == "RUNNING"
    m = json.loads(fedml("run", "metrics", runs["warn"], "--json").stdout)  # its GPU, sampled, in its metrics
    util = next(s for s in m["series"] if s["name"] == "gpu/util_pct")
    assert util["points"] and util["last"] == 0.0
    fedml("run", "stop", runs["warn"])



def test_orphans_of_ended_runs_are_reclaimed_and_a_gpu_used_without_being_given_is_flagged(
        fedml: Fedml, tmp_path: Path) -> None:
    """An agent with --reclaim-orphans (FEDML_RECLAIM_ORPHANS) kills what an ended run of its own left on a GPU
    (here a process that left the run's session and its cleanup, as stray dataloader workers do); a run whose
    process sits on a GPU it was not given gets a warning in its log and status."""
    import psutil

    gpus = Gpus(tmp_path / "nvml.json")
    env = {"FEDML_NVML_DOUBLE": str(gpus.path), "FEDML_GPU_SAMPLE_S": "0.2", "FEDML_HEARTBEAT_INTERVAL": "1",
           "FEDML_RECLAIM_ORPHANS": "1"}
    one_gpu = "computing:\n  minimum_num_gpus: 1\n"
    orphan_file, pidfile = tmp_path / "orphan.pid", tmp_path / "job.pid"
    leaver = write_job(tmp_path / "leaver", f"env -u FEDML_RUN_DIR setsid sleep 300 > /dev/null 2>&1 < /dev/null &\n"
                       f"echo $! > {orphan_file}", extra=one_gpu)
    r = fedml("launch", str(leaver), env=env)
    assert r.returncode == 0, r.stderr
    orphan = int(orphan_file.read_text())
    assert psutil.pid_exists(orphan)  # it outlived its run
    gpus.pids[0] = [orphan]
    gpus.write()
    wait_for("the orphan killed by the agent", lambda: not psutil.pid_exists(orphan) or
             psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, timeout=30)
    gpus.pids[0] = []
    gpus.write()

    job = write_job(tmp_path / "greedy", f"echo $$ > {pidfile}\nexec sleep 60", extra=one_gpu)
    greedy = fedml("launch", str(job), "--detach", env=env).stdout.strip()
    pid = int(wait_for("the job's pid", lambda: pidfile.exists() and pidfile.read_text().strip()))
    given = status(fedml, greedy)["gpus"][0]
    gpus.pids = {given: [pid], 1 - given: [pid]}  # it also uses the GPU it was not given
    gpus.write()
    warned = wait_for("the run flagged", lambda: (s := status(fedml, greedy))["warnings"] and s, timeout=30)
    assert f"uses GPU {1 - given} of node" in warned["warnings"][-1] and "not given" in warned["warnings"][-1]
    assert f"uses GPU {1 - given}" in fedml("logs", greedy).stderr
    assert node(fedml)["gpus_busy_outside"] == []  # (its own run's process: not a stranger)
    fedml("run", "stop", greedy)


def test_a_gpu_reading_past_the_contracts_bounds_is_left_out_of_the_sample(tmp_path: Path, monkeypatch: Any) -> None:
    """A node's sample is bounded when it comes (422 past GPU_SAMPLE_BOUNDS): the agent leaves out a reading
    past them (a driver's "not available" sentinel, say) instead of sending a poll that would be refused."""
    import pydantic
    import pytest

    from agents.telemetry import Sampler
    from scheduler.contract.models import GpuSample

    double = tmp_path / "nvml.json"
    double.write_text(json.dumps({"gpus": [
        {"name": "NVIDIA A100 80GB PCIe", "memory_total_mb": 81920, "memory_used_mb": 1024, "utilization": 35,
         "power_w": 1e12, "temperature_c": 4294967295, "ecc_uncorrected": 2**60, "xid": [79, -5]}]}))
    monkeypatch.setenv("FEDML_NVML_DOUBLE", str(double))
    got = Sampler().sample({})
    assert got is not None and len(got) == 1
    g = got[0]
    assert (g.util, g.mem_used_mb, g.mem_total_mb) == (35, 1024, 81920)  # what is in bounds is kept
    assert (g.power_w, g.temp_c, g.ecc_uncorrected, g.xid) == (None, None, None, [79])
    for bad in ({"power_w": float("inf")}, {"temp_c": 10**30}, {"mem_used_mb": 10**40}, {"xid": [-1]},
                {"ecc_uncorrected": 2**64}):
        with pytest.raises(pydantic.ValidationError):
            GpuSample(index=0, **bad)  # (what the scheduler answers 422 to)
