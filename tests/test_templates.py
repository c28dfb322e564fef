"""Job templates through the real CLI: list/show/init, and the train template end to end with real torch."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .conftest import ROOT, Fedml, needs

VENV_BIN = str(Path(sys.executable).parent)


def test_template_list_show_init(fedml: Fedml, tmp_path: Path) -> None:
    r = fedml("template", "list", "--json")
    assert r.returncode == 0, r.stderr
    names = {t["name"] for t in json.loads(r.stdout)}
    assert {"hello", "train"} <= names
    show = fedml("template", "show", "train")
    assert show.returncode == 0 and "job:" in show.stdout and "workspace/train.py" in show.stdout
    bad = fedml("template", "show", "nope")
    assert bad.returncode == 2 and 'no template "nope"' in bad.stderr
    dest = tmp_path / "myhello"
    init = fedml("template", "init", "hello", str(dest))
    assert init.returncode == 0, init.stderr
    assert (dest / "job.yaml").is_file() and (dest / "workspace" / "hello.py").is_file()
    again = fedml("template", "init", "hello", str(dest))
    assert again.returncode == 2 and "not empty" in again.stderr
    run = fedml("launch", str(dest / "job.yaml"))
    assert run.returncode == 0, run.stderr
    assert "step 3/3" in run.stdout


def test_train_template_finishes_with_accuracy_and_keeps_its_checkpoint(shared_fedml: Fedml, tmp_path: Path) -> None:
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
        ok, why = True, ""
    except ImportError as exc:
        ok, why = False, str(exc)
    needs("torch and scikit-learn", ok, why)
    job = ROOT / "job_templates" / "train" / "job.yaml"
    # The job's python3 must be one with torch: this venv's.
    r = shared_fedml("launch", str(job), "--env", f"PATH={VENV_BIN}:{os.environ.get('PATH', '')}",
                     "--env", "EPOCHS=12", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"^epoch \d+ loss ([0-9.]+)$", r.stdout, re.M)]
    assert len(losses) == 12 and losses[-1] < losses[0] / 5
    acc = float(re.search(r"^final accuracy ([0-9.]+)$", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert acc >= 0.9
    run_id = r.stderr.split("Run ")[1].split()[0]
    # the same figures as job metrics (fedml.log in the template): a loss per epoch, the accuracy at the end
    m = {s["name"]: s for s in json.loads(shared_fedml("run", "metrics", run_id, "--json").stdout)["series"]}
    assert [p[0] for p in m["loss"]["points"]] == list(range(1, 13))
    assert [round(p[1], 4) for p in m["loss"]["points"]] == losses and round(m["accuracy"]["last"], 4) == acc
    listed = json.loads(shared_fedml("run", "artifacts", run_id, "--json").stdout)
    assert [(a["rank"], a["files"]) for a in listed] == [(0, 1)]
    out = tmp_path / "out"
    d = shared_fedml("run", "artifacts", run_id, "--download", str(out))
    assert d.returncode == 0, d.stderr
    import torch

    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert abs(ckpt["accuracy"] - acc) < 1e-3 and "0.weight" in ckpt["state_dict"]


def test_run_without_artifacts_says_so(shared_fedml: Fedml, tmp_path: Path) -> None:
    from .conftest import write_job

    r = shared_fedml("launch", str(write_job(tmp_path, "echo nothing kept")))
    run_id = r.stderr.split("Run ")[1].split()[0]
    a = shared_fedml("run", "artifacts", run_id)
    assert a.returncode == 0 and "kept no artifacts" in a.stderr
    assert shared_fedml("run", "artifacts", "run-nope").returncode == 4
