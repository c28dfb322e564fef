"""Routes in process: the app over a real store, driven by FastAPI's TestClient (no server process, no port).
What the end-to-end tests check over real HTTP, these check at the speed of a function call."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler import auth
from scheduler.app import Settings, create_app
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    store = SQLiteStore(tmp_path / "s.db")
    keys = {name: auth.issue(store, name=name, scope=scope, owner=name if scope == "user" else "admin")[1]
            for name, scope in (("admin", "admin"), ("alice", "user"), ("bob", "user"))}
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs"))) as c:
        yield c, keys
    store.close()


def as_(keys: dict[str, str], who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[who]}"}


def test_a_run_is_launched_listed_and_hidden_from_others(client: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = client
    r = c.post("/api/v1/runs", json={"job": {"job": "echo hi"}, "name": "hello"}, headers=as_(keys, "alice"))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "QUEUED" and run["owner"] == "alice" and run["job"]["job"] == "echo hi"
    assert c.get(f"/api/v1/runs/{run['id']}", headers=as_(keys, "alice")).json()["id"] == run["id"]
    assert c.get(f"/api/v1/runs/{run['id']}", headers=as_(keys, "bob")).status_code == 404
    assert [x["id"] for x in c.get("/api/v1/runs", headers=as_(keys, "admin")).json()] == [run["id"]]
    assert c.get("/api/v1/runs", headers=as_(keys, "bob")).json() == []


def test_refusals_map_to_their_statuses(client: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = client
    assert c.get("/api/v1/runs").status_code == 401
    assert c.get("/api/v1/runs").headers["www-authenticate"] == "Bearer"
    assert c.post("/api/v1/runs", json={"job": {"job": ""}}, headers=as_(keys, "alice")).status_code == 422
    assert c.get("/api/v1/keys", headers=as_(keys, "alice")).status_code == 403
    assert c.get("/api/v1/runs/run-nope", headers=as_(keys, "alice")).status_code == 404
    assert c.post("/api/v1/runs/run-x/logs", json={"attempt": 1, "rank": 0, "first_seq": 0, "lines": []},
                  headers=as_(keys, "alice")).status_code == 403  # agents use their node key
    assert c.head("/api/v1/blobs/not-a-digest", headers=as_(keys, "alice")).status_code == 400
    assert c.get("/healthz").json()["ok"] is True


def test_a_batch_of_runs_is_written_whole_or_not_at_all(client: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = client
    jobs = [{"job": {"job": f"echo {i}"}, "name": f"sweep-{i}"} for i in range(50)]
    r = c.post("/api/v1/runs/batch", json={"runs": jobs}, headers=as_(keys, "alice"))
    assert r.status_code == 201, r.text
    made = r.json()
    assert [x["name"] for x in made] == [f"sweep-{i}" for i in range(50)] and {x["owner"] for x in made} == {"alice"}
    listed = c.get("/api/v1/runs", headers=as_(keys, "alice")).json()
    assert len(listed) == 50
    bad = [*jobs[:3], {"job": {"job": ""}}, *jobs[3:6]]  # the fourth is invalid: nothing of the batch is written
    r = c.post("/api/v1/runs/batch", json={"runs": bad}, headers=as_(keys, "alice"))
    assert r.status_code == 422 and "runs[3]" in r.json()["detail"], r.text
    assert len(c.get("/api/v1/runs", headers=as_(keys, "alice")).json()) == 50
    assert c.post("/api/v1/runs/batch", json={"runs": []}, headers=as_(keys, "alice")).status_code == 422
    too_many = {"runs": [{"job": {"job": "echo"}}] * 1001}
    assert c.post("/api/v1/runs/batch", json=too_many, headers=as_(keys, "alice")).status_code == 422
    serve = {"runs": [{"job": {"job": "python -m http.server", "job_type": "serve"}}]}
    r = c.post("/api/v1/runs/batch", json=serve, headers=as_(keys, "alice"))
    assert r.status_code == 422 and "on its own" in r.text, r.text


def test_a_job_file_sent_as_text_is_read_and_validated_by_the_scheduler(client: tuple[TestClient, dict[str, str]]) -> None:
    """What `fedml launch` sends when a scheduler runs: the file's text; errors name the file and line, typo
    warnings come back with the run, and a run carries a document or a text, never both."""
    c, keys = client
    text = "job_name: t\njob: echo hi\ncomputing:\n  minimum_num_gpu: 2\n  device_type: CPU\n"
    r = c.post("/api/v1/runs", json={"job_text": text, "job_file": "jobs/t.yaml"}, headers=as_(keys, "alice"))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["job"]["job"] == "echo hi" and run["name"] == "t" and run["job_file"] == "t.yaml"
    assert run["warnings"] == ["jobs/t.yaml:4: computing.minimum_num_gpu: unknown key (did you mean minimum_num_gpus?)"]
    bad = "job: echo hi\ncomputing:\n  minimum_num_gpus: -1\n"
    r = c.post("/api/v1/runs", json={"job_text": bad, "job_file": "b.yaml"}, headers=as_(keys, "alice"))
    assert r.status_code == 422 and r.json()["detail"].startswith("b.yaml:3: computing.minimum_num_gpus: "), r.text
    r = c.post("/api/v1/runs", json={"job_text": "job: [echo\n", "job_file": "s.yaml"}, headers=as_(keys, "alice"))
    assert r.status_code == 422 and r.json()["detail"].startswith("s.yaml:1: YAML syntax error"), r.text
    both = {"job": {"job": "echo"}, "job_text": "job: echo"}
    assert c.post("/api/v1/runs", json=both, headers=as_(keys, "alice")).status_code == 422
    assert c.post("/api/v1/runs", json={"name": "x"}, headers=as_(keys, "alice")).status_code == 422
    assert len(c.get("/api/v1/runs", headers=as_(keys, "alice")).json()) == 1


def test_a_job_text_is_bounded_and_a_batch_takes_documents(client: tuple[TestClient, dict[str, str]]) -> None:
    """YAML is parsed in Python: the scheduler reads at most JOB_TEXT_MAX of it per run, and none in batches."""
    from scheduler.contract.jobyaml import JOB_TEXT_MAX

    c, keys = client
    big = "job: echo hi\n" + "# padding\n" * (JOB_TEXT_MAX // 10)
    r = c.post("/api/v1/runs", json={"job_text": big, "job_file": "big.yaml"}, headers=as_(keys, "alice"))
    assert r.status_code == 422, r.text
    batch = {"runs": [{"job": {"job": "echo"}}, {"job_text": "job: echo hi\n"}]}
    r = c.post("/api/v1/runs/batch", json=batch, headers=as_(keys, "alice"))
    assert r.status_code == 422 and "runs[1]" in r.text and "job_text" in r.text, r.text
    assert c.get("/api/v1/runs", headers=as_(keys, "alice")).json() == []


def test_log_lines_sent_as_columns_or_as_rows_are_stored_alike(client: tuple[TestClient, dict[str, str]]) -> None:
    """Agents send a batch as columns (a text per line; one time and stream for all, or one per line); agents
    before sent a (time, stream, text) row per line, and still may. A malformed batch is refused whole."""
    c, keys = client
    run = c.post("/api/v1/runs", json={"job": {"job": "echo"}}, headers=as_(keys, "alice")).json()["id"]
    url, admin = f"/api/v1/runs/{run}/logs", as_(keys, "admin")  # (an admin may write a run's log: tools)

    def post(**body: object) -> object:
        r = c.post(url, json={"rank": 0, "attempt": 1, **body}, headers=admin)
        return r.json()["next_seq"] if r.status_code == 200 else r.status_code

    assert post(first_seq=0, text=["a", "b"], ts=1.5, stream="stdout") == 2
    assert post(first_seq=2, text=["c", "d"], ts=[2.0, 2.5], stream=["stderr", "stdout"]) == 4
    assert post(first_seq=4, lines=[[3.0, "stderr", "e"]]) == 5
    assert post(first_seq=5, text=[], ts=4.0, stream="stdout") == 5
    for bad in ({"text": ["x"]}, {"text": ["x"], "ts": 1.0}, {"text": ["x"], "ts": [1.0, 2.0], "stream": "stdout"},
                {"text": ["x"], "ts": 1.0, "stream": ["stdout", "stderr"]}, {"text": ["x"], "ts": "soon", "stream": "o"},
                {"text": ["x"], "ts": 1.0, "stream": "stdout", "lines": [[1.0, "stdout", "y"]]}, {}):
        assert post(first_seq=5, **bad) == 422, bad
    rows = [json.loads(x) for x in c.get(url, headers=as_(keys, "alice")).text.splitlines()]
    assert [(r["seq"], r["ts"], r["stream"], r["line"]) for r in rows if "line" in r] == [
        (0, 1.5, "stdout", "a"), (1, 1.5, "stdout", "b"), (2, 2.0, "stderr", "c"), (3, 2.5, "stdout", "d"),
        (4, 3.0, "stderr", "e")]


def test_logs_read_as_text_records_end_with_the_runs_outcome(tmp_path: Path) -> None:
    """`fedml logs` reads the text form: a record per line, then "end TAB {json}"; owners only, as with NDJSON."""
    store = SQLiteStore(tmp_path / "s.db")
    alice = auth.issue(store, name="alice", scope="user", owner="alice")[1]
    bob = auth.issue(store, name="bob", scope="user", owner="bob")[1]
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs"))) as c:
        run = c.post("/api/v1/runs", json={"job": {"job": "echo"}}, headers={"Authorization": f"Bearer {alice}"}).json()
        store.append_logs(run["id"], 1, 0, 0, [(1.0, "stdout", "out\tcol"), (2.0, "stderr", "err")])
        r = c.get(f"/api/v1/runs/{run['id']}/logs", params={"format": "text"},
                  headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        *lines, end, tail = r.text.split("\n")
        assert lines == ["0\t0\to\tout\tcol", "1\t0\te\terr"] and tail == ""
        got = json.loads(end[4:]) if end.startswith("end\t") else {}
        assert {k: got.get(k) for k in ("end", "status", "exit_code", "next")} == {
            "end": True, "status": "QUEUED", "exit_code": None, "next": 2}
        assert c.get(f"/api/v1/runs/{run['id']}/logs", params={"format": "text", "after": 0},
                     headers={"Authorization": f"Bearer {alice}"}).text.startswith("1\t0\te\terr\nend\t")
        assert c.get(f"/api/v1/runs/{run['id']}/logs", params={"format": "text"},
                     headers={"Authorization": f"Bearer {bob}"}).status_code == 404
        assert c.get(f"/api/v1/runs/{run['id']}/logs", params={"format": "xml"},
                     headers={"Authorization": f"Bearer {alice}"}).status_code == 422
        for param in ("after", "tail"):  # past what the store can hold: refused, not a 500 from the database
            assert c.get(f"/api/v1/runs/{run['id']}/logs", params={param: 2**63},
                         headers={"Authorization": f"Bearer {alice}"}).status_code == 422
    store.close()


def test_lone_surrogates_anywhere_in_a_request_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    """JSON's "\\ud800" escape decodes to a lone surrogate, which no store can encode: 422 wherever it is (the job,
    the name, env, the job file's text, --after), never a 500, and no run is written."""
    store = SQLiteStore(tmp_path / "s.db")
    key = auth.issue(store, name="alice", scope="user", owner="alice")[1]
    h = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs")), raise_server_exceptions=False) as c:
        for body in ('{"job": {"job": "echo \\ud800"}}', '{"job": {"job": "echo"}, "name": "\\ud800"}',
                     '{"job": {"job": "echo"}, "env": {"A": "\\udfff"}}',
                     '{"job_text": "job: echo \\ud800", "job_file": "x.yaml"}',
                     '{"job": {"job": "echo"}, "after": ["\\ud800"]}'):
            r = c.post("/api/v1/runs", content=body, headers=h)
            assert r.status_code == 422 and "surrogate" in r.text, (body, r.status_code, r.text)
        assert c.get("/api/v1/runs", headers=h).json() == []
    store.close()


