"""Log throughput: a job printing 200,000 lines, followed to the end and read back after it finished.

    .venv/bin/python bench/log_throughput.py [--lines 200000]

The local scheduler is started first with a trivial launch (not timed). Then the job is submitted with
`fedml launch --detach` and followed with `fedml logs -f RUN_ID`, stdout to a file (not a terminal); the clock runs
from the start of the launch to the exit of `fedml logs -f` (end to end: submit, dispatch, run, ship every line
to the scheduler, stream every line to the client). Then `fedml logs RUN_ID` reads the finished run's log into
another file. Both files must hold exactly "line 0" .. "line N-1", in order; we report lines/s for each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import FEDML, REPO, TIMEOUT, check_cli, diagnose, emit, temp_home, timed

FOLLOW_TIMEOUT_S = 60.0


def verify(path, n: int) -> tuple[bool, str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        got = f.read().split("\n")
    if got and got[-1] == "":
        got.pop()
    if len(got) != n:
        return False, f"{len(got)} lines, expected {n}"
    for i, line in enumerate(got):
        if line != f"line {i}":
            return False, f"line {i + 1} is {line!r}, expected 'line {i}'"
    return True, f"{n} lines, line 0 .. line {n - 1} in order"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    opts = ap.parse_args()
    check_cli()
    n = opts.lines
    results: dict = {"lines": n}
    ok = True
    with temp_home("logs") as (home, env):
        (home / "warm.yaml").write_text("job: echo warm\n")
        (home / "big.yaml").write_text(
            "job: |\n"
            f"  python3 -c \"import sys; [print(f'line {{i}}') for i in range({n})]\"\n")
        t, code = timed([str(FEDML), "launch", str(home / "warm.yaml")], env, timeout=60)
        print(f"warm-up launch (starts the local scheduler): {t:.3f} s, exit {code}")
        if code != 0:
            print("error: the warm-up launch failed; not measuring", file=sys.stderr)
            diagnose(home, env)
            emit("log_throughput", {"results": results, "all_pass": False})
            return 1

        t0 = time.perf_counter()
        sub = subprocess.run([str(FEDML), "launch", "--detach", str(home / "big.yaml")], env=env, cwd=REPO,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        t_submit = time.perf_counter() - t0
        run_id = sub.stdout.strip()
        if sub.returncode != 0 or not run_id:
            print(f"error: launch --detach failed (exit {sub.returncode}): {sub.stderr.strip()}", file=sys.stderr)
            diagnose(home, env)
            emit("log_throughput", {"results": results, "all_pass": False})
            return 1
        follow_out, follow_err = home / "follow.out", home / "follow.err"
        with open(follow_out, "wb") as out, open(follow_err, "wb") as err:
            t_follow, code_follow = timed([str(FEDML), "logs", "-f", run_id], env, stdout=out, stderr=err,
                                          timeout=FOLLOW_TIMEOUT_S)
        t_e2e = time.perf_counter() - t0
        good, why = verify(follow_out, n)
        ok = ok and good and code_follow == 0
        if code_follow == TIMEOUT:
            why += f"; `fedml logs -f` still running after {FOLLOW_TIMEOUT_S:.0f} s (killed)"
        if not (good and code_follow == 0):
            said = follow_err.read_text(errors="replace").strip()
            print(f"# fedml logs -f stderr: {said[-600:]}")
            diagnose(home, env, run_id)
        print(f"run {run_id}: launch --detach took {t_submit:.3f} s; `fedml logs -f` ran {t_follow:.3f} s, exit "
              f"{code_follow}; output {'OK' if good else 'WRONG'}: {why}")
        print(f"end to end (launch start -> last line, logs -f exit): {t_e2e:.3f} s = {n / t_e2e:,.0f} lines/s")
        results["end_to_end"] = {"seconds": round(t_e2e, 4), "lines_per_s": round(n / t_e2e), "verified": good,
                                 "check": why, "exit_code": code_follow, "submit_s": round(t_submit, 4),
                                 "follow_s": round(t_follow, 4)}

        st = subprocess.run([str(FEDML), "run", "status", "--json", run_id], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
        try:
            run = json.loads(st.stdout)
            job_s = run["ended_at"] - run["started_at"]
            results["run"] = {"status": run["status"], "exit_code": run.get("exit_code"),
                              "log_count": run.get("log_count"), "started_to_ended_s": round(job_s, 4)}
            print(f"scheduler: run {run['status']}, exit {run.get('exit_code')}, {run.get('log_count')} log lines "
                  f"stored; started -> ended {job_s:.3f} s")
            ok = ok and run["status"] == "FINISHED" and run.get("log_count") == n
        except (ValueError, KeyError, TypeError):
            print(f"warning: could not read the run's status: {st.stderr.strip()}")

        read_out = home / "read.out"
        with open(read_out, "wb") as out:
            t_read, code_read = timed([str(FEDML), "logs", run_id], env, stdout=out, timeout=FOLLOW_TIMEOUT_S)
        good, why = verify(read_out, n)
        ok = ok and good and code_read == 0
        if not (good and code_read == 0):
            diagnose(home, env, run_id)
        print(f"`fedml logs` of the finished run: {t_read:.3f} s = {n / t_read:,.0f} lines/s, exit {code_read}; "
              f"output {'OK' if good else 'WRONG'}: {why}")
        results["read_finished"] = {"seconds": round(t_read, 4), "lines_per_s": round(n / t_read), "verified": good,
                                    "check": why, "exit_code": code_read}
    emit("log_throughput", {"results": results, "all_pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
