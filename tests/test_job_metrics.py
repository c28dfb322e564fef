"""Job metrics: `fedml.log` and `FEDML_METRIC` lines (scheduler/contract/metrics.py), read out of the stored log by
the scheduler (scheduler/service/metrics.py), shown by `fedml run metrics` / `fedml run compare`; FedML's
job-side artifact API (fedml.mlops). Unit tests of the wire format, and real jobs on the local scheduler."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler.contract.metrics import MAX_LINE, PREFIX, line, parse

from .conftest import Fedml, write_job
from .procs import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_a_metric_line_round_trips_and_bad_ones_say_why() -> None:
    text = line({"loss": 0.25, "acc": True, "n": 3}, step=7)
    assert text == PREFIX + '{"loss":0.25,"acc":1.0,"n":3.0,"step":7}'
    assert parse(text) == ({"loss": 0.25, "acc": 1.0, "n": 3.0}, 7, None)
    assert parse("loss 0.25") is None  # not a metric line at all
    for bad, why in ((PREFIX + "[1]", "not a JSON object"), (PREFIX + '{"x": "a"}', "not a finite number"),
                     (PREFIX + '{"x": NaN}', "not a finite number"), (PREFIX + '{"a b": 1}', "not a metric name"),
                     (PREFIX + '{"x": 1, "step": 1.5}', "step is not an integer"),
                     (PREFIX + json.dumps({f"m{i}": i for i in range(101)}), "more than 100 names"),
                     (PREFIX + '{"x": ' + "1" * MAX_LINE + "}", "longer than")):
        got = parse(bad)
        assert got is not None and got.values == {} and why in (got.problem or ""), (bad[:40], got)
    for values, step in (({"x": float("inf")}, None), ({"../x": 1}, None), ({"x": 1}, 1.5), ({"step": 1}, None)):
        with pytest.raises(ValueError):
            line(values, step)  # type: ignore[arg-type]


@pytest.mark.unit
def test_fedml_log_prints_the_line_and_artifacts_go_to_the_run_s_artifact_dir(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    out.mkdir()
    (tmp_path / "model.pt").write_bytes(b"weights")
    code = ("import fedml, time\n"
            "t = time.perf_counter()\n"
            "fedml.log({'loss': 0.5}, step=1)\n"
            "fedml.mlops.log({'round_idx': 3, 'acc': 0.9}, customized_step_key='round_idx')\n"
            "fedml.mlops.log_model('digits', 'model.pt')\n"
            "a = fedml.mlops.Artifact('data', fedml.mlops.ARTIFACT_TYPE_NAME_DATASET)\n"
            "a.add_file('model.pt')\n"
            "fedml.mlops.log_artifact(a)\n"
            "print(fedml.get_env_version())\n")
    env = {**os.environ, "FEDML_ARTIFACT_DIR": str(out), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [PREFIX + '{"loss":0.5,"step":1}', PREFIX + '{"round_idx":3.0,"acc":0.9,"step":3}',
                                     "release"]
    assert (out / "digits" / "model.pt").read_bytes() == b"weights"
    manifest = json.loads((out / "fedml-artifacts.json").read_text())
    assert manifest == {"digits": {"type": "model", "files": ["model.pt"]},
                        "data": {"type": "dataset", "files": ["model.pt"]}}
    took = subprocess.run([sys.executable, "-X", "importtime", "-c", "import fedml.mlops"], capture_output=True,
                          text=True, env=env).stderr
    assert "torch" not in took and "pydantic" not in took and "httpx" not in took  # a job's import stays light


def test_a_job_s_metrics_are_shown_within_seconds_and_compared_across_runs(fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path / "m", "python3 -c \"import fedml, time\n"
                    "for i in range(5): fedml.log({'loss': 1.0 / (i + 1), 'acc': i / 5}, step=i)\n"
                    "\"\n"
                    "echo 'FEDML_METRIC {\"tokens\": 128}'\n"
                    "echo 'FEDML_METRIC {\"bad\": \"x\"}'\n"
                    "sleep ${HOLD:-0}")
    first = fedml("launch", str(job), "--detach", "--env", "HOLD=30")
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.strip()

    def metrics() -> dict | None:
        r = fedml("run", "metrics", run_id, "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        return got if any(s["name"] == "tokens" for s in got["series"]) else None

    got = wait_for("the job's metrics", metrics, timeout=60)
    started = json.loads(fedml("run", "status", run_id, "--json").stdout)["started_at"]
    assert time.time() - started < 5 + 2, "metrics took longer than 5 s to show"  # (+2: this test's own polling)
    loss = next(s for s in got["series"] if s["name"] == "loss")
    assert [p[:2] for p in loss["points"]] == [[i, 1.0 / (i + 1)] for i in range(5)] and loss["rank"] == 0
    assert got["ignored"] == 1 and "not a finite number" in got["ignored_why"]
    text = fedml("run", "metrics", run_id)
    assert text.returncode == 0 and "loss" in text.stdout and "▁" in text.stdout, text.stdout
    assert fedml("run", "stop", run_id).returncode == 0
    second = fedml("launch", str(job))
    assert second.returncode == 0, second.stderr
    other = json.loads(fedml("run", "list", "--json").stdout)[0]["id"]
    both = fedml("run", "compare", run_id, other, "-n", "loss")
    assert both.returncode == 0 and run_id in both.stdout and other in both.stdout, both.stdout
    # (the metric's name as a word: a run id, 16 random hex digits, may hold the letters "acc", and once did)
    assert not re.search(r"\bacc\b", both.stdout), both.stdout


@pytest.mark.unit
def test_what_the_scheduler_keeps_of_a_run_s_metrics_is_bounded(tmp_path: Path) -> None:
    """A job printing more points and names than are kept: each series is thinned to an even sample of the whole
    run with its latest point, and series past the limit are counted as dropped."""
    import random

    from scheduler.contract.models import Principal, Run
    from scheduler.notify import Notifier
    from scheduler.service import Scheduler
    from scheduler.service.metrics import MAX_POINTS, MAX_SERIES
    from scheduler.sqlite_store import SQLiteStore

    s = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), rng=random.Random(1))
    run = s.store.create_run(Run(id="run-m", name="m", job={"job": "x"}, owner="alice"))
    n = 5 * MAX_POINTS + 3
    s.store.append_logs(run.id, 1, 0, 0, [(float(i), "stdout", line({"loss": i}, step=i)) for i in range(n)])
    wide = [(0.0, "stdout", line({f"m{j}": 1.0 for j in range(k, k + 100)})) for k in range(0, MAX_SERIES + 100, 100)]
    s.store.append_logs(run.id, 1, 1, 0, wide)
    got = s.run_metrics(run.id, Principal(scope="user", owner="alice", key_id="k1"))
    loss = next(x for x in got["series"] if x["name"] == "loss")
    steps = [p[0] for p in loss["points"]]
    assert len(steps) <= MAX_POINTS + 1 and steps[0] == 0 and steps[-1] == n - 1 and loss["reported"] == n
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)}
    assert len(gaps) == 1  # evenly spaced (the latest point aside)
    assert len(got["series"]) == MAX_SERIES and got["dropped"] > 0
    with pytest.raises(Exception, match="not found"):
        s.run_metrics(run.id, Principal(scope="user", owner="bob", key_id="k2"))
