"""Shared helpers for the bench scripts: where the CLI is, a throw-away FEDML_HOME, timing and statistics.

Stdlib only. Every script gets its own temporary FEDML_HOME (never the user's state), talks to the embedded local
scheduler only (FEDML_SERVER / FEDML_API_KEY are removed from the environment), and stops that scheduler at the
end with `fedml scheduler stop`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FEDML = BIN / "fedml"


def check_cli() -> None:
    if not FEDML.exists():
        sys.exit(f"bench: {FEDML} not found; run `make install` first (the CLI must sit next to {sys.executable})")


def base_env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDML_SERVER", "FEDML_API_KEY")}
    if home is not None:
        env["FEDML_HOME"] = str(home)
    return env


TIMEOUT = -9  # the exit code we record for a command that ran past its time limit (and was killed)


class Home:
    """A bench's FEDML_HOME. Set `keep` to leave it on disk (for a post-mortem) instead of removing it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keep = False

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)


def diagnose(home: Home, env: dict[str, str], run_id: str | None = None) -> None:
    """Print what the local scheduler and agent logged, and the run's state, after something went wrong."""
    home.keep = True
    if run_id:
        r = subprocess.run([str(FEDML), "run", "status", "--json", run_id], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=30)
        print(f"# run {run_id}: {' '.join((r.stdout or r.stderr).split())[:600]}")
    for name in ("scheduler.log", "agent.log"):
        try:
            tail = (home / "local" / name).read_text(errors="replace").splitlines()[-15:]
        except OSError:
            continue
        print(f"# last lines of {home / 'local' / name}:")
        for ln in tail:
            print(f"#   {ln[:300]}")


@contextmanager
def temp_home(prefix: str) -> Iterator[tuple[Home, dict[str, str]]]:
    """A fresh FEDML_HOME and the environment to run the CLI with; stops its scheduler and removes it after."""
    home = Home(Path(tempfile.mkdtemp(prefix=f"fedml-bench-{prefix}-")))
    env = base_env(home.path)
    try:
        yield home, env
    finally:
        t0 = time.perf_counter()
        r = subprocess.run([str(FEDML), "scheduler", "stop"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        said = (r.stderr or "").strip().replace("\n", "; ")
        print(f"# cleanup: fedml scheduler stop -> exit {r.returncode} in {time.perf_counter() - t0:.1f} s"
              + (f" ({said})" if said else ""))
        if home.keep:
            print(f"# kept {home} for a post-mortem")
        else:
            shutil.rmtree(home.path, ignore_errors=True)


def timed(cmd: Sequence[str], env: dict[str, str], *, stdout: Any = subprocess.DEVNULL,
          stderr: Any = subprocess.DEVNULL, cwd: Path = REPO, timeout: float = 30.0) -> tuple[float, int]:
    """Wall time (s) and exit code of one run of cmd; TIMEOUT as the code if it ran past `timeout` s."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, TIMEOUT
    return time.perf_counter() - t0, r.returncode


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(s)))
    return s[k - 1]


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {"n": len(xs), "median_s": round(median(xs), 4), "p90_s": round(percentile(xs, 90), 4),
            "min_s": round(min(xs), 4), "max_s": round(max(xs), 4)}


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        from importlib.metadata import version

        info["typer"] = version("typer")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def emit(name: str, result: dict[str, Any]) -> None:
    """The final, machine-readable line (strict JSON: a figure that could not be measured is null)."""
    doc = {"bench": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    print(json.dumps(_finite(doc), allow_nan=False))


@contextmanager
def worktree(rev: str | None) -> Iterator[Path | None]:
    """A throw-away git worktree of `rev` (None: none), for benchmarks that measure an earlier revision beside this
    one in the same run."""
    if rev is None:
        yield None
        return
    tree = Path(tempfile.mkdtemp(prefix="fedml-bench-rev-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def collect_as_the_scheduler() -> None:
    """The collector's thresholds the scheduler process sets (scheduler/server.py): an in-process measurement of
    its code (placement, drain) collects as it does. With Python's default (a young pass every 700 allocations),
    full collections over 100,000 nodes' objects took nearly a quarter of a Redis placement burst."""
    gc.set_threshold(50_000, 20, 10)


BUSY_JOB = {"job": "echo hi", "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G"}}


def busy_cluster(store: Any, nodes: int, queued: int, gpus: int = 8, teams: int = 0) -> Any:
    """`nodes` nodes x `gpus` A100s written into `store`, every GPU busy with a one-GPU run, `queued` more runs
    waiting behind them; returns the Scheduler that placed them (an hour-long heartbeat interval: the nodes send
    none and must stay online however long the setup takes). `teams`: the runs spread over that many teams, each
    with a GPU quota (that does not bind) and fair share (issue 18). The scheduler modules are imported here, so a
    benchmark run against another revision (PYTHONPATH) builds the cluster with that revision's code."""
    import random

    from scheduler.contract.models import GpuInfo, Node, Run
    from scheduler.notify import Notifier
    from scheduler.service import Scheduler

    sched = Scheduler(store, Notifier(), heartbeat_interval=3600.0, rng=random.Random(1))
    now = time.time()
    if teams:
        from scheduler.contract.models import Team

        for t in range(teams):
            store.put_team(Team(name=f"team{t:03d}", quotas={"any": nodes * gpus}), new=True)

    def team(j: int) -> dict[str, str]:
        return {"team": f"team{j % teams:03d}", "owner": f"user{j % (teams * 3)}"} if teams else {}

    with store.batch():
        for i in range(nodes):
            store.upsert_node(Node(id=f"node-{i:05d}", name=f"n{i}", last_seen=now, gpus=[
                GpuInfo(index=g, name="NVIDIA A100 80GB PCIe", memory_mb=81920) for g in range(gpus)]))
    for i in range(nodes):
        store.heartbeat(f"node-{i:05d}", now)
    with store.batch():
        for j in range(nodes * gpus):
            store.create_run(Run(id=f"run-a{j:06d}", name="busy", job=BUSY_JOB, created_at=now + j * 1e-6, **team(j)))
    while sched.schedule_pass():
        pass
    with store.batch():
        for j in range(queued):
            store.create_run(Run(id=f"run-q{j:06d}", name="waiting", job=BUSY_JOB, created_at=now + 1 + j * 1e-6,
                                 **team(j)))
    return sched
