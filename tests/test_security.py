"""Attacks, as a hostile job, user or node would make them, through the real CLI and HTTP API (docs/security.md).

A head with two nodes joined as root (jobs run as fedml-job), an admin and two users. Each test names the
finding it guards against.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from scheduler.contract.archive import TooLarge, UnsafeArchive, check, unpack

from .cluster import Cluster, start_cluster
from .conftest import FEDML, Fedml, write_job
from .procs import free_port, wait_for

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="jobs run as another user only under a root agent (CI is root)")


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path_factory.mktemp("sec"), ("s1", "s2"), torch=False)


def _user(c: Cluster, name: str) -> str:
    r = c.fedml("scheduler", "key", "create", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _api(c: Cluster, key: str) -> httpx.Client:
    return httpx.Client(base_url=c.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _launch(c: Cluster, tmp: Path, script: str, key: str | None = None, extra: str = "",
            workspace: dict[str, str] | None = None) -> str:
    env = {"FEDML_SERVER": c.url, "FEDML_API_KEY": key or c.admin}
    r = Fedml(c.base / "client")("launch", str(write_job(tmp, script, extra=extra, workspace=workspace)), "--detach",
                                 env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _finish(c: Cluster, run_id: str, timeout: float = 60) -> dict:
    with _api(c, c.admin) as api:
        return wait_for(f"run {run_id} to end", lambda: (r if (r := api.get(f"/runs/{run_id}").json())["status"] in (
            "FINISHED", "FAILED", "KILLED") else None), timeout)


def _text(c: Cluster, run_id: str) -> str:
    return "\n".join(line for lines in c.logs(run_id).values() for line in lines)


# ---- credentials out of every job's reach --------------------------------------------------------------------

@ROOT_ONLY
def test_a_job_reads_no_key_token_or_other_run(c: Cluster, tmp_path: Path) -> None:
    """Found: a job read its agent's join key from /proc/<agent>/environ, the admin token through
    $FEDML_RUN_DIR/../../../token, and its node's node_token next to its run dir."""
    nodes = sorted((c.base / "agents" / "nodes").iterdir())
    secrets = {c.admin} | {(n / "node_token").read_text().strip() for n in nodes}
    paths = [str(n / "node_token") for n in nodes] + [str(c.base / "head" / "local" / "token"),
                                                     str(c.base / "head" / "local" / "scheduler.db")]
    script = "\n".join([
        "set +e",
        'echo "whoami=$(id -un)"',
        # every process's environment and argv that this uid can read: the agents' included
        "for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null; tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
        'cat "$FEDML_RUN_DIR/../../node_token" "$FEDML_RUN_DIR/../../../token" 2>&1',
        'ls "$FEDML_RUN_DIR/.." "$FEDML_RUN_DIR/../../runs" "$FEDML_RUN_DIR/../../blobs" 2>&1',
        *[f'cat "{p}" 2>&1 | head -c 300; echo' for p in paths],
        "env | grep -i -e key -e token",
        "echo done-probing",
    ])
    run = _launch(c, tmp_path / "probe", script)
    got = _finish(c, run)
    text = _text(c, run)
    assert got["status"] == "FINISHED", (got, text)
    assert "whoami=fedml-job" in text and "done-probing" in text, text
    for s in secrets:
        assert s not in text, f"a secret ({s[:8]}...) reached the job"
    assert text.count("Permission denied") >= len(paths), text
    # and none of it is in an agent's argv or environment
    for n in nodes:
        p = psutil.Process(int((n / "agent.pid").read_text()))
        blob = " ".join(p.cmdline()) + " " + json.dumps(p.environ())
        assert not any(s in blob for s in secrets)
        assert not (n / ".join-key").exists()  # the hand-off file is gone once read


