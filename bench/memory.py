"""Resident memory of an idle scheduler holding a big busy cluster and a long queue, next to slurmctld (issue 14).

Ours: a store (SQLite on disk, and/or Redis on 127.0.0.1:6379 with a key prefix of its own, wiped afterwards)
seeded with NODES one-GPU nodes, each GPU held by a running run, and QUEUED more runs waiting behind them; then a
real `python -m scheduler.server --no-agent` on it (heartbeat interval 1 h: no agent heartbeats here, and the
nodes must not go offline meanwhile). Once it has loaded everything and settled (its RSS unchanged for a few
seconds), its RSS and its peak (VmHWM) are read.

Slurm: a slurmctld of its own (a slurm.conf of its own: port 6827, state in a temporary directory; the one of
bench/peers/slurm-up.sh is left alone) with NODES nodes declared FUTURE (no slurmd needed) and JOBS held jobs
submitted with sbatch (~8 ms each, so not 100,000: the figure for QUEUED jobs is its RSS with JOBS jobs plus the
per-job growth times the rest, an extrapolation, said so in the output). Without Slurm it is reported as not
measured.

    .venv/bin/python bench/memory.py [--nodes 100000] [--queued 100000] [--store sqlite,redis] [--slurm-jobs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, emit  # noqa: E402

REDIS = "redis://127.0.0.1:6379/7"


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet_s: float = 4.0, timeout: float = 900.0) -> dict[str, int]:
    """Wait until the process is idle (under 10 % of a core) and its RSS has not grown by more than 1 % for
    quiet_s seconds; its last figures."""
    deadline = time.monotonic() + timeout
    last, since, cpu = 0, time.monotonic(), cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now, used = status_kib(pid), cpu_s(pid)
        busy, cpu = used - cpu > 0.05, used
        if busy or now["VmRSS"] > last * 1.01:
            last, since = max(last, now["VmRSS"]), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise RuntimeError(f"pid {pid}: still busy or growing after {timeout:.0f} s")


SEED = r"""
import sys, time
from scheduler.contract.models import GpuInfo, Node, Placement, Run, RunStatus
from scheduler.store import bulk
kind, where, nodes, queued = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "sqlite":
    from scheduler.sqlite_store import SQLiteStore
    store = SQLiteStore(where, synchronous="OFF")
else:
    from scheduler.redis_store import RedisStore
    store = RedisStore(where)
now = time.time()
job = {"job": "python train.py", "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G"}}
step = 5000
with bulk():
    for lo in range(0, nodes, step):
        with store.batch():
            for i in range(lo, min(nodes, lo + step)):
                store.upsert_node(Node(id=f"node-{i:06d}", name=f"n{i}", last_seen=now, cpus=64, memory_mb=512000,
                                       gpus=[GpuInfo(index=0, name="NVIDIA A100 80GB PCIe", memory_mb=81920)]))
                run = store.create_run(Run(id=f"run-a{i:06d}", name="busy", job=job, created_at=now - 60))
                store.transition(run.id, RunStatus.STARTING,
                                 placements=[Placement(rank=0, node_id=f"node-{i:06d}", gpus=[0])])
                store.transition(run.id, RunStatus.RUNNING)
    for lo in range(0, queued, step):
        store.create_each([Run(id=f"run-q{j:06d}", name="waiting", job=job, created_at=now + j * 1e-6)
                           for j in range(lo, min(queued, lo + step))])
