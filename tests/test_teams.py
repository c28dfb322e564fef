"""Teams (docs/teams.md), in process: the app over a real SQLite store, driven by FastAPI's TestClient. Who may
make, see, change and remove a team; keys that belong to one launch its runs. (The store part is in
tests/test_store_contract.py for both stores; a team's webhooks end to end in tests/test_webhooks.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scheduler import auth
from scheduler.app import Settings, create_app
from scheduler.sqlite_store import SQLiteStore

pytestmark = pytest.mark.unit

API = "/api/v1"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    store = SQLiteStore(tmp_path / "s.db")
    admin = auth.issue(store, name="admin", scope="admin", owner="admin")[1]
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs"))) as c:
        yield c, {"admin": admin}
    store.close()


def h(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def key(c: TestClient, admin: str, name: str, **params: str) -> str:
    r = c.post(f"{API}/keys", params={"name": name, **params}, headers=h(admin))
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def test_a_teams_keys_launch_its_runs_and_a_person_sees_only_their_team(client: tuple[TestClient, dict[str, str]]) -> None:
    c, k = client
    admin = k["admin"]
    for name in ("vision", "nlp"):
        assert c.post(f"{API}/teams", json={"name": name, "shares": 2}, headers=h(admin)).status_code == 201
    assert c.post(f"{API}/teams", json={"name": "vision"}, headers=h(admin)).status_code == 409
    assert c.post(f"{API}/teams", json={"name": "Bad Name"}, headers=h(admin)).status_code == 422
    alice = key(c, admin, "alice", team="vision")
    bob = key(c, admin, "bob", team="nlp")
    loner = key(c, admin, "carol")  # a key of no team
    run = c.post(f"{API}/runs", json={"job": {"job": "echo hi"}}, headers=h(alice)).json()
    assert run["team"] == "vision" and run["owner"] == "alice"
    assert c.post(f"{API}/runs", json={"job": {"job": "echo hi"}}, headers=h(loner)).json()["team"] is None
    assert [t["name"] for t in c.get(f"{API}/teams", headers=h(alice)).json()] == ["vision"]
    assert [t["name"] for t in c.get(f"{API}/teams", headers=h(admin)).json()] == ["nlp", "vision"]
    assert c.get(f"{API}/teams", headers=h(loner)).json() == []
    shown = c.get(f"{API}/teams/vision", headers=h(alice)).json()
    assert shown["name"] == "vision" and shown["shares"] == 2 and shown["keys"] == []  # (keys: an admin's view)
    assert [x["name"] for x in c.get(f"{API}/teams/vision", headers=h(admin)).json()["keys"]] == ["alice"]
    assert c.get(f"{API}/teams/vision", headers=h(bob)).status_code == 404  # another team's: no such team
    for who in (alice, bob):  # only an admin makes, changes or removes teams
        assert c.post(f"{API}/teams", json={"name": "mine"}, headers=h(who)).status_code == 403
        assert c.delete(f"{API}/teams/nlp", headers=h(who)).status_code in (403, 404)
        assert c.put(f"{API}/teams/nlp/notify", json={"notify": []}, headers=h(who)).status_code in (403, 404)


def test_keys_name_only_teams_that_exist_and_a_team_with_keys_is_not_removed(
        client: tuple[TestClient, dict[str, str]]) -> None:
    c, k = client
    admin = k["admin"]
    r = c.post(f"{API}/keys", params={"name": "dave", "team": "nope"}, headers=h(admin))
    assert r.status_code == 404 and "fedml team create nope" in r.json()["detail"]
    assert c.post(f"{API}/teams", json={"name": "ops"}, headers=h(admin)).status_code == 201
    r = c.post(f"{API}/keys", params={"name": "prom", "scope": "metrics", "team": "ops"}, headers=h(admin))
    assert r.status_code == 422
    assert c.post(f"{API}/keys", params={"name": "team:ops"}, headers=h(admin)).status_code == 422
    key(c, admin, "erin", team="ops")
    r = c.delete(f"{API}/teams/ops", headers=h(admin))
    assert r.status_code == 409 and "erin" in r.json()["detail"]
    assert c.delete(f"{API}/keys/erin", headers=h(admin)).status_code == 200
    assert c.delete(f"{API}/teams/ops", headers=h(admin)).json()["name"] == "ops"
    assert c.get(f"{API}/teams/ops", headers=h(admin)).status_code == 404
    assert c.delete(f"{API}/teams/ops", headers=h(admin)).status_code == 404


def test_a_teams_webhooks_are_checked_and_its_secret_is_an_admins_to_read(
        client: tuple[TestClient, dict[str, str]]) -> None:
    c, k = client
    admin = k["admin"]
    assert c.post(f"{API}/teams", json={"name": "ml"}, headers=h(admin)).status_code == 201
    bad = {"notify": [{"url": "ftp://x/hook", "on": ["failed"]}]}
    assert c.put(f"{API}/teams/ml/notify", json=bad, headers=h(admin)).status_code == 422
    good = {"notify": [{"url": "https://hooks.example/ml?token=t0ps3cret", "on": ["failed"]}]}
    assert c.put(f"{API}/teams/ml/notify", json=good, headers=h(admin)).json()["notify"][0]["on"] == ["failed"]
    member = key(c, admin, "fay", team="ml")
    assert c.get(f"{API}/teams/ml", headers=h(member)).json()["notify"][0]["url"] == "https://hooks.example/ml"
    assert "t0ps3cret" not in c.get(f"{API}/teams", headers=h(member)).text
    assert "t0ps3cret" in c.get(f"{API}/teams/ml", headers=h(admin)).text
    assert c.get(f"{API}/webhooks/secret", params={"owner": "team:ml"}, headers=h(member)).status_code == 403
    got = c.get(f"{API}/webhooks/secret", params={"owner": "team:ml"}, headers=h(admin)).json()
    assert got["owner"] == "team:ml" and len(got["secret"]) == 64


def test_usage_and_the_run_tables_columns_from_the_cli(fedml, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`fedml usage` end to end (a real scheduler and agent): the run launched is in the report, the totals add
    up, and the run tables have FedML's spend columns. (The local node has no GPU: zero GPU-hours.)"""
    import json

    from .conftest import write_job

    job = write_job(tmp_path / "j", "echo hi")
    r = fedml("launch", str(job))
    assert r.returncode == 0, r.stderr
    got = json.loads(fedml("usage", "--by", "run", "--since", "1h", "--json").stdout)
    assert got["total"]["runs"] == len(got["rows"]) >= 1 and got["complete"] is True
    assert got["rows"][0]["status"] == "FINISHED" and got["rows"][0]["gpu_hours"] == 0.0
    table = fedml("usage", "--by", "user")
    assert table.returncode == 0 and "GPU-HOURS" in table.stdout and "total" in table.stdout, table
    listed = fedml("run", "list")
    assert "GPU-HOURS" in listed.stdout and "COST" in listed.stdout, listed.stdout
    bad = fedml("usage", "--by", "node")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --by: team, user or run, got 'node'", bad
    assert fedml("team", "create", "ml").returncode == 0
    r = fedml("team", "quota", "ml", "--gpus", "any:4", "--gpus", "A100-80G:2")
    assert r.returncode == 0 and "any: 4" in r.stderr, r
    shown = fedml("team", "show", "ml").stdout
    assert "quota      any: 0 of 4 GPUs held" in shown and "A100-80G: 0 of 2" in shown, shown
    bad = fedml("team", "quota", "ml", "--gpus", "lots")
    assert bad.returncode == 2 and "TYPE:N" in bad.stderr and bad.stderr.count("\n") == 1, bad
    r = fedml("team", "quota", "ml", "--borrow-limit", "2", "--lend-limit", "1")  # the quotas stay as they were
    assert r.returncode == 0 and "any: 4" in r.stderr and "borrows up to 2 over each, lends at most 1" in r.stderr, r
    assert "borrowing  borrows up to 2 over each, lends at most 1 of each" in fedml("team", "show", "ml").stdout
    for args, says in (([], "--borrow-limit N"), (["--clear", "--gpus", "any:1"], "not both"),
                       (["--borrow-limit", "-1"], "--borrow-limit")):
        bad = fedml("team", "quota", "ml", *args)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, (args, bad)
    r = fedml("team", "quota", "ml", "--lend-limit", "-1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["lend_limit"] is None, r
    r = fedml("team", "budget", "ml", "500/month")
    assert r.returncode == 0 and "a budget of 500 per month" in r.stderr, r
    assert "budget     0.00 of 500 spent this month" in fedml("team", "show", "ml").stdout
    bad = fedml("team", "budget", "ml", "lots/year")
    assert bad.returncode == 2 and "500/month" in bad.stderr and bad.stderr.count("\n") == 1, bad
    assert fedml("team", "budget", "ml", "--clear").returncode == 0
    assert fedml("team", "quota", "ml", "--clear").returncode == 0
    assert json.loads(fedml("team", "show", "ml", "--json").stdout)["quotas"] == {}
    bad = fedml("usage", "--since", "soon")
    assert bad.returncode == 2 and "--since" in bad.stderr and bad.stderr.count("\n") == 1, bad


def test_a_node_joined_with_a_teams_token_runs_only_that_teams_runs(client: tuple[TestClient, dict[str, str]]) -> None:
    c, k = client
    admin = k["admin"]
    for t in ("vision", "nlp"):
        assert c.post(f"{API}/teams", json={"name": t}, headers=h(admin)).status_code == 201
    assert c.post(f"{API}/tokens", json={"teams": ["nope"]}, headers=h(admin)).status_code == 404
    token = c.post(f"{API}/tokens", json={"teams": ["vision"]}, headers=h(admin)).json()["secret"]
    gpu = {"name": "NVIDIA A100 80GB PCIe", "memory_mb": 81920}
    r = c.post(f"{API}/nodes/register", json={"name": "v1", "job_user": "fedml-job", "teams": ["nlp"],
                                              "gpus": [{"index": 0, **gpu}]}, headers=h(token))
    assert r.status_code == 200, r.text
    node, node_key = r.json()["node"], r.json()["node_token"]
    assert node["teams"] == ["vision"]  # the token's, not what the agent said
    seer, reader = key(c, admin, "vera", team="vision"), key(c, admin, "nils", team="nlp")
    job = {"job": {"job": "x", "computing": {"minimum_num_gpus": 1}}}
    r = c.post(f"{API}/runs", json=job, headers=h(reader))  # the only GPU node is vision's: never for nlp
    assert r.status_code == 422 and "is reserved for other teams" in r.json()["detail"], r.text
    assert c.post(f"{API}/runs", json=job, headers=h(seer)).status_code == 201
    nodes = c.get(f"{API}/nodes", headers=h(admin)).json()
    assert [n["teams"] for n in nodes if n["name"] == "v1"] == [["vision"]]
    back = c.post(f"{API}/nodes/register", json={"name": "v1", "job_user": "fedml-job", "gpus": [{"index": 0, **gpu}]},
                  headers=h(node_key))  # its agent comes back with its node key: the teams stay
    assert back.status_code == 200 and back.json()["node"]["teams"] == ["vision"], back.text
