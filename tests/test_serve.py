"""Serving end to end: `job_type: serve` runs, their replicas under the serve supervisor, the scheduler's
gateway (`/inference/NAME`) and `fedml endpoint ...`. Everything is real: the scheduler, the agents, the
replica processes (a small stdlib HTTP server, or the serve template's torch model), HTTP over loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from scheduler.contract.transport import httpx

from .cluster import Cluster, start_cluster
from .conftest import COMPAT, ROOT, Fedml, write_job
from .procs import run_processes, wait_for

TEMPLATE = ROOT / "job_templates" / "serve" / "job.yaml"

# A replica: answers GET /health and POST anything with its index and the body it got; DELAY slows POSTs.
SERVER = r'''
import http.server, json, os, sys, time
idx = int(os.environ["FEDML_REPLICA_INDEX"])
delay = float(os.environ.get("DELAY", "0"))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self._send(200 if self.path == "/health" else 404, {"replica": idx, "path": self.path})
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(delay)
        self._send(200, {"replica": idx, "path": self.path, "echo": json.loads(body or b"null")})
    def log_message(self, *a):
        pass
print(f"replica {idx} on port {os.environ['PORT']}", flush=True)
http.server.ThreadingHTTPServer((os.environ["FEDML_SERVE_HOST"], int(os.environ["PORT"])), H).serve_forever()
'''


def serve_job(tmp: Path, *, service: str, job: str = "python3 srv.py", name: str = "job.yaml",
              extra: str = "") -> Path:
    return write_job(tmp, job, workspace={"srv.py": SERVER}, name=name,
                     extra="job_type: serve\nservice:\n" + "".join(f"  {ln}\n" for ln in service.splitlines()) + extra)


class Local:
    """The embedded scheduler of a private FEDML_HOME, driven through the `fedml` CLI and HTTP."""

    def __init__(self, f: Fedml) -> None:
        self.f = f

    def __call__(self, *args: str, timeout: float = 60) -> Any:
        return self.f(*args, timeout=timeout, env={"PATH": str(Path(sys.executable).parent) + os.pathsep
                                                   + os.environ.get("PATH", "")})

    def json(self, *args: str) -> Any:
        r = self(*args, "--json")
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    @property
    def url(self) -> str:
        return json.loads((self.f.home / "local" / "scheduler.json").read_text())["url"]

    @property
    def key(self) -> str:
        return (self.f.home / "local" / "token").read_text().strip()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def endpoint(self, name: str) -> dict[str, Any]:
        return self.json("endpoint", "status", name)

    def ready(self, name: str, n: int) -> dict[str, Any] | None:
        e = self.endpoint(name)
        return e if e["ready"] == n and len(e["states"]) == n else None


@pytest.fixture
def local(fedml: Fedml) -> Iterator[Local]:
    lo = Local(fedml)
    yield lo
    # Endpoints run until stopped (`fedml scheduler stop` leaves jobs running): end the ones a test left.
    if (fedml.home / "local" / "scheduler.json").exists():
        left = lo.json("endpoint", "list")
        for e in left:
            lo("endpoint", "delete", e["name"])
        for e in left:
            wait_for(f"endpoint {e['name']}'s processes to end", lambda e=e: not run_processes(e["run_id"]), timeout=15)


def launch(local: Local, job: Path) -> str:
    r = local("launch", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_replicas_ports_gateway_round_robin_and_stop(local: Local, tmp_path: Path) -> None:
    run_id = launch(local, serve_job(tmp_path, service="name: echo\nreplicas: 2"))
    e = wait_for("2 ready replicas", lambda: local.ready("echo", 2), timeout=60)
    ports = {r["port"] for r in e["states"]}
    assert len(ports) == 2 and all(r["pid"] for r in e["states"]), e
    assert local.json("endpoint", "list")[0]["name"] == "echo"
    with local.client() as c:
        got = [c.post("/inference/echo", json={"i": i}) for i in range(20)]
        assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200]
        bodies = [r.json() for r in got]
        assert [b["echo"] for b in bodies] == [{"i": i} for i in range(20)]
        assert all(b["path"] == "/predict" for b in bodies)  # /inference/NAME goes to service.predict_path
        per = [sum(1 for b in bodies if b["replica"] == k) for k in (0, 1)]
        assert per == [10, 10], per  # round robin over the two ready replicas
        sub = c.post("/inference/echo/v1/generate", json={})
        assert sub.status_code == 200 and sub.json()["path"] == "/v1/generate", sub.text
        assert c.post("/inference/nope", json={}).status_code == 404
        assert httpx.post(local.url + "/inference/echo", json={}).status_code == 401  # a key is needed
    traffic = local.json("endpoint", "list")[0]["traffic"]  # what the gateway answered, for the last 5 minutes
    assert traffic["answered"] == 21 and traffic["errors"] == 0 and 0 < traffic["p50_ms"] <= traffic["p99_ms"], traffic
    with local.client() as c:  # the same in Prometheus' form (GET /metrics, read by prometheus-client's parser)
        from prometheus_client.parser import text_string_to_metric_families

        m = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples}
    echo = (("endpoint", "echo"),)
    assert m[("fedml_gateway_requests_total", echo)] == 21 and m[("fedml_gateway_errors_total", echo)] == 0
    assert m[("fedml_gateway_latency_seconds_count", echo)] == 21
    assert m[("fedml_endpoint_replicas", (("endpoint", "echo"), ("state", "ready")))] == 2
    r = local("endpoint", "call", "echo", '{"x": 1}')
    assert r.returncode == 0 and json.loads(r.stdout)["echo"] == {"x": 1}, (r.stdout, r.stderr)
    r = local("run", "stop", run_id)
    assert r.returncode == 0, r.stderr
    assert local.json("run", "status", run_id)["status"] == "KILLED"
    wait_for("no replica process left", lambda: not run_processes(run_id), timeout=10)
    with local.client() as c:
        assert c.post("/inference/echo", json={}).status_code == 404
    assert local.json("endpoint", "list") == []


def test_scale_up_and_down_and_no_ready_replica_is_503(local: Local, tmp_path: Path) -> None:
    launch(local, serve_job(tmp_path, service="name: sc\nreplicas: 1"))
    wait_for("1 ready replica", lambda: local.ready("sc", 1), timeout=60)
    r = local("endpoint", "scale", "sc", "3", "--wait", "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)
    assert e["replicas"] == 3 and e["ready"] == 3 and not e["autoscale"], e
    assert len({s["port"] for s in e["states"]}) == 3
    pids = {s["index"]: s["pid"] for s in e["states"]}
    r = local("endpoint", "scale", "sc", "1", "--json")
    assert r.returncode == 0, r.stderr
    e = wait_for("the endpoint down to 1 replica", lambda: local.ready("sc", 1), timeout=30)
    assert e["states"][0]["index"] == 0 and e["states"][0]["pid"] == pids[0], e  # the first one kept
    for i in (1, 2):
        assert not psutil.pid_exists(pids[i]) or psutil.Process(pids[i]).status() == psutil.STATUS_ZOMBIE
    r = local("endpoint", "scale", "sc", "--min", "3", "--max", "2")
    assert r.returncode == 2 and "min_replicas (3) is above max_replicas (2)" in r.stderr, r.stderr
    r = local("endpoint", "scale", "nope", "2")
    assert r.returncode == 4 and "endpoint nope not found" in r.stderr, r.stderr

    # A replica that never becomes ready: the gateway says so with a 503.
    launch(local, serve_job(tmp_path / "b", service="name: never\nreadiness_path: /not-there"))
    wait_for("the replica to start", lambda: local.endpoint("never")["states"], timeout=30)
    time.sleep(1.0)
    r = local("endpoint", "call", "never", "{}")
    assert r.returncode == 1, (r.stdout, r.stderr)
    detail = json.loads(r.stdout)["detail"]
    assert detail == "endpoint never has no ready replica (replicas 0: starting); retry later", detail
    r = local("endpoint", "delete", "never")
    assert r.returncode == 0 and "KILLED" in r.stderr, r.stderr


def test_crashing_replica_backs_off_and_exit_zero_finishes(local: Local, tmp_path: Path) -> None:
    run_id = launch(local, serve_job(tmp_path, service="name: crashy", job="echo starting; exit 3"))
    e = wait_for("two restarts", lambda: (e := local.endpoint("crashy"))["states"] and
                 e["states"][0]["restarts"] >= 2 and e, timeout=30)
    s = e["states"][0]
    assert s["state"] == "restarting" and s["last_exit"] == 3, s
    assert "exited with code 3" in s["message"], s
    assert local.json("run", "status", run_id)["status"] == "RUNNING"  # a service is kept up, not failed
    logs = local("logs", run_id).stdout
    assert "[serve] replica 0 exited with code 3; restarting in 1 s (restart 1)" in logs, logs
    assert "[serve] replica 0 exited with code 3; restarting in 2 s (restart 2)" in logs, logs
    assert "[replica 0] starting" in logs
    local("endpoint", "delete", "crashy")

    # FedML's deploy examples run a job that ends: when every replica exits 0 the run FINISHES.
    done = write_job(tmp_path / "d", "echo served", extra="job_type: deploy\n")
    r = local("launch", str(done), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "[replica 0] served" in r.stdout and "every replica exited with code 0" in r.stdout, r.stdout


def test_endpoint_names_and_fedml_deploy_yamls(local: Local, tmp_path: Path) -> None:
    launch(local, serve_job(tmp_path, service="name: same"))
    r = local("launch", str(serve_job(tmp_path / "b", service="name: same")), "--detach")
    assert r.returncode == 2, r.stderr
    assert "endpoint same is served by run-" in r.stderr and "give this one another service.name" in r.stderr
    # FedML's own names: serving_args.endpoint_name, readiness_probe.httpGet.path, port
    fedml_style = write_job(tmp_path / "c", "python3 srv.py", workspace={"srv.py": SERVER}, extra=(
        "job_type: deploy\nserving_args:\n  endpoint_name: fedml-ep\nreadiness_probe:\n  httpGet:\n"
        "    path: /health\nport: 8000\n"))
    launch(local, fedml_style)
    wait_for("fedml-ep ready", lambda: local.ready("fedml-ep", 1), timeout=60)
    for f in ("launch/serve_job_mnist.yaml", "launch/serve_job_llm.yaml"):
        shutil.copy(COMPAT / f, tmp_path / Path(f).name)
        (tmp_path / "serve_mnist").mkdir(exist_ok=True)
        r = local("launch", str(tmp_path / Path(f).name), "--dry-run")
        assert r.returncode == 0, (f, r.stderr)


def test_autoscale_follows_inflight_requests(local: Local, tmp_path: Path) -> None:
    job = serve_job(tmp_path, service="name: auto\nreplicas: 1\nmin_replicas: 1\nmax_replicas: 3\n"
                                       "target_inflight: 1\nscale_down_delay: 3", extra="envs:\n  DELAY: '0.3'\n")
    launch(local, job)
    wait_for("1 ready replica", lambda: local.ready("auto", 1), timeout=60)
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        with local.client() as c:
            while not stop.is_set():
                r = c.post("/inference/auto", json={})
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=load) for _ in range(3)]  # ~3 requests in flight all the time
    for t in threads:
        t.start()
    try:
        e = wait_for("autoscaling up to 3 ready replicas", lambda: local.ready("auto", 3), timeout=60, every=0.5)
        assert e["autoscale"] and e["min_replicas"] == 1 and e["max_replicas"] == 3, e
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    wait_for("autoscaling back down to 1", lambda: local.ready("auto", 1), timeout=30, every=0.5)


# -- the serve template with real torch, on a cluster of 3 agents ----------------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, ("s1", "s2", "s3"))


def test_serve_template_survives_a_killed_replica(cluster: Cluster) -> None:
    """The issue's bar: 2 replicas of the torch template; 200 requests through the gateway all succeed while
    one replica's process is SIGKILLed halfway (retried on the other); the replica is restarted; stop ends it."""
    from sklearn.datasets import load_digits

    c = cluster
    r = c.fedml("launch", str(TEMPLATE), "--detach", timeout=60)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()

    def ready(n: int) -> dict[str, Any] | None:
        e = c.json("endpoint", "status", "digits")
        return e if e["ready"] == n and len(e["states"]) == n else None

    e = wait_for("2 ready replicas of the serve template", lambda: ready(2), timeout=180, every=0.5)
    victim = next(s for s in e["states"] if s["index"] == 0)
    x, y = load_digits(return_X_y=True)
    got: list[httpx.Response] = []
    with httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {c.admin}"}, timeout=30) as h:
        for i in range(200):
            if i == 100:
                os.killpg(victim["pid"], signal.SIGKILL)  # the replica's whole process group
            got.append(h.post("/inference/digits", json={"inputs": [x[i].tolist()]}))
    bad = [(i, r.status_code, r.text) for i, r in enumerate(got) if r.status_code != 200]
    assert not bad, bad[:5]
    preds = [r.json()["predictions"][0] for r in got]
    accuracy = sum(int(p == t) for p, t in zip(preds, y[:200], strict=True)) / 200
    assert accuracy >= 0.9, accuracy
    served = {k: sum(1 for r in got if r.json()["replica"] == k) for k in (0, 1)}
    assert served[0] > 0 and served[1] > 100, served  # replica 1 took over after the kill
    e = wait_for("replica 0 restarted and ready", lambda: (e := ready(2)) and any(
        s["index"] == 0 and s["restarts"] >= 1 and s["pid"] != victim["pid"] for s in e["states"]) and e,
        timeout=120, every=0.5)
    node_names = {n["id"]: n["name"] for n in c.json("node", "list")}
    assert node_names[e["node_id"]] in ("s1", "s2", "s3")
    r = c.fedml("run", "stop", run_id)
    assert r.returncode == 0, r.stderr
    assert c.json("run", "status", run_id)["status"] == "KILLED"
    wait_for("no replica process left", lambda: not run_processes(run_id), timeout=15)
    print(f"serve template: accuracy {accuracy:.3f} over 200 gateway requests, per replica {served}")