def _blob(c: TestClient, keys: dict[str, str], who: str, files: dict[str, str]) -> str:
    """Pack `files` (as `fedml storage upload` does) and upload the archive as `who`. Returns its sha256."""
    import tempfile

    from scheduler.contract.archive import pack

    with tempfile.TemporaryDirectory() as d:
        for rel, text in files.items():
            (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / rel).write_text(text)
        packed = pack(Path(d))
    data = Path(packed.path).read_bytes()
    Path(packed.path).unlink()
    r = c.put(f"/api/v1/blobs/{packed.sha256}", content=data, headers=as_(keys, who))
    assert r.status_code == 201, r.text
    return packed.sha256


def test_named_storage_is_its_owners_alone(client: tuple[TestClient, dict[str, str]]) -> None:
    """`fedml storage`: a name for an uploaded blob, seen, read, mounted and deleted by its owner only; a name
    cannot be given to someone else's blob (the hash alone must not lend it); nodes have no storage; a job's
    storage: resolves the caller's own names when launched."""
    c, keys = client
    sha = _blob(c, keys, "alice", {"train.csv": "a,b\n"})
    r = c.put("/api/v1/storage/mnist", json={"sha256": sha, "kind": "dir", "files": 1, "description": "digits"},
              headers=as_(keys, "alice"))
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "alice" and r.json()["size"] > 0
    assert [o["name"] for o in c.get("/api/v1/storage", headers=as_(keys, "alice")).json()] == ["mnist"]
    assert c.get("/api/v1/storage", headers=as_(keys, "bob")).json() == []
    assert c.get("/api/v1/storage/mnist", headers=as_(keys, "bob")).status_code == 404
    assert c.get("/api/v1/storage/mnist/data", headers=as_(keys, "bob")).status_code == 404
    assert c.get("/api/v1/storage/mnist?owner=alice", headers=as_(keys, "bob")).status_code == 403
    assert c.get("/api/v1/storage/mnist?owner=alice", headers=as_(keys, "admin")).json()["sha256"] == sha
    assert c.get("/api/v1/storage?everyone=true", headers=as_(keys, "bob")).status_code == 403
    # bob names alice's blob by its hash: refused, the same answer as a hash nobody uploaded
    stolen = c.put("/api/v1/storage/mine", json={"sha256": sha}, headers=as_(keys, "bob"))
    nothing = c.put("/api/v1/storage/mine", json={"sha256": "0" * 64}, headers=as_(keys, "bob"))
    assert stolen.status_code == nothing.status_code == 400 and stolen.json()["detail"].replace(
        sha[:12], "X") == nothing.json()["detail"].replace("0" * 12, "X")
    for bad in ("../x", "a" * 200, ".hidden"):
        assert c.put(f"/api/v1/storage/{bad}", json={"sha256": sha}, headers=as_(keys, "alice")).status_code in (
            400, 404, 422), bad
    job = {"job": "cat data/train.csv", "storage": [{"name": "mnist", "path": "data"}]}
    run = c.post("/api/v1/runs", json={"job": job}, headers=as_(keys, "alice"))
    assert run.status_code == 201, run.text
    assert run.json()["mounts"] == [{"name": "mnist", "path": "data", "sha256": sha, "kind": "dir",
                                     "filename": None}]
    theirs = c.post("/api/v1/runs", json={"job": job}, headers=as_(keys, "bob"))
    assert theirs.status_code == 422 and "no storage object mnist" in theirs.json()["detail"]
    escape = c.post("/api/v1/runs", json={"job": {**job, "storage": [{"name": "mnist", "path": "../../etc"}]}},
                    headers=as_(keys, "alice"))
    assert escape.status_code == 422 and "inside the workspace" in escape.json()["detail"]
    assert c.delete("/api/v1/storage/mnist", headers=as_(keys, "bob")).status_code == 404
    assert c.delete("/api/v1/storage/mnist", headers=as_(keys, "alice")).status_code == 200
    assert c.get("/api/v1/storage", headers=as_(keys, "alice")).json() == []
    node = auth.issue(c.app.state.store, name="n", scope="node", owner="node-x")[1]  # type: ignore[attr-defined]
    assert c.get("/api/v1/storage", headers={"Authorization": f"Bearer {node}"}).status_code == 403