def test_login_takes_the_key_out_of_argv(c: Cluster, tmp_path: Path) -> None:
    """`fedml login KEY ...` re-executes itself without KEY: /proc/PID/cmdline never keeps it for long."""
    key = _user(c, "argv-user")
    home = tmp_path / "h"
    # a server that accepts the connection and never answers: login waits, so its argv can be read
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    p = subprocess.Popen([FEDML, "login", key, "--server", f"http://127.0.0.1:{srv.getsockname()[1]}"],
                         env=Fedml(home).env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        conn, _ = srv.accept()  # it reached the request: the re-exec has happened
        cmd = " ".join(psutil.Process(p.pid).cmdline())
        assert "login" in cmd and key not in cmd, cmd
        conn.close()
    finally:
        p.kill()
        p.wait()
        srv.close()


# ---- who may register a node ---------------------------------------------------------------------------------

def _register(c: Cluster, key: str, name: str, **extra: object) -> httpx.Response:
    with _api(c, key) as api:
        return api.post("/nodes/register", json={"name": name, "gpus": [], "cpus": 1, "job_user": "fedml-job", **extra})


def test_a_user_key_joins_only_a_private_node(c: Cluster, tmp_path: Path) -> None:
    """Found: any user key registered a node, received another user's runs, read their secrets."""
    mallory, victim = _user(c, "mallory"), _user(c, "victim")
    r = _register(c, mallory, "trap", labels={"trap": "1"})
    assert r.status_code == 200, r.text
    node = r.json()["node"]
    assert node["owner"] == "mallory"
    # the victim's run that only the trap could take is refused at launch, naming why; nothing reaches the trap
    bad = Fedml(c.base / "client")("launch", str(write_job(tmp_path / "v", "echo secret=$S", extra="labels:\n  trap: '1'\n")),
                                   "--detach", env={"FEDML_SERVER": c.url, "FEDML_API_KEY": victim})
    assert bad.returncode == 2 and "private to another user" in bad.stderr, bad.stderr
    with _api(c, r.json()["node_token"]) as trap:
        polled = trap.post(f"/nodes/{node['id']}/poll", json={"running": [], "wait": 0}).json()
        assert polled["start"] == []
    # the node list says whose it is
    listed = c.fedml("node", "list")
    assert "single-tenant: mallory" in listed.stdout, listed.stdout
    assert c.fedml("node", "remove", "trap").returncode == 0


def test_a_node_name_is_not_taken_over_and_remove_sticks(c: Cluster) -> None:
    """Found: while a node was offline a user re-registered its name, took its id and revoked the real agent's
    key; `fedml node remove` did not stick (the agent re-registered within a second)."""
    mallory = _user(c, "mallory2")
    r = _register(c, mallory, "s1")
    assert r.status_code == 409 and "exists already" in r.text, r.text
    r = _register(c, c.admin, "s1")  # not even an admin, without removing it first
    assert r.status_code == 409
    nodes = {n["name"]: n for n in c.json("node", "list")}
    assert nodes["s1"]["state"] == "ONLINE"
    pid = int((c.base / "agents" / "nodes" / "s2" / "agent.pid").read_text())
    assert c.fedml("node", "remove", "s2").returncode == 0
    wait_for("the removed node's agent to exit", lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 20)
    # Its agent has exited: whatever it registered on the way out is in the list now.
    assert "s2" not in {n["name"] for n in c.json("node", "list")}
    log = (c.base / "agents" / "nodes" / "s2" / "agent.log").read_text()
    assert "removed" in log
    # it can join again only anew, with a new id
    again = c.agents("login", c.admin, "--server", c.url, "--node", "--name", "s2", timeout=60)
    assert again.returncode == 0, again.stderr
    assert {n["name"]: n for n in c.json("node", "list")}["s2"]["id"] != nodes["s2"]["id"]


def test_join_tokens_single_use_expiry_labels_and_scope(c: Cluster) -> None:
    r = c.fedml("scheduler", "token", "create", "--node", "--label", "pool=gpu-a", "--json")
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["secret"]
    with _api(c, token) as api:
        assert api.get("/runs").status_code == 403  # a join token registers nodes, nothing else
    first = _register(c, token, "tok-1", labels={"pool": "forged"})
    assert first.status_code == 200 and first.json()["node"]["labels"]["pool"] == "gpu-a", first.text
    assert _register(c, token, "tok-2").status_code == 401  # single use
    r = c.fedml("scheduler", "token", "create", "--node", "--ttl", "1s", "--json")
    short = json.loads(r.stdout)["secret"]
    time.sleep(1.2)
    assert _register(c, short, "tok-3").status_code == 401  # expired
    listed = c.fedml("scheduler", "key", "list", "--json").stdout
    assert token not in listed and short not in listed
    assert c.fedml("node", "remove", "tok-1").returncode == 0


# ---- blobs, logs, artifacts ----------------------------------------------------------------------------------

def test_blobs_are_private_to_who_uploaded_them(c: Cluster, tmp_path: Path) -> None:
    """Found: any key downloaded any blob by sha (others' workspaces) and could probe their existence."""
    alice, eve = _user(c, "alice-b"), _user(c, "eve-b")
    run = _launch(c, tmp_path / "a", "cat secret.txt", key=alice, workspace={"secret.txt": "alice's secret\n"})
    _finish(c, run)
    with _api(c, c.admin) as api:
        sha = api.get(f"/runs/{run}").json()["workspace_sha"]
    with _api(c, eve) as api:
        assert api.head(f"/blobs/{sha}").status_code == 404
        assert api.get(f"/blobs/{sha}").status_code == 404
        r = api.post("/runs", json={"job": {"job": "cat secret.txt", "workspace": "ws"}, "workspace_sha": sha})
        assert r.status_code == 400 and "has not been uploaded" in r.text
    with _api(c, alice) as api:
        assert api.head(f"/blobs/{sha}").status_code == 200


def test_node_writes_only_to_live_attempts(c: Cluster, tmp_path: Path) -> None:
    """Found: a node key attached a foreign blob as an artifact of a finished run, and appended forged lines to a
    finished run with any attempt number."""
    run = _launch(c, tmp_path / "r", "echo real")
    done = _finish(c, run)
    node_id = done["placements"][0]["node_id"]
    name = next(n["name"] for n in c.json("node", "list") if n["id"] == node_id)
    token = (c.base / "agents" / "nodes" / name / "node_token").read_text().strip()
    with _api(c, token) as api:
        for attempt in (1, 2, 7):
            r = api.post(f"/runs/{run}/logs", json={"rank": 0, "attempt": attempt, "first_seq": 1,
                                                    "lines": [[time.time(), "stdout", "forged"]]})
            assert r.status_code in (403, 409), r.text
        sha = done["workspace_sha"] or "0" * 64
        r = api.put(f"/runs/{run}/artifacts", params={"sha256": sha, "rank": 0, "attempt": 1}, content=b"")
        assert r.status_code in (403, 409), r.text
    assert _text(c, run) == "real"


# ---- archives ------------------------------------------------------------------------------------------------

def _tgz(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes], end: bool = True) -> bytes:
    raw = io.BytesIO()
    tar = tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed only when `end`
    for m in members:
        info, data = m if isinstance(m, tuple) else (m, None)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if end:
        tar.close()
        body = raw.getvalue()
    else:
        body = raw.getvalue()  # no end-of-archive blocks: a tar cut short at a member boundary
    return gzip.compress(body, mtime=0)


