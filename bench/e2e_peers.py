"""End to end, side by side in one run: N trivial jobs through fedml, Slurm and Ray Jobs on this machine.

For each system, N jobs (`date +%s.%N > DIR/i`: the job notes when it started) are submitted back to back from
one process through the system's own submission path, then its status is polled every 50 ms until every job
is done:

- fedml: a scheduler with its local agent (`python -m scheduler.server`, SQLite store, temporary home),
  POST /api/v1/runs over HTTP (what `fedml launch --detach` sends, without the CLI's start-up);
- Slurm: `sbatch --wrap` to a one-node slurm-wlm (bench/peers/slurm-up.sh: apt, batch_sched_delay=0);
- Ray: JobSubmissionClient.submit_job to `ray start --head` on loopback (bench/peers/ray-up.sh: PyPI, in its
  own venv outside the repo).

Per job: submit -> start (the job's own clock) and submit -> done (first poll that sees it finished);
medians, p90, and the makespan (first submit -> last done). Ratios are fedml against each peer measured in the
same run. A peer that cannot be installed or started is reported as such; the others are still measured.
Slurm and Ray are peers for this comparison only, never dependencies of fedml.

    .venv/bin/python bench/e2e_peers.py [--jobs 200] [--skip slurm,ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, emit, percentile  # noqa: E402
from scheduler.contract.transport import httpx  # noqa: E402

POLL = 0.05


def job_cmd(out: Path, i: int) -> str:
    return f"date +%s.%N > {out}/{i}"


def summarize(name: str, submitted: dict[int, float], done: dict[int, float], out: Path,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    starts = {}
    for i in submitted:
        try:
            starts[i] = float((out / str(i)).read_text().strip())
        except (OSError, ValueError):
            pass
    to_start = [starts[i] - submitted[i] for i in starts]
    to_done = [done[i] - submitted[i] for i in done if i in submitted]
    first = min(submitted.values())
    return {"system": name, "jobs": len(submitted), "started": len(starts), "done": len(done),
            "submit_s": round(max(submitted.values()) - first, 3),
            "to_start_median_s": round(statistics.median(to_start), 3) if to_start else None,
            "to_start_p90_s": round(percentile(to_start, 90), 3) if to_start else None,
            "to_done_median_s": round(statistics.median(to_done), 3) if to_done else None,
            "to_done_p90_s": round(percentile(to_done, 90), 3) if to_done else None,
            "makespan_s": round(max(done.values()) - first, 3) if done else None, **(extra or {})}


class Polling:
    """Calls `poll` every POLL seconds in a thread from entry (before the first submit) until `finished()`
    (or 20 minutes); leaving the block waits for that."""

    def __init__(self, poll: Any, finished: Any) -> None:
        import threading

        self.poll, self.finished = poll, finished
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        deadline = time.monotonic() + 1200
        while not self.finished() and time.monotonic() < deadline:
            self.poll()
            time.sleep(POLL)

    def __enter__(self) -> Polling:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


# ---- fedml -------------------------------------------------------------------------------------------------

def run_fedml(n: int, work: Path) -> dict[str, Any]:
    home, out = work / "fedml-home", work / "fedml-out"
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    env["FEDML_HOME"] = str(home)
    log = open(work / "fedml-scheduler.log", "wb")  # noqa: SIM115 - closed below
    # Jobs run as the user running the bench, as Slurm's and Ray's do here (as root the agent would run them as
    # fedml-job, which may not write into this bench's private temporary directory: every run failed).
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--port", "0", "--quiet",
                             "--run-as", "self"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        state, token_file = home / "local" / "scheduler.json", home / "local" / "token"
        deadline = time.monotonic() + 60
        while True:
            try:
                url = json.loads(state.read_text())["url"]
                break
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("fedml scheduler did not start") from None
                time.sleep(0.05)
        http = httpx.Client(base_url=url + "/api/v1", timeout=60,
                            headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        while not [x for x in http.get("/nodes").json() if x["state"] == "ONLINE"]:  # the local agent
            if time.monotonic() > deadline:
                raise RuntimeError("fedml local agent did not join")
            time.sleep(0.05)
        http.post("/runs", json={"job": {"job": "true"}, "name": "warm-up"})
        submitted: dict[int, float] = {}
        ids: dict[str, int] = {}
        done: dict[int, float] = {}
        poller = httpx.Client(base_url=url + "/api/v1", timeout=60, headers=http.headers)

        def poll() -> None:
            for run in poller.get("/runs", params={"limit": 100_000}).json():
                i = ids.get(run["id"])
                if i is not None and i not in done and run["status"] in ("FINISHED", "FAILED", "KILLED"):
                    done[i] = time.time()

        with Polling(poll, lambda: len(done) >= n):
            for i in range(n):
                submitted[i] = time.time()
                r = http.post("/runs", json={"job": {"job": job_cmd(out, i)}, "name": f"peer-{i}"})
                r.raise_for_status()
                ids[r.json()["id"]] = i
        poller.close()
        runs = {r["id"]: r for r in http.get("/runs", params={"limit": 100_000}).json() if r["id"] in ids}
        failed = sum(r["status"] != "FINISHED" for r in runs.values())
        http.close()
        return summarize("fedml", submitted, done, out, {"failed": failed})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---- Slurm -------------------------------------------------------------------------------------------------

def run_slurm(n: int, work: Path) -> dict[str, Any]:
    out = work / "slurm-out"
    out.mkdir(parents=True)
    subprocess.run(["sbatch", "--wrap", "true", "-o", "/dev/null", "-J", "warm-up"], check=True,
                   capture_output=True, timeout=60)
    submitted: dict[int, float] = {}
    ids: dict[str, int] = {}
    done: dict[int, float] = {}
    failed = [0]

    def poll() -> None:
        r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
        now = time.time()
        for line in r.stdout.splitlines():
            jid, _, state = line.strip().partition(" ")
            i = ids.get(jid)
            if i is not None and i not in done and state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                               "NODE_FAIL", "OUT_OF_MEMORY"):
                done[i] = now
                failed[0] += state != "COMPLETED"

    with Polling(poll, lambda: len(done) >= n):
        for i in range(n):
            submitted[i] = time.time()
            r = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "-J", f"peer-{i}", "--wrap",
                                job_cmd(out, i)], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"sbatch: {r.stderr.strip()}")
            ids[r.stdout.strip().split(";")[0]] = i
    return summarize("slurm", submitted, done, out, {"failed": failed[0]})


def slurm_up() -> str | None:
    """None when Slurm answers, else why not."""
    if os.geteuid() != 0:
        return "setting up slurm-wlm needs root"
    r = subprocess.run(["bash", str(REPO / "bench" / "peers" / "slurm-up.sh")], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        return f"bench/peers/slurm-up.sh failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


# ---- Ray ---------------------------------------------------------------------------------------------------

RAY_DRIVER = r"""
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
n, out = int(sys.argv[1]), sys.argv[2]
c = JobSubmissionClient("http://127.0.0.1:8265")
w = c.submit_job(entrypoint="true")
while c.get_job_status(w) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(0.05)
import threading
submitted, ids, done, failed = {}, {}, {}, [0]
terminal = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
poller = JobSubmissionClient("http://127.0.0.1:8265")
def poll():
    deadline = time.monotonic() + 1200
    while len(done) < n and time.monotonic() < deadline:
        now = time.time()
        for job in poller.list_jobs():
            i = ids.get(job.submission_id)
            if i is not None and i not in done and job.status in terminal:
                done[i] = now
                failed[0] += job.status != JobStatus.SUCCEEDED
        time.sleep(0.05)