def test_a_reused_list_answer_is_never_stale_nor_anothers(client: tuple[TestClient, dict[str, str]]) -> None:
    """GET /runs answers many open dashboards once while nothing was written (routes/runs.py): a run written
    since is in the next answer at once, and one owner's answer is never another's."""
    c, keys = client
    assert c.get("/api/v1/runs?limit=10", headers=as_(keys, "alice")).json() == []
    assert c.get("/api/v1/runs?limit=10", headers=as_(keys, "bob")).json() == []
    made = c.post("/api/v1/runs", json={"job": {"job": "echo"}}, headers=as_(keys, "alice")).json()
    assert [r["id"] for r in c.get("/api/v1/runs?limit=10", headers=as_(keys, "alice")).json()] == [made["id"]]
    assert c.get("/api/v1/runs?limit=10", headers=as_(keys, "bob")).json() == []
    assert [r["id"] for r in c.get("/api/v1/runs?limit=10", headers=as_(keys, "admin")).json()] == [made["id"]]
    c.post(f"/api/v1/runs/{made['id']}/stop", headers=as_(keys, "alice"))
    assert c.get("/api/v1/runs?limit=10", headers=as_(keys, "alice")).json()[0]["status"] == "KILLED"


def test_a_key_the_cache_holds_is_checked_without_a_thread_and_a_revoked_one_is_refused_at_once(
        client: tuple[TestClient, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard judges a key its store's cache holds on the event loop (a thread-pool hop cost ~25 % of a
    heartbeat); only a key that takes a read of the store goes to a thread. Revoking a key here drops the cache:
    the very next request reads it again, and is refused."""
    from scheduler import middleware

    c, keys = client
    hops: list[object] = []
    real = middleware.run_in_threadpool

    async def counted(fn, *args):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(middleware, "run_in_threadpool", counted)
    assert c.get("/api/v1/runs", headers=as_(keys, "alice")).status_code == 200
    assert len(hops) == 1  # the first look reads the key (a thread)
    for _ in range(3):
        assert c.get("/api/v1/runs", headers=as_(keys, "alice")).status_code == 200
    assert len(hops) == 1  # then the cache answers
    assert c.delete("/api/v1/keys/alice", headers=as_(keys, "admin")).status_code == 200  # (the key's name)
    r = c.get("/api/v1/runs", headers=as_(keys, "alice"))
    assert r.status_code == 401, r.text
    assert c.get("/api/v1/runs", headers={"Authorization": "Bearer fml_u_nosuchkey"}).status_code == 401


def test_no_route_answers_another_routes_paths() -> None:
    """A request is matched against the routers in app.ROUTERS's order, the busiest first, and within a router
    its busiest routes come first (routes/nodes.py: polls and reports): that order may change only how soon a
    route is found, never which route answers. So no route may match a path of another route (a path made from
    its template) for a method both take; the one deliberate overlap must keep its order."""
    import re

    from scheduler.app import ROUTERS

    def sample(template: str) -> str:
        return re.sub(r"\{[^}:]+:path\}", "a/b", re.sub(r"\{[^}:]+\}", "x1", template))

    routes = [(m.__name__, r) for m in ROUTERS for r in m.router.routes]
    assert len(routes) > 50
    clashes = [(ma, a.path, mb, b.path) for ma, a in routes for mb, b in routes
               if a is not b and set(getattr(a, "methods", None) or {"GET"}) & set(getattr(b, "methods", None) or {"GET"})
               and b.path_regex.match(sample(a.path))]
    overlap = ("scheduler.routes.ui", "/ui/session", "scheduler.routes.ui", "/ui/{asset}")  # the page's session
    assert clashes == [overlap], clashes
    ui = [r.path for m, r in routes if m == overlap[0]]
    assert ui.index("/ui/session") < ui.index("/ui/{asset}")  # (the literal path first, or it is an asset)


def test_a_poll_answered_in_front_of_fastapi_reads_as_the_route_does(
        client: tuple[TestClient, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents' polls are answered by routes/nodes.py's FastPoll, in front of FastAPI's routing: every answer,
    an assignment, a refusal (the app's own handlers) or a body that does not parse (handed to the route, whose
    422 it is), reads as the route's own answer to the same request."""
    import re

    from scheduler.routes import nodes

    c, keys = client
    gpu = [{"index": 0, "name": "NVIDIA A100 80GB PCIe", "memory_mb": 81920}]
    reg = c.post("/api/v1/nodes/register", json={"name": "n1", "job_user": "fedml-job", "gpus": gpu},
                 headers=as_(keys, "admin")).json()
    other = c.post("/api/v1/nodes/register", json={"name": "n2", "job_user": "fedml-job", "gpus": gpu},
                   headers=as_(keys, "admin")).json()
    node, nh = reg["node"]["id"], {"Authorization": f"Bearer {reg['node_token']}"}
    run = c.post("/api/v1/runs", json={"job": {"job": "echo hi", "computing": {"minimum_num_gpus": 1}}},
                 headers=as_(keys, "alice")).json()
    c.app.state.scheduler.schedule_pass()  # type: ignore[attr-defined]
    placed = c.get(f"/api/v1/runs/{run['id']}", headers=as_(keys, "alice")).json()
    mine = placed["node_id"] == node
    asks: list[tuple[str, Any]] = [
        (f"/api/v1/nodes/{node if mine else other['node']['id']}/poll", {"running": [], "wait": 0}),
        (f"/api/v1/nodes/{node}/poll", {"running": "not a list", "wait": 0}),
        (f"/api/v1/nodes/{node}/poll", {"running": [], "wait": 99}),
        (f"/api/v1/nodes/{node}/poll", b"{not json"),
        (f"/api/v1/nodes/{other['node']['id'] if mine else node}/poll", {"running": [], "wait": 0}),  # not its own
        ("/api/v1/nodes/node-gone/poll", {"running": [], "wait": 0}),
    ]
    if not mine:
        nh = {"Authorization": f"Bearer {other['node_token']}"}

    def answers() -> list[tuple[int, Any]]:
        out = []
        for path, body in asks:
            r = c.post(path, headers=nh, **({"content": body} if isinstance(body, bytes) else {"json": body}))
            out.append((r.status_code, r.json()))
        return out

    calls: list[str] = []
    real = nodes.answer_poll

    async def counted(*args: Any) -> Any:
        calls.append(sys._getframe(1).f_code.co_qualname)  # who asked: FastPoll, or the route
        return await real(*args)

    monkeypatch.setattr(nodes, "answer_poll", counted)
    fast = answers()
    monkeypatch.setattr(nodes, "POLL_PATH", re.compile("^$"))  # FastPoll passes every request on: the route
    routed = answers()
    assert fast == routed
    assert [s for s, _ in fast] == [200, 422, 422, 422, 403, 403]
    assert fast[0][1]["start"][0]["run"]["id"] == run["id"]  # (the assignment, the same both ways)
    assert calls == ["FastPoll.__call__"] * 3 + ["poll"] * 3  # the three that parse, each way
