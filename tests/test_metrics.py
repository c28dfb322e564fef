"""GET /metrics (scheduler/routes/metrics.py): who may read it, that prometheus-client's own parser reads it, and
that its numbers are the API's. In process (FastAPI's TestClient over a real SQLite store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from scheduler import auth
from scheduler.app import Settings, create_app
from scheduler.sqlite_store import SQLiteStore

from .procs import wait_for

pytestmark = pytest.mark.unit


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    store = SQLiteStore(tmp_path / "s.db")
    keys = {name: auth.issue(store, name=name, scope=scope, owner=name if scope == "user" else "admin")[1]
            for name, scope in (("admin", "admin"), ("alice", "user"))}
    keys["join"] = auth.issue_join(store, creator="admin", ttl=600, uses=5)[1]
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs"))) as c:
        yield c, keys
    store.close()


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_only_an_admin_or_a_metrics_key_reads_metrics_and_a_metrics_key_reads_nothing_else(client: Any) -> None:
    c, keys = client
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=bearer("fml_a_wrong")).status_code == 401
    assert c.get("/metrics", headers=bearer(keys["alice"])).status_code == 403
    assert c.get("/metrics", headers=bearer(keys["join"])).status_code == 403
    made = c.post("/api/v1/keys", params={"name": "prometheus", "scope": "metrics"}, headers=bearer(keys["admin"]))
    assert made.status_code == 201, made.text
    secret = made.json()["secret"]
    assert secret.startswith("fml_m_")
    assert c.get("/metrics", headers=bearer(secret)).status_code == 200
    for path in ("/api/v1/runs", "/api/v1/nodes", "/api/v1/queue"):
        assert c.get(path, headers=bearer(secret)).status_code == 403, path
    assert c.post("/api/v1/runs", json={"job": {"job": "echo"}}, headers=bearer(secret)).status_code == 403
    assert c.post("/ui/session", json={"api_key": secret}).status_code == 401  # no dashboard either
    assert c.post("/api/v1/keys", params={"name": "x", "scope": "node"}, headers=bearer(keys["admin"])).status_code == 422
    # a webhook signing secret: one's own; an admin's for anyone; never a metrics key's or a join token's
    own = c.get("/api/v1/webhooks/secret", headers=bearer(keys["alice"]))
    assert own.status_code == 200 and own.json()["owner"] == "alice"
    assert c.get("/api/v1/webhooks/secret", params={"owner": "bob"}, headers=bearer(keys["alice"])).status_code == 403
    assert c.get("/api/v1/webhooks/secret", params={"owner": "alice"},
                 headers=bearer(keys["admin"])).json()["secret"] == own.json()["secret"]
    for key in (secret, keys["join"]):
        assert c.get("/api/v1/webhooks/secret", headers=bearer(key)).status_code == 403


def test_the_numbers_are_the_apis(client: Any) -> None:
    c, keys = client
    admin, alice = bearer(keys["admin"]), bearer(keys["alice"])
    node = c.post("/api/v1/nodes/register", headers=admin, json={
        "name": "n1", "job_user": "fedml-job",
        "gpus": [{"index": i, "name": "NVIDIA A100 80GB PCIe", "memory_mb": 81920} for i in range(2)]})
    assert node.status_code == 200, node.text
    gpu = {"computing": {"minimum_num_gpus": 1}}
    runs = [c.post("/api/v1/runs", json={"job": {"job": "sleep 9", **gpu}}, headers=alice).json() for _ in range(3)]
    c.post(f"/api/v1/runs/{runs[2]['id']}/stop", headers=alice)
    wait_for("two runs placed on the two GPUs", lambda: sum(
        1 for r in c.get("/api/v1/runs", headers=admin).json() if r["status"] == "STARTING") == 2)
    got = c.get("/metrics", headers=admin)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    m = samples(got.text)
    counts = {r["status"]: 0 for r in c.get("/api/v1/runs", headers=admin).json()}
    for r in c.get("/api/v1/runs", headers=admin).json():
        counts[r["status"]] += 1
    for state, n in counts.items():
        assert m[("fedml_runs", (("state", state),))] == n, (state, m)
    assert m[("fedml_runs_created_total", ())] == 3
    assert m[("fedml_nodes", (("state", "online"),))] == 1 and m[("fedml_nodes", (("state", "offline"),))] == 0
    assert m[("fedml_gpus", (("state", "total"),))] == 2
    placed = sum(1 for r in c.get("/api/v1/runs", headers=admin).json() if r["status"] == "STARTING")
    assert m[("fedml_gpus", (("state", "held"),))] == placed == m[("fedml_placements_total", ())] == 2
    assert m[("fedml_queue_wait_seconds_count", ())] == placed
    assert m[("fedml_queue_wait_seconds_bucket", (("le", "+Inf"),))] == placed


def test_the_grafana_dashboard_asks_only_for_series_the_scheduler_exports(client: Any) -> None:
    import json
    import re

    c, keys = client
    exported = {fam.name for fam in text_string_to_metric_families(c.get("/metrics", headers=bearer(keys["admin"])).text)}
    exported |= {f"{n}_total" for n in exported} | {f"{n}_bucket" for n in exported}
    board = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "fedml-launch.json").read_text())
    asked = {m for p in board["panels"] for t in p["targets"] for m in re.findall(r"\bfedml_[a-z_]+", t["expr"])}
    assert asked and asked <= exported, asked - exported