t = threading.Thread(target=poll)
t.start()
for i in range(n):
    submitted[i] = time.time()
    ids[c.submit_job(entrypoint=f"date +%s.%N > {out}/{i}")] = i
t.join()
print(json.dumps({"submitted": submitted, "done": done, "failed": failed[0]}))
"""


def ray_up() -> tuple[str | None, str]:
    """(None, the Ray venv's python) when Ray answers, else (why not, "")."""
    r = subprocess.run(["bash", str(REPO / "bench" / "peers" / "ray-up.sh")], capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        return f"bench/peers/ray-up.sh failed: {(r.stderr or r.stdout).strip()[-300:]}", ""
    return None, r.stdout.strip().splitlines()[-1]


def run_ray(n: int, work: Path, python: str) -> dict[str, Any]:
    out = work / "ray-out"
    out.mkdir(parents=True)
    r = subprocess.run([python, "-c", RAY_DRIVER, str(n), str(out)], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"ray driver: {r.stderr.strip()[-500:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # The head (raylet, GCS, dashboard) keeps using CPU while idle: stop it, it is only here for this.
    subprocess.run([str(Path(python).parent / "ray"), "stop"], capture_output=True, timeout=120)
    submitted = {int(k): v for k, v in got["submitted"].items()}
    done = {int(k): v for k, v in got["done"].items()}
    return summarize("ray", submitted, done, out, {"failed": got["failed"]})


# ---- main --------------------------------------------------------------------------------------------------

def show(r: dict[str, Any]) -> None:
    print(f"{r['system']:>6}: {r['done']}/{r['jobs']} done ({r.get('failed', 0)} failed); submit {r['submit_s']:.2f} s; "
          f"submit->start median {r['to_start_median_s']} s p90 {r['to_start_p90_s']} s; submit->done median "
          f"{r['to_done_median_s']} s p90 {r['to_done_p90_s']} s; makespan {r['makespan_s']} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--skip", default="", help="peers not to measure: slurm, ray")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="fedml-bench-peers-") as d:
        work = Path(d)
        results["fedml"] = run_fedml(args.jobs, work)
        show(results["fedml"])
        ok &= results["fedml"]["done"] == args.jobs and not results["fedml"]["failed"]
        if "slurm" not in skip:
            why = slurm_up() if shutil.which("bash") else "no bash"
            if why is None:
                try:
                    results["slurm"] = run_slurm(args.jobs, work)
                    show(results["slurm"])
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                unavailable["slurm"] = why
                print(f" slurm: not measured: {why}")
        if "ray" not in skip:
            why, python = ray_up()
            if why is None:
                try:
                    results["ray"] = run_ray(args.jobs, work, python)
                    show(results["ray"])
                except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                unavailable["ray"] = why
                print(f"   ray: not measured: {why}")
    f = results["fedml"]
    ratios: dict[str, dict[str, float | None]] = {}
    for peer in ("slurm", "ray"):
        if peer not in results:
            continue
        p = results[peer]

        def ratio(key: str, p: dict[str, Any] = p) -> float | None:
            return round(p[key] / f[key], 2) if p.get(key) and f.get(key) else None
        ratios[peer] = {k: ratio(k) for k in ("to_start_median_s", "to_done_median_s", "makespan_s")}
        r = ratios[peer]
        print(f"{peer} / fedml (how many times longer {peer} takes): submit->start {r['to_start_median_s']}x, "
              f"submit->done {r['to_done_median_s']}x, makespan {r['makespan_s']}x")
    emit("e2e_peers", {"jobs": args.jobs, "results": results, "ratios": ratios, "unavailable": unavailable})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
