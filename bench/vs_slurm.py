"""fedml against Slurm on this machine, in one interleaved run (issue 14's client and log goals):

- `fedml launch` of a trivial job (`hostname`) followed to its exit vs `srun hostname` (goal: <= 2.5x);
- `fedml launch --detach` vs `sbatch --wrap hostname` (goal: --detach <= 0.25 s);
- `fedml --help` vs the interpreter floor `python -c pass` (goal: <= 4x);
- a job printing 200,000 lines followed to its end: `fedml launch` (stdout to a file) vs `srun` of the same
  command (goal: <= 1.5x), both outputs checked line by line;
- the resident memory of the idle scheduler (this store, after the runs) and of slurmctld (one node).

Slurm is a one-node slurm-wlm on loopback set up by bench/peers/slurm-up.sh (apt; root), as bench/e2e_peers.py
uses it, never a dependency of fedml. Without it, the Slurm figures are reported as not measured.

    .venv/bin/python bench/vs_slurm.py [--runs 15] [--lines 200000] [--log-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _common import FEDML, REPO, check_cli, diagnose, emit, median, temp_home, timed
from e2e_peers import slurm_up
from log_throughput import verify


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def pid_of(name: str) -> int | None:
    r = subprocess.run(["pgrep", "-xo", name], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--log-rounds", type=int, default=3)
    opts = ap.parse_args()
    check_cli()
    why = slurm_up() if shutil.which("bash") else "no bash"
    slurm = why is None
    if not slurm:
        print(f"slurm: not measured: {why}")
    printer = f"python3 -c \"import sys; [print(f'line {{i}}') for i in range({opts.lines})]\""
    times: dict[str, list[float]] = {k: [] for k in ("floor", "help", "launch", "detach", "srun", "sbatch",
                                                       "logs_fedml", "logs_srun")}
    ok = True
    with temp_home("vs-slurm") as (home, env):
        (home / "trivial.yaml").write_text("job: hostname\n")
        (home / "big.yaml").write_text(f"job: |\n  {printer}\n")
        t, code = timed([str(FEDML), "launch", str(home / "trivial.yaml")], env, timeout=60)
        print(f"warm-up launch (starts the local scheduler): {t:.3f} s, exit {code}")
        if code != 0:
            diagnose(home, env)
            emit("vs_slurm", {"all_pass": False})
            return 1
        if slurm:
            timed(["srun", "hostname"], env, timeout=60)
            timed(["sbatch", "--wrap", "hostname", "-o", "/dev/null"], env, timeout=60)
        for _ in range(opts.runs):  # taking turns, so that the machine's load falls on both alike
            steps = [("floor", [sys.executable, "-c", "pass"]), ("help", [str(FEDML), "--help"]),
                     ("launch", [str(FEDML), "launch", str(home / "trivial.yaml")]),
                     ("detach", [str(FEDML), "launch", "--detach", str(home / "trivial.yaml")])]
            if slurm:
                steps += [("srun", ["srun", "hostname"]),
                          ("sbatch", ["sbatch", "--wrap", "hostname", "-o", "/dev/null"])]
            for key, cmd in steps:
                t, code = timed(cmd, env, timeout=60)
                ok = ok and code == 0
                times[key].append(t)
        for _ in range(opts.log_rounds):
            out = home / "fedml.out"
            with open(out, "wb") as f:
                t, code = timed([str(FEDML), "launch", str(home / "big.yaml")], env, stdout=f, timeout=120)
            good = code == 0 and verify(out, opts.lines)[0]
            ok = ok and good
            times["logs_fedml"].append(t if good else float("nan"))
            if slurm:
                out = home / "srun.out"
                with open(out, "wb") as f:
                    t, code = timed(["srun", "bash", "-c", printer], env, stdout=f, timeout=120)
                times["logs_srun"].append(t if code == 0 and verify(out, opts.lines)[0] else float("nan"))
        state = home / "local" / "scheduler.json"
        sched_pid = json.loads(state.read_text())["pid"] if state.exists() else None
        ours = rss_mib(sched_pid) if sched_pid else None
    theirs = rss_mib(pid) if slurm and (pid := pid_of("slurmctld")) else None
    med = {k: median(v) for k, v in times.items() if v}

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}x" if a in med and b in med else "not measured"

    print(f"interpreter floor `python -c pass`: {med['floor']:.3f} s; `fedml --help`: {med['help']:.3f} s "
          f"= {ratio('help', 'floor')} the floor (goal <= 4x)")
    print(f"`fedml launch` trivial, to its exit: {med['launch']:.3f} s" + (
        f"; `srun hostname`: {med['srun']:.3f} s; ratio {ratio('launch', 'srun')} (goal <= 2.5x)" if slurm else ""))
    print(f"`fedml launch --detach`: {med['detach']:.3f} s (goal <= 0.25 s)" + (
        f"; `sbatch --wrap`: {med['sbatch']:.3f} s; ratio {ratio('detach', 'sbatch')}" if slurm else ""))
    print(f"{opts.lines:,} lines followed to the end: fedml {med['logs_fedml']:.3f} s" + (
        f", srun {med['logs_srun']:.3f} s; ratio {ratio('logs_fedml', 'logs_srun')} (goal <= 1.5x)" if slurm else ""))
    print(f"idle resident memory: scheduler {ours or float('nan'):.1f} MiB" + (
        f", slurmctld {theirs:.1f} MiB" if theirs else ""))
    emit("vs_slurm", {"runs": opts.runs, "lines": opts.lines, "slurm": slurm, "slurm_why_not": why,
                      "median_s": {k: round(v, 4) for k, v in med.items()},
                      "rss_mib": {"scheduler": ours, "slurmctld": theirs}, "all_pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
