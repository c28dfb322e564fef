"""Shared fixtures: the real `fedml` executable run as a subprocess against a private FEDML_HOME.

Every scheduler a test starts lives under its own FEDML_HOME in a temp dir and is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The FedML job YAMLs the tests use, copied from ../shared/compat (tests/data/README.md): a clone tests itself.
COMPAT = ROOT / "tests" / "data" / "fedml_examples"
FEDML = shutil.which("fedml", path=str(Path(sys.executable).parent)) or "fedml"


@contextlib.contextmanager
def write_open(store: object, write: Callable[[], object]) -> Iterator[None]:
    """For the block: another thread inside a store transaction (`store.batch()`) that has made `write` and not
    committed it; it commits when the block ends."""
    held, release = threading.Event(), threading.Event()

    def inside() -> None:
        with store.batch():  # type: ignore[attr-defined]
            write()
            held.set()
            assert release.wait(30)

    t = threading.Thread(target=inside)
    t.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()


def needs(what: str, ok: bool, why: str) -> None:
    """A test whose component is missing fails in CI and skips (with the reason) elsewhere."""
    if ok:
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is required in CI: {why}")
    pytest.skip(f"{what} unavailable: {why}")


def engine_host() -> tuple[str | None, str]:
    """DOCKER_HOST of a Docker Engine API for the container tests (DOCKER_HOST, else the podman service of
    scripts/podman-up.sh, which `make podman` starts), or (None, why not)."""
    from runtime.engine import engine_answers

    sock = Path(os.environ.get("FEDML_PODMAN_DIR", "/tmp/fedml-podman")) / "podman.sock"
    for host in filter(None, (os.environ.get("DOCKER_HOST"), f"unix://{sock}")):
        if engine_answers(host):
            return host, ""
    return None, f"no Docker Engine API answers at DOCKER_HOST or {sock} (run `make podman`)"


@dataclass
class Fedml:
    """Runs `fedml ...` with FEDML_HOME set to `home`."""

    home: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FEDML_SERVER", "FEDML_API_KEY")}
        env["FEDML_HOME"] = str(self.home)
        env["FEDML_STOP_GRACE"] = "2"
        env.update(extra or {})
        return env

    def __call__(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FEDML, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env(env), stdin=subprocess.DEVNULL, cwd=cwd)

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen([FEDML, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(env), stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]

    def stop(self) -> None:
        subprocess.run([FEDML, "scheduler", "stop"], capture_output=True, timeout=60, env=self.env(),
                       stdin=subprocess.DEVNULL)


@pytest.fixture
def fedml(tmp_path: Path) -> Iterator[Fedml]:
    """A private FEDML_HOME; its local scheduler (if any command started one) is stopped afterwards."""
    f = Fedml(tmp_path / "fedml-home")
    yield f
    f.stop()


@pytest.fixture(scope="session")
def shared_fedml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fedml]:
    """One local scheduler for the whole session, for tests that do not restart or kill it."""
    f = Fedml(tmp_path_factory.mktemp("shared") / "fedml-home")
    yield f
    f.stop()


def write_job(dir: Path, job: str, *, extra: str = "", workspace: dict[str, str] | None = None,
              name: str = "job.yaml") -> Path:
    """A job YAML with a workspace folder holding `workspace` files."""
    dir.mkdir(parents=True, exist_ok=True)
    ws = dir / "ws"
    ws.mkdir(exist_ok=True)
    for rel, text in (workspace or {}).items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    body = "workspace: ws\njob: |\n" + "".join(f"  {ln}\n" for ln in job.splitlines()) + extra
    path = dir / name
    path.write_text(body)
    return path


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A scratch directory that jobs can write to as well as the test: a root agent runs jobs as fedml-job, which
    cannot reach pytest's 0700 tmp_path. World-writable and sticky, like /tmp; the job user gets search (x) on
    the directories above it."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    if os.getuid() == 0:
        from agents.jobuser import grant_traverse, resolve

        grant_traverse([d], resolve("fedml-job"))
    return d
