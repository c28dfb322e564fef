"""GPU truth on a real GPU (issue 17), for a machine with an NVIDIA GPU (the `device` tool's), in one run:

1. NVML's inventory (nvidia-ml-py) against what the local agent registered (`fedml node list --json`);
2. a CUDA torch job (matrix products for JOB_S seconds, printing FEDML_METRIC lines): its GPU utilisation and
   memory must show in `fedml run metrics RUN` (gpu/util_pct, gpu/mem_used_mb), with its own loss;
3. an orphan: a CUDA process started outside the scheduler must mark its GPU "busy outside the scheduler" on the
   node, and the mark must go once it exits (how long each took).

Without a GPU it says so and exits 0. `--double FILE` runs the same checks over agents/nvml_double.py (no CUDA:
the job sleeps and this script writes the double's utilisation and processes), to check the script itself here.

    .venv/bin/python bench/gpu_check.py [--double /tmp/nvml.json] [--job-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import FEDML, REPO, check_cli, diagnose, emit, temp_home

JOB = '''
import json, time, torch
dev = torch.device("cuda")
x = torch.randn(4096, 4096, device=dev)
end, step = time.time() + {seconds}, 0
while time.time() < end:
    y = x @ x
    torch.cuda.synchronize()
    step += 1
    if step % 50 == 0:
        print("FEDML_METRIC " + json.dumps({{"step": step, "loss": float(y.abs().mean().item()) / step}}), flush=True)
print("done", step, "steps on", torch.cuda.get_device_name(0), flush=True)
'''
ORPHAN = "import torch, time; x = torch.ones(1 << 28, device='cuda'); print('held', flush=True); time.sleep(120)"


def nvml_inventory() -> tuple[list[dict[str, Any]], str | None]:
    sys.path.insert(0, str(REPO))
    from agents.inventory import nvml_gpus

    gpus, why = nvml_gpus()
    return [{"index": g.index, "name": g.name, "memory_mb": g.memory_mb} for g in gpus], why


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FEDML), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def wait(what: str, probe: Any, timeout: float) -> tuple[Any, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = probe()
        if got:
            return got, time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Double:
    """The double's state file: the bench plays the GPU (utilisation and processes)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pids, self.util = path, {0: [], 1: []}, {0: 0, 1: 0}
        self.write()

    def write(self) -> None:
        gpus = [{"name": "NVIDIA A100 80GB PCIe", "memory_total_mb": 81920, "memory_used_mb": 4096 * len(p),
                 "utilization": self.util[i], "power_w": 250.0, "temperature_c": 60, "pids": p}
                for i, p in sorted(self.pids.items())]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": gpus}))
        tmp.replace(self.path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=Path, help="run over agents/nvml_double.py with this state file (no GPU needed)")
    p.add_argument("--job-seconds", type=float, default=30.0)
    args = p.parse_args()
    check_cli()
    double = Double(args.double) if args.double else None
    if double is not None:
        os.environ["FEDML_NVML_DOUBLE"] = str(args.double)
    inventory, why = nvml_inventory()
    if not inventory:
        print(f"no NVIDIA GPU here ({why}): nothing measured")
        emit("gpu_check", {"gpus": [], "why": why})
        return 0
    print(f"NVML: {len(inventory)} GPU(s): " + ", ".join(f"{g['index']}: {g['name']} {g['memory_mb']} MB" for g in inventory))
    out: dict[str, Any] = {"mode": "double" if double else "nvml", "nvml": inventory}
    with temp_home("gpu-check") as (home, env):
        env.update({"FEDML_GPU_SAMPLE_S": "1", "FEDML_HEARTBEAT_INTERVAL": "2", "FEDML_SERIES_FLUSH_S": "2"})
        run_id = None
        try:
            assert cli(env, "run", "list").returncode == 0  # (starts the local scheduler and agent)
            node = json.loads(cli(env, "node", "list", "--json").stdout)[0]
            seen = [(g["index"], g["name"], g["memory_mb"]) for g in node["gpus"]]
            want = [(g["index"], g["name"], g["memory_mb"]) for g in inventory]
            out["registered_match"] = seen == want
            print(f"registered by the agent: {'the same' if seen == want else f'DIFFERENT: {seen}'}")

            job_dir = home / "job"
            job_dir.mkdir()
            if double is None:
                (job_dir / "burn.py").write_text(JOB.format(seconds=args.job_seconds))
                cmd = "python burn.py"
            else:
                cmd = f"echo $$ > {home / 'job.pid'}; exec sleep {args.job_seconds}"
            (job_dir / "job.yaml").write_text(f"workspace: .\njob: {cmd}\ncomputing:\n  minimum_num_gpus: 1\n")
            r = cli(env, "launch", str(job_dir / "job.yaml"), "--detach")
            assert r.returncode == 0, r.stderr
            run_id = r.stdout.strip()
            status, _ = wait("the job running", lambda: (s := json.loads(cli(env, "run", "status", run_id, "--json").stdout))
                             ["status"] == "RUNNING" and s, 120)
            if double is not None:  # the job's "GPU": busy, with its process on it
                pid = int(wait("the job's pid", lambda: (home / "job.pid").exists() and
                               (home / "job.pid").read_text().strip(), 30)[0])
                gpu = status["gpus"][0]
                double.pids[gpu], double.util[gpu] = [pid], 87
                double.write()

            def gpu_series() -> dict[str, Any] | None:
                m = json.loads(cli(env, "run", "metrics", run_id, "--json").stdout)
                got = {s["name"]: s for s in m["series"]}
                util, mem = got.get("gpu/util_pct"), got.get("gpu/mem_used_mb")
                if util and mem and max(p[1] for p in util["points"]) > 0 and max(p[1] for p in mem["points"]) > 0:
                    return got
                return None

            got, took = wait("the job's GPU in its metrics", gpu_series, 120)
            out["job"] = {"util_pct_max": max(p[1] for p in got["gpu/util_pct"]["points"]),
                          "mem_used_mb_max": max(p[1] for p in got["gpu/mem_used_mb"]["points"]),
                          "seen_after_s": round(took, 1), "own_metrics": sorted(n for n in got if not n.startswith("gpu/"))}
            print(f"the job's GPU in `fedml run metrics` after {took:.1f} s: utilisation up to "
                  f"{out['job']['util_pct_max']:.0f} %, memory up to {out['job']['mem_used_mb_max']:.0f} MB; "
                  f"its own metrics: {', '.join(out['job']['own_metrics']) or 'none'}")
            cli(env, "run", "stop", run_id)

            # An orphan: a process on a GPU that belongs to no run.
            if double is None:
                orphan = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
                assert orphan.stdout is not None and orphan.stdout.readline().strip() == "held"
                pid, index = orphan.pid, 0
            else:
                orphan = subprocess.Popen(["sleep", "120"])
                pid, index = orphan.pid, 1
                double.pids[index] = [pid]
                double.write()
            t0 = time.monotonic()

            def busy_outside() -> list[int]:
                return list(json.loads(cli(env, "node", "list", "--json").stdout)[0].get("gpus_busy_outside") or [])

            marked, _ = wait("the orphan's GPU marked busy outside the scheduler", lambda: index in busy_outside(), 60)
            found = time.monotonic() - t0
            orphan.kill()
            orphan.wait()
            if double is not None:
                double.pids[index] = []
                double.write()
            t1 = time.monotonic()
            wait("the mark cleared", lambda: index not in busy_outside(), 60)
            out["orphan"] = {"detected_s": round(found, 1), "cleared_s": round(time.monotonic() - t1, 1)}
            print(f"an orphan on GPU {index}: marked busy outside the scheduler after {found:.1f} s, cleared "
                  f"{out['orphan']['cleared_s']:.1f} s after it exited")
        except Exception:
            diagnose(home, env, run_id)
            raise
    emit("gpu_check", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