def _m(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes | None = None) -> tarfile.TarInfo | tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if data is not None:
        info.size = len(data)
        return info, data
    return info


def _chain(depth: int) -> list:
    """The CVE-2025-4517 shape: symlinks whose lexical path stays inside but whose chain resolves outside."""
    out = []
    comp = "d" * 200
    path = ""
    for i in range(depth):
        out.append(_m(f"{path}{comp}", tarfile.DIRTYPE))
        out.append(_m(f"{path}l{i}", tarfile.SYMTYPE, link=comp))
        path += f"{comp}/"
    out.append(_m("lnk", tarfile.SYMTYPE, link="/".join(f"l{i}" for i in range(depth)) + "/" + "../" * (depth + 3)))
    out.append(_m("lnk/escape", data=b"outside\n"))
    return out


EVIL = {
    "symlink-chain": [_m("a", tarfile.SYMTYPE, link="."), _m("b", tarfile.SYMTYPE, link="a/a/a/../../..")],
    "path-max-chain": _chain(16),
    "through-symlink": [_m("sub", tarfile.SYMTYPE, link="."), _m("sub/x", data=b"x")],
    "hardlink-outside": [_m("h", tarfile.LNKTYPE, link="../../etc/passwd")],
    "hardlink-to-symlink": [_m("s", tarfile.SYMTYPE, link="x"), _m("x", data=b"x"), _m("h", tarfile.LNKTYPE, link="s")],
    "file-then-link": [_m("f", data=b"x"), _m("f", tarfile.SYMTYPE, link="g")],
    "dir-then-file": [_m("d/x", data=b"x"), _m("d", data=b"y")],
    "fifo": [_m("p", tarfile.FIFOTYPE)],
    "deep": [_m("/".join(["d"] * 80) + "/x", data=b"x")],
}


