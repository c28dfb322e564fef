"""Launch latency with a warm local scheduler: wall time of `fedml launch JOB.yaml` from start to exit.

    .venv/bin/python bench/launch_latency.py [--runs 15]

One warm-up launch auto-starts the local scheduler (its time is reported separately), then N launches of
job_templates/hello/job.yaml and N of a trivial job (`job: echo hi`, no workspace), each followed to the end
(the default: the CLI streams the logs and exits with the job's exit code). All exit codes must be 0.
The trivial job separates our overhead from the hello program's own runtime (it sleeps between its lines), which is
also measured directly (bootstrap + job under `bash -e` in the workspace, no fedml). For the
trivial runs we also split the time using the run's own timestamps (created -> started -> ended), and time
`fedml launch --dry-run` (CLI start-up + YAML validation, no scheduler) as the client-side floor.
Target: hello median <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import (
    FEDML,
    REPO,
    TIMEOUT,
    Home,
    check_cli,
    diagnose,
    emit,
    median,
    summary,
    temp_home,
    timed,
    verdict,
)

TARGET_S = 0.5
HELLO = REPO / "job_templates" / "hello" / "job.yaml"


PER_LAUNCH_TIMEOUT_S = 20.0


def run_id_named(name: str, env: dict[str, str]) -> str | None:
    r = subprocess.run([str(FEDML), "run", "list", "--json", "--limit", "1000"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    try:
        return next((x["id"] for x in json.loads(r.stdout) if x.get("name") == name), None)
    except ValueError:
        return None


def launches(job: str, n: int, home: Home, env: dict[str, str], name: str) -> tuple[list[float], list[int]]:
    """n launches, each followed to its end. Stops at the first failure or hang (and says why)."""
    times, codes = [], []
    for i in range(n):
        t, code = timed([str(FEDML), "launch", job, "--name", f"{name}-{i}"], env, timeout=PER_LAUNCH_TIMEOUT_S)
        times.append(t)
        codes.append(code)
        if code != 0:
            what = f"still running after {PER_LAUNCH_TIMEOUT_S:.0f} s (killed)" if code == TIMEOUT else f"exit {code}"
            print(f"error: launch {name}-{i}: {what}; stopping this series")
            diagnose(home, env, run_id_named(f"{name}-{i}", env))
            break
    return times, codes


def hello_own_runtime(n: int, env: dict[str, str]) -> list[float]:
    """The hello job's bootstrap + job run directly under `bash -e` in its workspace: no fedml at all."""
    import yaml  # pyyaml is a dependency of the project, so it is in the venv

    doc = yaml.safe_load(HELLO.read_text())
    script = f"{doc.get('bootstrap') or ''}\n{doc['job']}"
    cwd = HELLO.parent / doc.get("workspace", ".")
    env = env | {"FEDML_CURRENT_RUN_ID": "direct", "FEDML_CURRENT_EDGE_ID": "direct"}
    return [timed(["bash", "-e", "-c", script], env, cwd=cwd)[0] for _ in range(n)]


