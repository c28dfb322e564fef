"""Workspace archives that would write outside their directory (tar-slip) are refused: by
scheduler.contract.archive.check, and by a real scheduler process over HTTP, which then keeps nothing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scheduler.contract.archive import UnsafeArchive, unpack
from scheduler.contract.archive import check as check_archive

from .conftest import ROOT

# ---- archives ------------------------------------------------------------------------------------------------


def _file(name: str, data: bytes = b"x\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _link(name: str, target: str, *, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def make_tgz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A gzipped tar holding exactly these members (names not normalised, as an attacker would write them)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


GOOD_MEMBERS = [_file("main.py", b"print('hi')\n")]

# id -> (archive, the member the refusal must name)
EVIL: dict[str, tuple[bytes, str]] = {
    "dotdot": (make_tgz(*GOOD_MEMBERS, _file("../evil")), "../evil"),
    "dotdot-nested": (make_tgz(*GOOD_MEMBERS, _file("sub/../../evil")), "sub/../../evil"),
    "absolute": (make_tgz(*GOOD_MEMBERS, _file("/tmp/evil")), "/tmp/evil"),
    "symlink-outside": (make_tgz(*GOOD_MEMBERS, _link("link", "../../etc")), "link"),
    "symlink-deep-outside": (make_tgz(_dir("a"), _link("a/link", "../../etc/passwd")), "a/link"),
    "symlink-absolute": (make_tgz(_link("link", "/etc")), "link"),
    "hardlink-outside": (make_tgz(*GOOD_MEMBERS, _link("hard", "../../etc/passwd", hard=True)), "hard"),
    "hardlink-absolute": (make_tgz(_link("hard", "/etc/passwd", hard=True)), "hard"),
}


def _device() -> bytes:
    info = tarfile.TarInfo("dev")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return make_tgz((info, None))


def good_tgz() -> bytes:
    return make_tgz(_dir("pkg"), _file("pkg/__init__.py", b""), _file("main.py", b"print('hi')\n"),
                    _link("pkg/alias.py", "../main.py"), _link("same", "main.py", hard=True))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- (i) check_archive ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(EVIL))
def test_check_archive_refuses(case: str, tmp_path: Path) -> None:
    data, member = EVIL[case]
    path = tmp_path / "ws.tar.gz"
    path.write_bytes(data)
    with pytest.raises(UnsafeArchive) as info:
        check_archive(path)
    assert str(info.value).startswith(f"{member}: "), str(info.value)


@pytest.mark.parametrize("case", list(EVIL))
def test_unpack_refuses_and_writes_nothing(case: str, tmp_path: Path) -> None:
    data, _ = EVIL[case]
    archive = tmp_path / "ws.tar.gz"
    archive.write_bytes(data)
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ws.tar.gz"]
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "a" / "link").exists()


def test_check_archive_refuses_device_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "ws.tar.gz"
    path.write_bytes(_device())
    with pytest.raises(UnsafeArchive, match="^dev: .*special file"):
        check_archive(path)
    path.write_bytes(b"this is not a tar archive at all" * 50)
    with pytest.raises(UnsafeArchive, match="not a readable tar archive"):
        check_archive(path)
    path.write_bytes(good_tgz()[:60])  # truncated
    with pytest.raises(UnsafeArchive, match="not a readable tar archive"):
        check_archive(path)


def test_check_archive_accepts_good_and_unpack_works(tmp_path: Path) -> None:
    path = tmp_path / "ws.tar.gz"
    path.write_bytes(good_tgz())
    assert check_archive(path).unpacked_bytes == 2 * len(b"print('hi')\n")  # the hard link is a copy
    unpack(path, tmp_path / "out")
    assert (tmp_path / "out" / "main.py").read_text() == "print('hi')\n"
    assert (tmp_path / "out" / "pkg" / "alias.py").read_text() == "print('hi')\n"
    assert (tmp_path / "out" / "same").read_text() == "print('hi')\n"


# ---- (ii) the scheduler over HTTP ----------------------------------------------------------------------------

@dataclass
class Server:
    url: str
    token: str
    home: Path
    proc: subprocess.Popen[bytes]

    @property
    def blobs(self) -> Path:
        return self.home / "local" / "blobs"

    def files(self) -> set[str]:
        if not self.blobs.exists():
            return set()
        return {str(p.relative_to(self.blobs)) for p in self.blobs.rglob("*") if not p.is_dir()}

    def assert_clean(self, before: set[str]) -> None:
        """Nothing new under blobs/, no temp upload left, and every stored file is a verified blob."""
        now = self.files()
        assert now == before, f"a refused upload left files behind: {sorted(now - before)}"
        for rel in now:
            if rel.endswith(".owners"):  # who uploaded the blob beside it
                assert (self.blobs / rel).with_suffix("").is_file(), rel
                continue
            prefix, name = rel.split("/")
            assert name[:2] == prefix and hashlib.sha256((self.blobs / rel).read_bytes()).hexdigest() == name

    def client(self, token: str | None = "") -> httpx.Client:
        tok = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("sched")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FEDML_HOME", "FEDML_SERVER", "FEDML_API_KEY", "FEDML_SCHEDULER_TOKEN")}
    log = open(home / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--port", "0",
                             "--no-agent", "--quiet", "--max-workspace-mb", "1"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        state = home / "local" / "scheduler.json"
        deadline = time.monotonic() + 30
        url = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"scheduler exited with {proc.returncode}: {(home / 'server.log').read_text()}")
            if state.exists():
                try:
                    url = json.loads(state.read_text())["url"]
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except (ValueError, KeyError, httpx.HTTPError):
                    pass
            time.sleep(0.05)
        else:
            pytest.fail(f"scheduler did not come up: {(home / 'server.log').read_text()}")
        assert url is not None
        token = (home / "local" / "token").read_text().strip()
        yield Server(url=url, token=token, home=home, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.parametrize("case", list(EVIL))
def test_scheduler_refuses_evil_upload(case: str, server: Server) -> None:
    data, member = EVIL[case]
    digest = sha(data)
    before = server.files()
    with server.client() as c:
        r = c.put(f"/blobs/{digest}", content=data, headers={"Content-Type": "application/gzip"})
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert member in detail, detail
        assert "refused" in detail
        assert c.head(f"/blobs/{digest}").status_code == 404
        assert c.get(f"/blobs/{digest}").status_code == 404
    server.assert_clean(before)
    assert server.proc.poll() is None


def test_scheduler_accepts_good_upload(server: Server) -> None:
    data = good_tgz()
    digest = sha(data)
    with server.client() as c:
        assert c.head(f"/blobs/{digest}").status_code == 404
        r = c.put(f"/blobs/{digest}", content=data)
        assert r.status_code == 201, r.text
        assert r.json()["stored"] is True and r.json()["size"] == len(data)
        assert c.head(f"/blobs/{digest}").status_code == 200
        got = c.get(f"/blobs/{digest}")
        assert got.status_code == 200 and got.content == data
        again = c.put(f"/blobs/{digest}", content=data)  # content-addressed: already there
        assert again.status_code == 201 and again.json()["stored"] is False
    assert f"{digest[:2]}/{digest}" in server.files()
    assert (server.blobs / digest[:2] / digest).read_bytes() == data


def test_scheduler_refuses_wrong_sha(server: Server) -> None:
    data = make_tgz(_file("other.py", b"print('other')\n"))
    wrong = sha(data + b"!")
    before = server.files()
    with server.client() as c:
        r = c.put(f"/blobs/{wrong}", content=data)
        assert r.status_code == 400, r.text
        assert "does not match" in r.json()["detail"]
        assert c.head(f"/blobs/{wrong}").status_code == 404
        assert c.head(f"/blobs/{sha(data)}").status_code == 404
        r = c.put("/blobs/not-a-sha", content=data)
        assert r.status_code == 400 and "sha256" in r.json()["detail"]
        r = c.put(f"/blobs/{sha(data).upper()}", content=data)
        assert r.status_code == 400
    server.assert_clean(before)


def test_scheduler_requires_token(server: Server) -> None:
    data = make_tgz(_file("t.py"))
    digest = sha(data)
    before = server.files()
    for token in (None, "wrong-token"):
        with server.client(token=token) as c:
            assert c.put(f"/blobs/{digest}", content=data).status_code == 401
            assert c.head(f"/blobs/{digest}").status_code == 401
    r = httpx.put(f"{server.url}/api/v1/blobs/{digest}", content=data, headers={"Authorization": server.token})
    assert r.status_code == 401  # no "Bearer" scheme
    with server.client() as c:
        assert c.head(f"/blobs/{digest}").status_code == 404
    server.assert_clean(before)


def test_scheduler_refuses_too_large_upload(server: Server) -> None:
    """--max-workspace-mb 1: a 2 MiB archive is refused while streaming, and no partial file remains."""
    data = make_tgz(_file("big.bin", os.urandom(2 * 1024 * 1024)))
    assert len(data) > 1024 * 1024
    digest = sha(data)
    before = server.files()
    with server.client() as c:
        r = c.put(f"/blobs/{digest}", content=data)
        assert r.status_code == 413, r.text
        assert "larger than the limit" in r.json()["detail"]
    with server.client() as c:
        assert c.head(f"/blobs/{digest}").status_code == 404
    server.assert_clean(before)
    assert server.proc.poll() is None


def test_scheduler_refuses_archive_that_unpacks_too_large(server: Server) -> None:
    """A small upload that unpacks past 4x the limit (a zip bomb) is refused too."""
    data = make_tgz(_file("zeros.bin", bytes(5 * 1024 * 1024)))
    assert len(data) < 1024 * 1024
    digest = sha(data)
    before = server.files()
    with server.client() as c:
        r = c.put(f"/blobs/{digest}", content=data)
        assert r.status_code == 413, r.text
        assert "unpacks to more than" in r.json()["detail"]
        assert c.head(f"/blobs/{digest}").status_code == 404
    server.assert_clean(before)


def test_scheduler_refuses_non_archive(server: Server) -> None:
    data = b"definitely not a tar.gz\n" * 10
    digest = sha(data)
    before = server.files()
    with server.client() as c:
        r = c.put(f"/blobs/{digest}", content=data)
        assert r.status_code == 400 and "not a readable tar archive" in r.json()["detail"]
        assert c.head(f"/blobs/{digest}").status_code == 404
    server.assert_clean(before)
