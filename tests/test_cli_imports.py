"""What the hot CLI commands import (a real interpreter each): `fedml --help` and `version` stay light, and no
command the user waits on pulls in the server, the container or Kubernetes SDKs, or torch (DESIGN.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Fedml

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys
sys.argv = ["fedml", *json.loads(sys.argv[1])]
try:
    from fedml_cli.main import main
    main()
except SystemExit:
    pass
sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""
NEVER = ("torch", "fastapi", "uvicorn", "starlette", "docker", "kubernetes", "scheduler.app", "agents", "runtime")
LIGHT = ("pydantic", "httpx", "yaml", "rich", "scheduler.contract.models")


def imported(tmp_path: Path, *args: str, home: Path | None = None) -> set[str]:
    env = {**os.environ, "FEDML_HOME": str(home or tmp_path / "home")}
    env.pop("FEDML_SERVER", None)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("MODULES "))
    return set(json.loads(line[len("MODULES "):]))


@pytest.mark.parametrize("args", [["--help"], ["version"], ["run", "--help"]])
def test_help_and_version_import_almost_nothing(tmp_path: Path, args: list[str]) -> None:
    mods = imported(tmp_path, *args)
    assert not [m for m in mods if m.split(".")[0] in NEVER or m in NEVER or m.split(".")[0] in LIGHT
                or m in LIGHT], sorted(m for m in mods if m.split(".")[0] in NEVER + LIGHT)
    assert len(mods) <= 200, f"{len(mods)} modules for fedml {' '.join(args)}"


def test_the_entry_answers_version_as_the_cli_does(tmp_path: Path) -> None:
    """`fedml version` and `--version` are answered by the entry point before typer is imported (0.016 s, not
    0.12 s): the same text as the command prints."""
    env = {**os.environ, "FEDML_HOME": str(tmp_path / "home")}
    code = "import sys; from fedml_cli.entry import main; sys.argv = ['fedml', *sys.argv[1:]]; main(); " \
           "print('typer' in sys.modules, file=sys.stderr)"
    by_cli = subprocess.run([sys.executable, "-c", PROBE, json.dumps(["version"])], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    for args in (["version"], ["--version"]):
        got = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert got.returncode == 0 and got.stdout == by_cli.stdout != "", (got, by_cli)
        assert got.stderr.strip() == "False", got.stderr


def test_a_dry_run_validates_without_the_server_or_heavy_sdks(tmp_path: Path) -> None:
    mods = imported(tmp_path, "launch", str(REPO / "job_templates" / "hello" / "job.yaml"), "--dry-run")
    assert "scheduler.contract.jobspec" in mods  # it did validate
    assert not [m for m in mods if m.split(".")[0] in NEVER or m in NEVER], \
        sorted(m for m in mods if m.split(".")[0] in NEVER or m in NEVER)
    assert len(mods) <= 360, f"{len(mods)} modules for a dry run"


def _run_ids(fedml: Fedml) -> set[str]:
    r = fedml("run", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {run["id"] for run in json.loads(r.stdout)}


def test_a_launch_to_a_running_scheduler_leaves_validation_to_it(tmp_path: Path, shared_fedml: Fedml) -> None:
    """With a scheduler to ask, `fedml launch` reads the file as YAML only and sends its text: no pydantic on the
    client, the same one-line `FILE:LINE: field: message` error and exit 2 as when it validates itself (the
    scheduler's), typo warnings still printed, and nothing submitted for a bad file."""
    hello = str(REPO / "job_templates" / "hello" / "job.yaml")
    assert shared_fedml("launch", hello, "--detach").returncode == 0  # (starts the local scheduler if need be)
    mods = imported(tmp_path, "launch", hello, "--detach", home=shared_fedml.home)
    assert "pydantic" not in mods and "scheduler.contract.jobspec" not in mods, "the client loaded the schema"
    assert "scheduler.contract.jobyaml" in mods  # it did read the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: echo hi\ncomputing:\n  minimum_num_gpus: -1\n")
    before = _run_ids(shared_fedml)  # (ids: a run launched above may finish meanwhile)
    sent = shared_fedml("launch", str(bad), "--detach")
    local = shared_fedml("launch", str(bad), "--dry-run")
    assert sent.returncode == local.returncode == 2, (sent, local)
    assert sent.stderr.strip() == local.stderr.strip() and sent.stderr.count("\n") == 1, (sent.stderr, local.stderr)
    assert sent.stderr.startswith(f"error: {bad}:3: computing.minimum_num_gpus: ")
    assert _run_ids(shared_fedml) == before, "a bad file was submitted"
    typo = tmp_path / "typo.yaml"
    typo.write_text("job: echo hi\ncomputing:\n  minimum_num_gpu: 0\n  device_type: CPU\n")
    r = shared_fedml("launch", str(typo), "--detach")
    assert r.returncode == 0 and r.stdout.strip().startswith("run-"), r
    assert f"warning: {typo}:3: computing.minimum_num_gpu: unknown key (did you mean minimum_num_gpus?)" in r.stderr
    long = tmp_path / "long.yaml"  # over what the scheduler reads as text: validated here, sent as a document
    long.write_text("job: echo hi\n" + "# a long comment line to pad the file past 32 KiB\n" * 1000)
    r = shared_fedml("launch", str(long), "--detach")
    assert r.returncode == 0 and r.stdout.strip().startswith("run-"), r