def detach_compare(rev: str, n: int) -> int:
    """`fedml launch trivial.yaml --detach` (submit, print the id, exit) against a warm local scheduler, this tree
    and REV's taking turns (A B A B), each with its own home and scheduler; REV runs from a worktree through
    PYTHONPATH (CLI and the scheduler it starts), byte-compiled like an install."""
    from _common import worktree

    results: dict[str, list[float]] = {"now": [], rev: []}
    with worktree(rev) as tree, temp_home("detach-now") as (_, env_now), temp_home("detach-rev") as (_, env_rev):
        assert tree is not None
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "fedml_cli"), str(tree / "scheduler"),
                        str(tree / "agents"), str(tree / "runtime")], check=True)
        env_rev = env_rev | {"PYTHONPATH": str(tree)}
        job = Path(env_now["FEDML_HOME"]) / "trivial.yaml"
        job.write_text("job: echo hi\n")
        # REV's commands run from its tree: `python -m scheduler.server` (started by the CLI) finds the package
        # of its working directory first.
        cwd = {id(env_now): REPO, id(env_rev): tree}
        for env in (env_now, env_rev):  # warm-up: starts each local scheduler
            t, code = timed([str(FEDML), "launch", str(job), "--detach"], env, timeout=60, cwd=cwd[id(env)])
            if code != 0:
                print(f"error: warm-up launch exit {code}", file=sys.stderr)
                return 1
        for _ in range(n):
            for name, env in (("now", env_now), (rev, env_rev)):
                t, code = timed([str(FEDML), "launch", str(job), "--detach"], env, timeout=PER_LAUNCH_TIMEOUT_S,
                                cwd=cwd[id(env)])
                if code != 0:
                    print(f"error: {name}: launch --detach exit {code}", file=sys.stderr)
                    return 1
                results[name].append(t)
    floor = [timed([sys.executable, "-c", "pass"], env_now)[0] for _ in range(n)]
    now, old = median(results["now"]), median(results[rev])
    print(f"fedml launch --detach trivial, {n} each, interleaved: {rev} median {old:.3f} s, now {now:.3f} s "
          f"({now / old:.2f}x); python -c pass {median(floor):.3f} s; target <= 0.25 s: {verdict(now, 0.25)}")
    emit("launch_detach", {"rev": rev, "now": summary(results["now"]), "before": summary(results[rev]),
                           "ratio": round(now / old, 3), "python_floor": summary(floor)})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--compare", metavar="REV", help="also time `launch --detach` of git revision REV (a worktree), "
                                                    "interleaved with this tree's")
    opts = ap.parse_args()
    check_cli()
    if opts.compare:
        return detach_compare(opts.compare, opts.runs)
    results: dict[str, dict] = {}
    with temp_home("launch") as (home, env):
        trivial = home / "trivial.yaml"
        trivial.write_text("job: echo hi\n")

        # Warm-up: this one starts the local scheduler and its agent.
        t, code = timed([str(FEDML), "launch", str(HELLO), "--name", "warmup"], env, timeout=60)
        print(f"first launch (starts the local scheduler + agent): {t:.3f} s, exit {code}")
        results["first_launch"] = {"seconds": round(t, 4), "exit_code": code}
        if code != 0:
            print("error: the warm-up launch failed; not measuring", file=sys.stderr)
            diagnose(home, env, run_id_named("warmup", env))
            emit("launch_latency", {"results": results, "all_pass": False})
            return 1

        failed = False
        for label, job, name in (("hello", str(HELLO), "bench-hello"), ("trivial", str(trivial), "bench-trivial")):
            if failed:
                print(f"fedml launch {label}: not measured (the previous series failed)")
                results[label] = {"n": 0, "exit_codes": [], "all_zero": False, "skipped": True}
                continue
            times, codes = launches(job, opts.runs, home, env, name)
            s = summary(times)
            entry = {**s, "exit_codes": codes, "all_zero": len(codes) == opts.runs and all(c == 0 for c in codes)}
            line = (f"fedml launch {label}: median {s['median_s']:.3f} s, p90 {s['p90_s']:.3f} s, "
                    f"min {s['min_s']:.3f} s over {len(times)} launches; exit codes all 0: {entry['all_zero']}")
            if label == "hello":
                entry["target_s"] = TARGET_S
                entry["verdict"] = verdict(s["median_s"], TARGET_S) if entry["all_zero"] else "MISS"
                line += f"; target <= {TARGET_S:.2f} s: {entry['verdict']}"
            print(line)
            results[label] = entry
            failed = not entry["all_zero"]

        direct = hello_own_runtime(5, env)
        results["hello_direct"] = summary(direct)
        line = f"hello's bootstrap + job run directly with bash (no fedml): median {median(direct):.3f} s"
        if results["hello"]["all_zero"]:
            over = results["hello"]["median_s"] - median(direct)
            results["hello"]["overhead_vs_direct_s"] = round(over, 4)
            line += f"; so fedml's overhead on hello is about {over:.3f} s"
        print(line)

        # Where the time goes, for the trivial job: the client-side floor and the scheduler's own timestamps.
        dry = [timed([str(FEDML), "launch", "--dry-run", str(trivial)], env)[0] for _ in range(opts.runs)]
        results["dry_run"] = summary(dry)
        print(f"fedml launch --dry-run trivial (CLI start-up + validation, no scheduler): "
              f"median {median(dry):.3f} s")
        r = subprocess.run([str(FEDML), "run", "list", "--json", "--limit", "1000"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=30)
        try:
            runs = [x for x in json.loads(r.stdout) if str(x.get("name", "")).startswith("bench-trivial-")]
        except ValueError:
            runs = []
        queue = [x["started_at"] - x["created_at"] for x in runs if x.get("started_at")]
        run = [x["ended_at"] - x["started_at"] for x in runs if x.get("started_at") and x.get("ended_at")]
        if queue and run:
            split = {"created_to_started_median_s": round(median(queue), 4),
                     "started_to_ended_median_s": round(median(run), 4)}
            results["trivial"]["server_split"] = split
            print(f"trivial, scheduler timestamps: created -> started median "
                  f"{split['created_to_started_median_s']:.3f} s, "
                  f"started -> ended median {split['started_to_ended_median_s']:.3f} s")
        if results["trivial"]["all_zero"]:
            rest = results["trivial"]["median_s"] - median(dry)
            print(f"trivial: launch median minus dry-run median (submit + dispatch + run + log follow) = {rest:.3f} s")
    works = all(results[k]["all_zero"] for k in ("hello", "trivial"))
    ok = works and results["hello"]["verdict"] == "PASS"
    emit("launch_latency", {"results": results, "all_pass": ok})
    return 0 if works else 1  # a missed target is a figure; a failed or hung launch is an error


if __name__ == "__main__":
    sys.exit(main())