def test_agent_killed_replicas_keep_serving_and_are_reattached(local: Local, tmp_path: Path) -> None:
    """SIGKILL the node's agent: the supervisor and replicas are the job, so they keep serving through the
    gateway; the agent the scheduler restarts re-attaches, and scaling reaches the supervisor again."""
    run_id = launch(local, serve_job(tmp_path, service="name: steady\nreplicas: 1"))
    e = wait_for("1 ready replica", lambda: local.ready("steady", 1), timeout=60)
    pid_file = local.f.home / "local" / "agent" / "agent.pid"
    old_agent = int(pid_file.read_text().strip())
    os.kill(old_agent, signal.SIGKILL)
    with local.client() as c:
        for i in range(20):
            r = c.post("/inference/steady", json={"i": i})
            assert r.status_code == 200, r.text
    wait_for("a new agent", lambda: pid_file.exists() and (t := pid_file.read_text().strip()).isdigit()
             and int(t) != old_agent and psutil.pid_exists(int(t)), timeout=30)
    r = local("endpoint", "scale", "steady", "2", "--wait", "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    e2 = json.loads(r.stdout)
    assert e2["ready"] == 2, e2
    assert next(s for s in e2["states"] if s["index"] == 0)["pid"] == e["states"][0]["pid"]  # the same replica
    assert local.json("run", "status", run_id)["status"] == "RUNNING"


def test_a_replica_whose_wrapper_dies_takes_its_server_down_and_restarts_clean(local: Local, tmp_path: Path) -> None:
    """SIGKILL only the replica's bash: the server under it must not survive it (it kept the port and answered
    /health while every restart failed with 'Address already in use'); the new replica is the one that is ready."""
    run_id = launch(local, serve_job(tmp_path, service="name: orphan\nreplicas: 1"))
    e = wait_for("1 ready replica", lambda: local.ready("orphan", 1), timeout=60)
    wrapper = psutil.Process(e["states"][0]["pid"])
    servers = [p for p in wrapper.children(recursive=True) if "srv.py" in " ".join(p.cmdline())]
    assert servers, wrapper.children(recursive=True)
    wrapper.kill()  # the wrapper alone, not its group
    wait_for("the old server to be gone", lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                           for p in servers), timeout=15)
    e2 = wait_for("the replica restarted and ready", lambda: (x := local.ready("orphan", 1)) and
                  x["states"][0]["restarts"] >= 1 and x["states"][0]["pid"] != wrapper.pid and x, timeout=60)
    with local.client() as c:
        assert c.post("/inference/orphan", json={"i": 1}).status_code == 200
    logs = local("logs", run_id).stdout
    assert "Address already in use" not in logs, logs
    assert local.json("run", "status", run_id)["status"] == "RUNNING", e2


def test_request_timeout_sec_of_a_fedml_deploy_yaml_answers_504(local: Local, tmp_path: Path) -> None:
    """FedML's `request_timeout_sec` (no `service:` block) bounds how long the gateway waits for a replica."""
    job = write_job(tmp_path, "python3 srv.py", workspace={"srv.py": SERVER}, extra=(
        "job_type: deploy\nserving_args:\n  endpoint_name: slow\nrequest_timeout_sec: 1\n"
        "envs:\n  DELAY: '5'\n"))
    launch(local, job)
    wait_for("slow ready", lambda: local.ready("slow", 1), timeout=60)
    with local.client() as c:
        t0 = time.monotonic()
        r = c.post("/inference/slow", json={"i": 1})
        took = time.monotonic() - t0
    assert r.status_code == 504, (r.status_code, r.text)
    assert "did not answer within 1 s" in r.text and "request_timeout" in r.text, r.text
    assert took < 4.5, took  # the 1 s timeout, not the replica's 5 s