store.close()
"""


def ours(kind: str, nodes: int, queued: int) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="fedml-bench-memory-"))
    (home / "local").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    env["FEDML_HOME"] = str(home)
    store = "sqlite" if kind == "sqlite" else f"{REDIS}?prefix=fedml-bench-mem-{os.getpid()}:"
    where = str(home / "local" / "scheduler.db") if kind == "sqlite" else store
    proc = None
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", SEED, kind, where, str(nodes), str(queued)], cwd=REPO, env=env,
                       check=True)
        seeded = time.perf_counter() - t
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--no-agent",
                                 "--quiet", "--heartbeat-interval", "3600", "--store", store],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = settle(proc.pid)
        took = time.perf_counter() - t
        if proc.poll() is not None:
            raise RuntimeError(f"the scheduler exited with {proc.returncode}")
        return {"rss_mib": round(got["VmRSS"] / 1024, 1), "peak_mib": round(got["VmHWM"] / 1024, 1),
                "seed_s": round(seeded, 1), "settled_s": round(took, 1)}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if kind == "redis":
            from scheduler.redis_store import wipe_prefix

            wipe_prefix(store)
        shutil.rmtree(home, ignore_errors=True)


SLURM_CONF = """ClusterName=fedmlmem
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=6827
SlurmdPort=6828
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmctldLogFile={dir}/slurmctld.log
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MaxJobCount={max_jobs}
MinJobAge=300
{node_lines}
PartitionName=mem Nodes={ranges} Default=YES MaxTime=INFINITE State=UP
"""
SLURM_RANGE = 50_000  # a hostlist range holds at most 65,536 hosts ("Too many hosts in range")


def slurm(nodes: int, jobs: int, queued: int) -> dict[str, object]:
    if not (shutil.which("slurmctld") and shutil.which("sbatch")):
        return {"not_measured": "Slurm is not installed (bench/peers/slurm-up.sh installs it)"}
    if os.geteuid() != 0:
        return {"not_measured": "a slurmctld of its own needs root here"}
    d = Path(tempfile.mkdtemp(prefix="fedml-bench-slurmmem-"))
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    ranges = [f"m[{lo + 1}-{min(nodes, lo + SLURM_RANGE)}]" for lo in range(0, nodes, SLURM_RANGE)]
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], dir=d, ranges=",".join(ranges),
                                      node_lines="\n".join(f"NodeName={r} CPUs=8 State=FUTURE" for r in ranges),
                                      max_jobs=max(10_000, 2 * jobs)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid = None
    keep = False
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (d / "slurmctld.pid").exists() and subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                                                  timeout=30).returncode == 0:
                pid = int((d / "slurmctld.pid").read_text().split()[0])
                break
            time.sleep(0.5)
        if pid is None:
            keep = True
            return {"not_measured": f"slurmctld did not answer; see {d}/slurmctld.log"}
        idle = settle(pid)

        def submit(_: int) -> int:
            return subprocess.run(["sbatch", "--hold", "--wrap", "true", "-o", "/dev/null"], env=env,
                                  capture_output=True, timeout=60).returncode

        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            failed = sum(1 for rc in pool.map(submit, range(jobs)) if rc != 0)
        took = time.perf_counter() - t
        loaded = settle(pid)
        per_job = max(0, loaded["VmRSS"] - idle["VmRSS"]) / max(1, jobs - failed)
        return {"nodes": nodes, "jobs": jobs - failed, "submit_failed": failed, "submit_s": round(took, 1),
                "rss_idle_mib": round(idle["VmRSS"] / 1024, 1), "rss_jobs_mib": round(loaded["VmRSS"] / 1024, 1),
                "per_job_kib": round(per_job, 2),
                "rss_at_queued_mib_extrapolated": round((loaded["VmRSS"] + per_job * max(0, queued - jobs)) / 1024, 1)}
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
        if pid is not None:
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.2)
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--queued", type=int, default=100_000)
    ap.add_argument("--store", default="sqlite,redis", help="sqlite, redis, or both (comma-separated)")
    ap.add_argument("--slurm-jobs", type=int, default=2000, help="held jobs submitted to slurmctld (0: Slurm not run)")
    args = ap.parse_args()
    result: dict[str, object] = {"nodes": args.nodes, "queued": args.queued}
    for kind in [k for k in args.store.split(",") if k]:
        r = ours(kind, args.nodes, args.queued)
        result[kind] = r
        print(f"scheduler ({kind}), {args.nodes:,} busy nodes + {args.queued:,} queued runs: RSS {r['rss_mib']} MiB, "
              f"peak {r['peak_mib']} MiB (settled {r['settled_s']} s after start; seeding took {r['seed_s']} s)")
    if args.slurm_jobs > 0:
        s = slurm(args.nodes, args.slurm_jobs, args.queued)
        result["slurmctld"] = s
        if "not_measured" in s:
            print(f"slurmctld: not measured: {s['not_measured']}")
        else:
            print(f"slurmctld, {args.nodes:,} nodes: RSS {s['rss_idle_mib']} MiB idle, {s['rss_jobs_mib']} MiB with "
                  f"{s['jobs']:,} held jobs ({s['per_job_kib']} KiB each); with {args.queued:,} jobs about "
                  f"{s['rss_at_queued_mib_extrapolated']} MiB (extrapolated)")
            for kind in ("sqlite", "redis"):
                if isinstance(result.get(kind), dict):
                    ratio = result[kind]["rss_mib"] / s["rss_at_queued_mib_extrapolated"]  # type: ignore[index]
                    print(f"  ratio scheduler ({kind}) / slurmctld: {ratio:.2f}x")
    emit("memory", json.loads(json.dumps(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