@pytest.mark.parametrize("case", list(EVIL))
def test_archive_refused_and_nothing_outside(case: str, tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(_tgz(*EVIL[case]))
    with pytest.raises(UnsafeArchive):
        check(path)
    dest = tmp_path / "box" / "dest"
    with pytest.raises(UnsafeArchive):
        unpack(path, dest)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["dest"]
    assert not any(p.name in ("escape", "outside") for p in tmp_path.rglob("*"))


def test_truncated_tar_in_valid_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.tgz"
    path.write_bytes(_tgz(_m("a.py", data=b"print(1)\n"), _m("b.py", data=b"print(2)\n"), end=False))
    with pytest.raises(UnsafeArchive, match="truncated"):
        check(path)


def test_unpack_never_follows_a_symlink_already_in_the_destination(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    path = tmp_path / "a.tgz"
    path.write_bytes(_tgz(_m("sub/x", data=b"x")))
    with pytest.raises(UnsafeArchive):
        unpack(path, dest)
    assert list(outside.iterdir()) == []


def test_member_count_and_ratio_limits(tmp_path: Path) -> None:
    from scheduler.contract.archive import Limits

    path = tmp_path / "many.tgz"
    path.write_bytes(_tgz(*[_m(f"f{i}", data=b"") for i in range(50)]))
    with pytest.raises(TooLarge, match="more than 10 members"):
        check(path, Limits(members=10))
    bomb = tmp_path / "bomb.tgz"
    bomb.write_bytes(_tgz(_m("zeros", data=bytes(8 << 20))))
    with pytest.raises(TooLarge, match="compression bomb"):
        check(bomb, Limits(ratio_floor=1 << 20))


def _bomb(members: int, size: int) -> bytes:
    """A gzip stream of `members` files of `size` zero bytes, built from one compressed block reused (gzip
    members concatenate): megabytes on the wire, gigabytes to read."""
    zeros = gzip.compress(bytes(size), compresslevel=9, mtime=0)
    out = []
    for i in range(members):
        info = tarfile.TarInfo(f"z{i}")
        info.size = size
        out.append(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
        out.append(zeros)
    out.append(gzip.compress(bytes(1024), mtime=0))
    return b"".join(out)


def test_bombs_do_not_stall_heartbeats(c: Cluster) -> None:
    """Found: a 2 MB gzip bomb froze the scheduler for 22 s; three made a healthy node look offline."""
    import hashlib

    data = _bomb(200, 8 << 20)  # 1.6 GiB declared, ~1.6 MB on the wire
    sha = hashlib.sha256(data).hexdigest()
    node = next(n for n in c.json("node", "list") if n["name"] == "s1")
    token = (c.base / "agents" / "nodes" / "s1" / "node_token").read_text().strip()
    results: list[int] = []

    def upload() -> None:
        with _api(c, c.admin) as api:
            results.append(api.put(f"/blobs/{sha}", content=data, timeout=120).status_code)

    workers = [threading.Thread(target=upload) for _ in range(3)]
    for w in workers:
        w.start()
    worst = 0.0
    with _api(c, token) as api:
        while any(w.is_alive() for w in workers):
            t0 = time.monotonic()
            assert httpx.get(c.url + "/healthz", timeout=5).status_code == 200
            assert api.post(f"/nodes/{node['id']}/poll", json={"running": [], "wait": 0}).status_code == 200
            worst = max(worst, time.monotonic() - t0)
    for w in workers:
        w.join()
    assert results == [413, 413, 413], results
    assert worst < 1.0, f"a heartbeat took {worst:.2f} s while bombs were checked"
    assert all(n["state"] == "ONLINE" for n in c.json("node", "list"))


# ---- request bodies, the gateway -----------------------------------------------------------------------------

def test_no_body_is_read_before_the_key_and_bodies_are_capped(c: Cluster) -> None:
    """Found: a 300 MB POST with no token was buffered whole before the 401 (RSS +800 MB); a 20 MB job document
    was accepted."""
    head = psutil.Process(c.head.pid)  # type: ignore[union-attr]
    before = head.memory_info().rss

    def body() -> Iterator[bytes]:
        chunk = b"x" * (1 << 20)
        for _ in range(300):
            yield chunk

    try:
        r = httpx.post(c.url + "/api/v1/runs", content=body(), timeout=30)
        assert r.status_code == 401
    except httpx.TransportError:
        pass  # the server answered 401 and closed while we were still sending: as good
    assert head.memory_info().rss - before < 100 << 20
    with _api(c, c.admin) as api:
        big = {"job": {"job": "echo hi", "x": "y" * (20 << 20)}}
        r = api.post("/runs", json=big)
        assert r.status_code == 413, r.status_code


def test_gateway_refuses_replica_ports_it_did_not_assign(c: Cluster) -> None:
    """Found: a fake node made the gateway fetch the scheduler's own API (SSRF)."""
    mallory = _user(c, "mallory3")
    reg = _register(c, mallory, "ssrf", job_user=None, labels={"ssrf": "1"})
    node = reg.json()["node"]
    with _api(c, mallory) as api:
        run = api.post("/runs", json={"job": {"job": "sleep 60", "job_type": "serve", "labels": {"ssrf": "1"},
                                              "service": {"name": "ssrf-ep"}}})
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
    with _api(c, reg.json()["node_token"]) as trap:
        wait_for("the endpoint to be placed on the trap", lambda: trap.post(
            f"/nodes/{node['id']}/poll", json={"running": [], "wait": 0}).json()["start"], 20)
        for port in (c.port, 22, 80):
            r = trap.put(f"/runs/{run_id}/replicas", params={"node_id": node["id"]},
                         json={"attempt": 1, "replicas": [{"index": 0, "port": port, "state": "ready"}]})
            assert r.status_code == 422, (port, r.text)
    c.fedml("run", "stop", run_id)
    assert c.fedml("node", "remove", "ssrf").returncode == 0


def test_head_on_a_public_address_starts_no_agent_by_default(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "head"
    p = subprocess.Popen([FEDML, "scheduler", "start", "--host", "0.0.0.0", "--port", str(port)],
                         env=Fedml(home).env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for("the head", lambda: _up(port), 30)
        p.terminate()
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert "no local agent" in err and "token create --node" in err, err
    assert not (home / "local" / "agent").exists()
    token = (home / "local" / "token").read_text().strip()
    assert token not in err  # stderr is a pipe here, not a terminal


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@ROOT_ONLY
def test_a_non_root_agent_makes_a_single_tenant_node(c: Cluster, tmp_path: Path) -> None:
    """An agent that is not root cannot keep jobs from its key: whoever joins it, its node runs only the runs of
    whoever joined it, and says so."""
    import pwd

    from agents.jobuser import JobUser, _create, grant_traverse, interpreter_paths

    pw = _create("fedml-test-agent")
    agent_user = JobUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid)
    home = tmp_path / "nonroot-home"
    home.mkdir()
    os.chown(home, agent_user.uid, agent_user.gid)
    grant_traverse([home, *interpreter_paths()], agent_user)
    token = json.loads(c.fedml("scheduler", "token", "create", "--node", "--json").stdout)["secret"]
    env = {**Fedml(home).env(), "HOME": str(home), "USER": agent_user.name, "PATH": os.environ["PATH"]}
    as_user = ["runuser", "-u", agent_user.name, "--"]
    r = subprocess.run([*as_user, FEDML, "login", "--server", c.url, "--node", "--name", "nr1", "--label", "nr=1"],
                       input=token + "\n", capture_output=True, text=True, env=env, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        node = next(n for n in c.json("node", "list") if n["name"] == "nr1")
        assert node["owner"] == "admin" and node["job_user"] is None, node
        assert "single-tenant: admin" in c.fedml("node", "list").stdout
        assert pwd.getpwuid(os.stat(home / "nodes" / "nr1" / "node_token").st_uid).pw_name == agent_user.name
        other = _user(c, "nr-user")
        bad = Fedml(c.base / "client")("launch", str(write_job(tmp_path / "b", "id -un", extra="labels:\n  nr: '1'\n")),
                                       "--detach", env={"FEDML_SERVER": c.url, "FEDML_API_KEY": other})
        assert bad.returncode == 2 and "private to another user" in bad.stderr, bad.stderr
        run = _launch(c, tmp_path / "a", "id -un", extra="labels:\n  nr: '1'\n")
        assert _finish(c, run)["status"] == "FINISHED"
        assert _text(c, run) == agent_user.name  # the joiner's run, as the agent's own user
        env_out = subprocess.run([*as_user, FEDML, "env"], capture_output=True, text=True, env=env, timeout=60)
        assert "single-tenant" in env_out.stdout, env_out.stdout
    finally:
        out = subprocess.run([*as_user, FEDML, "logout"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
