"""What the hot CLI commands import (a real interpreter each): `fedml --help` and `version` stay light, and no
command the user waits on pulls in the server, the container or Kubernetes SDKs, or torch (DESIGN.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def imported(tmp_path: Path, *args: str) -> set[str]:
    env = {**os.environ, "FEDML_HOME": str(tmp_path / "home")}
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


def test_a_dry_run_validates_without_the_server_or_heavy_sdks(tmp_path: Path) -> None:
    mods = imported(tmp_path, "launch", str(REPO / "job_templates" / "hello" / "job.yaml"), "--dry-run")
    assert "scheduler.contract.jobspec" in mods  # it did validate
    assert not [m for m in mods if m.split(".")[0] in NEVER or m in NEVER], \
        sorted(m for m in mods if m.split(".")[0] in NEVER or m in NEVER)
    assert len(mods) <= 360, f"{len(mods)} modules for a dry run"
