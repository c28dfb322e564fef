"""Container start overhead: `fedml launch` of a containerized hello vs the same job on the process runtime.

    .venv/bin/python bench/container_start.py [--runs 10]

Needs a Docker Engine API: DOCKER_HOST, else the podman service of scripts/podman-up.sh (`make podman`).
One local scheduler + agent serves both series; launches alternate (process, container, process, ...) so that
load from anything else on the machine falls on both alike. The job is `echo hi` (the overhead, not a program's
own time) and the hello template's shell part; each launch is followed to its end and must exit 0. Reported:
medians, the ratio container/process and the difference, where the container's time goes by the scheduler's
timestamps, and the engine alone (create + start + wait + remove of `true` through the SDK, no fedml).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import FEDML, REPO, check_cli, diagnose, emit, median, summary, temp_home, timed

IMAGE = os.environ.get("FEDML_TEST_IMAGE", "localhost/fedml-busybox:latest")
SOCK = Path(os.environ.get("FEDML_PODMAN_DIR", "/tmp/fedml-podman")) / "podman.sock"


def find_engine() -> str | None:
    sys.path.insert(0, str(REPO))
    from runtime.engine import engine_answers

    for host in filter(None, (os.environ.get("DOCKER_HOST"), f"unix://{SOCK}")):
        if engine_answers(host):
            return host
    return None


def engine_alone(host: str, n: int) -> list[float]:
    import docker

    c = docker.DockerClient(base_url=host, version="1.41")
    out = []
    for _ in range(n):
        t = time.perf_counter()
        ct = c.containers.create(IMAGE, ["true"], network_mode="none")
        ct.start()
        ct.wait()
        ct.remove(force=True)
        out.append(time.perf_counter() - t)
    c.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    opts = ap.parse_args()
    check_cli()
    host = find_engine()
    if host is None:
        print(f"error: no Docker Engine API at DOCKER_HOST or {SOCK}: run `make podman` first", file=sys.stderr)
        emit("container_start", {"results": None, "all_pass": False})
        return 1
    results: dict[str, dict] = {}
    with temp_home("container") as (home, env):
        env.update({"DOCKER_HOST": host, "FEDML_DOCKER_NETWORK": "none"})
        jobs = {}
        for kind, extra in (("process", ""), ("container", f"containerize: true\ndocker:\n  image: {IMAGE}\n")):
            p = home / f"{kind}.yaml"
            p.write_text('bootstrap: echo "Bootstrap finished."\njob: |\n  echo hi\n  echo "run $FEDML_CURRENT_RUN_ID"\n'
                         + extra)
            jobs[kind] = p
        # Warm-up: starts the scheduler and agent, and makes the engine load the image once.
        for kind, p in jobs.items():
            t, code = timed([str(FEDML), "launch", str(p), "--name", f"warmup-{kind}"], env, timeout=120)
            print(f"warm-up {kind}: {t:.3f} s, exit {code}")
            if code != 0:
                diagnose(home, env)
                emit("container_start", {"results": None, "all_pass": False})
                return 1
        times: dict[str, list[float]] = {"process": [], "container": []}
        for i in range(opts.runs):
            for kind, p in jobs.items():
                t, code = timed([str(FEDML), "launch", str(p), "--name", f"bench-{kind}-{i}"], env, timeout=60)
                if code != 0:
                    print(f"error: {kind} launch {i}: exit {code}")
                    diagnose(home, env)
                    emit("container_start", {"results": None, "all_pass": False})
                    return 1
                times[kind].append(t)
        for kind in times:
            results[kind] = summary(times[kind])
        r = subprocess.run([str(FEDML), "run", "list", "--json", "--limit", "1000"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=30)
        runs = json.loads(r.stdout)
        for kind in times:
            mine = [x for x in runs if str(x.get("name", "")).startswith(f"bench-{kind}-") and x.get("ended_at")]
            results[kind]["created_to_started_median_s"] = round(median(
                [x["started_at"] - x["created_at"] for x in mine]), 4)
            results[kind]["started_to_ended_median_s"] = round(median(
                [x["ended_at"] - x["started_at"] for x in mine]), 4)
    alone = engine_alone(host, opts.runs)
    results["engine_alone"] = summary(alone)
    p, c = results["process"]["median_s"], results["container"]["median_s"]
    ratio = c / p
    results["ratio_container_over_process"] = round(ratio, 3)
    results["overhead_s"] = round(c - p, 4)
    for kind in ("process", "container"):
        s = results[kind]
        print(f"fedml launch, {kind} runtime: median {s['median_s']:.3f} s, p90 {s['p90_s']:.3f} s over {s['n']} "
              f"(scheduler: created -> started {s['created_to_started_median_s']:.3f} s, "
              f"started -> ended {s['started_to_ended_median_s']:.3f} s)")
    print(f"container / process: {ratio:.2f}x, +{c - p:.3f} s per launch")
    print(f"engine alone (create + start + wait + remove of `true`, no fedml): median {median(alone):.3f} s")
    emit("container_start", {"engine": host, "image": IMAGE, "results": results, "all_pass": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
