"""Kubernetes as a node pool, end to end, against a real control plane (no mocks of the Kubernetes API).

Real: etcd, kube-apiserver, kube-controller-manager (job controller, garbage collector, service-account
tokens; `nodelifecycle` off) and kube-scheduler, built from Debian's kubernetes 1.20.2 source and started on
loopback by scripts/k8s-control-plane.sh; our scheduler (`fedml scheduler start`) and the pool agent
(`fedml login KEY --server URL --kubernetes`), which talks to the API server with the ServiceAccount token of
deploy/kubernetes/agent.yaml's RBAC (so those rules are exactly what the agent may do).

Simulated, because there is no kubelet (FakeKubelet below plays its part, and only that part):
  - Node objects: created with nvidia.com/gpu allocatable, gpu.product/gpu.memory labels (as NVIDIA's device
    plugin and GPU feature discovery would), status Ready, the not-ready taint dropped;
  - pod status: the test patches phase and container state (Running, terminated with an exit code, waiting
    with ErrImagePull, Failed/Evicted) where a kubelet would;
  - container logs: the API server's log requests are proxied (as for a real node) to a small HTTPS server
    in this test process, with a certificate the API server verifies, serving the text the test wrote;
  - pod deletion: a pod marked for deletion is removed with grace 0, as a kubelet does once its containers
    are stopped.
Nothing runs in a container: what a job's commands would do is not tested here (the process and docker
runtimes' tests cover that); what is tested is everything between our scheduler and the Kubernetes API.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from scheduler.contract.transport import httpx

from .cluster import Cluster, start_cluster
from .conftest import ROOT, needs, write_job
from .procs import wait_for

SCRIPT = ROOT / "scripts" / "k8s-control-plane.sh"
DEPLOY = ROOT / "deploy" / "kubernetes"
NS = "fedml"  # the namespace deploy/kubernetes/ uses
POOL = "k8s"
A100 = "NVIDIA-A100-SXM4-80GB"
H100 = "NVIDIA-H100-80GB-HBM3"
NODES = {"gpu-a": (A100, 2), "gpu-b": (A100, 2), "gpu-h": (H100, 1)}


# -- the control plane -------------------------------------------------------------------------------------

@dataclass
class ControlPlane:
    dir: Path
    api: Any  # kubernetes.client.ApiClient with the admin token
    started_s: float

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    check = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=30)
    needs("a Kubernetes control plane", check.returncode == 0,
          f"{check.stderr.strip()} (`make test` builds it; about 7 minutes once)")
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        needs("the kubernetes client", False, "pip install kubernetes (make install)")
    from kubernetes import config

    d = tmp_path_factory.mktemp("k8s")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHON": sys.executable})
    needs("a Kubernetes control plane", r.returncode == 0, f"start failed: {r.stderr[-3000:]}")
    started = time.monotonic() - t0
    print(f"\nKubernetes control plane ready in {started:.1f} s")
    try:
        yield ControlPlane(d, config.new_client_from_config(str(d / "kubeconfig")), started)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)


# -- the kubelet's part ------------------------------------------------------------------------------------

class FakeKubelet:
    """Plays the kubelet for the fake nodes: node status, pod status, container logs, pod removal."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane, self.core = plane, plane.core
        self.logs: dict[tuple[str, str], str] = {}
        self.ended: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        self._cv = threading.Condition()
        kubelet = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # /containerLogs/NS/POD/CONTAINER?follow=true
                kubelet.requests.append(self.path)
                path, _, query = self.path.partition("?")
                parts = path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                key = (parts[1], parts[2])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                sent = 0
                follow = "follow=true" in query
                while True:
                    with kubelet._cv:
                        text = kubelet.logs.get(key, "")
                        if len(text) == sent and follow and key not in kubelet.ended:
                            kubelet._cv.wait(0.5)
                            text = kubelet.logs.get(key, "")
                    if len(text) > sent:
                        self.wfile.write(text[sent:].encode())
                        self.wfile.flush()
                        sent = len(text)
                    if not follow or key in kubelet.ended:
                        with kubelet._cv:
                            if len(kubelet.logs.get(key, "")) == sent:
                                return

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(plane.dir / "kubelet.crt", plane.dir / "kubelet.key")  # signed by the CA the API server trusts
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._stop = threading.Event()
        threading.Thread(target=self._remove_deleted_pods, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()

    # nodes
    def add_node(self, name: str, product: str | None, gpus: int) -> None:
        labels = {"kubernetes.io/hostname": name}
        if product:
            labels.update({"nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": "81920"})
        self.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        res = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
        now = "2024-01-01T00:00:00Z"
        self.core.patch_node_status(name, {"status": {
            "capacity": res, "allocatable": res,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake kubelet",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}}}})
        self.core.patch_node(name, {"spec": {"taints": None}})  # the node controller would drop not-ready

    # pods
    def _patch(self, pod: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod, NS, {"status": status})

    def run(self, pod: str, text: str = "") -> None:
        with self._cv:
            self.logs[(NS, pod)] = self.logs.get((NS, pod), "") + text
            self._cv.notify_all()
        self._patch(pod, {"phase": "Running", "containerStatuses": [{
            "name": "job", "ready": True, "restartCount": 0, "image": "img", "imageID": "",
            "state": {"running": {"startedAt": "2024-01-01T00:00:01Z"}}}]})

    def write(self, pod: str, text: str) -> None:
        with self._cv:
            self.logs[(NS, pod)] = self.logs.get((NS, pod), "") + text
            self._cv.notify_all()

    def exit(self, pod: str, code: int, message: str = "") -> None:
        self._end_logs(pod)
        term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                "startedAt": "2024-01-01T00:00:01Z", "finishedAt": "2024-01-01T00:00:02Z"}
        self._patch(pod, {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
            "name": "job", "ready": False, "restartCount": 0, "image": "img", "imageID": "",
            "state": {"terminated": term}}]})

    def image_error(self, pod: str) -> None:
        self._patch(pod, {"phase": "Pending", "containerStatuses": [{
            "name": "job", "ready": False, "restartCount": 0, "image": "img", "imageID": "",
            "state": {"waiting": {"reason": "ErrImagePull",
                                  "message": 'pull access denied for no/such, repository does not exist'}}}]})

    def evict(self, pod: str) -> None:
        self._end_logs(pod)
        self._patch(pod, {"phase": "Failed", "reason": "Evicted",
                          "message": "The node was low on resource: memory."})

    def _end_logs(self, pod: str) -> None:
        with self._cv:
            self.ended.add((NS, pod))
            self._cv.notify_all()

    def _remove_deleted_pods(self) -> None:
        """A kubelet stops a deleted pod's containers, then removes the pod (grace 0)."""
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                for p in self.core.list_namespaced_pod(NS).items:
                    if p.metadata.deletion_timestamp is not None:
                        self._end_logs(p.metadata.name)
                        try:
                            self.core.delete_namespaced_pod(p.metadata.name, NS, grace_period_seconds=0)
                        except ApiException:
                            pass
            except Exception:
                pass
            self._stop.wait(0.2)


# -- the pool ----------------------------------------------------------------------------------------------

def service_account_kubeconfig(plane: ControlPlane, path: Path) -> Path:
    """Apply deploy/kubernetes/agent.yaml's namespace and RBAC objects; a kubeconfig with the fedml-agent
    ServiceAccount's token (made by the controller-manager's token controller)."""
    from kubernetes import utils

    for doc in yaml.safe_load_all((DEPLOY / "agent.yaml").read_text()):
        if doc and doc["kind"] in ("Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole",
                                   "ClusterRoleBinding"):
            utils.create_from_dict(plane.api, doc)

    def token() -> str | None:
        for s in plane.core.list_namespaced_secret(NS).items:
            if s.type == "kubernetes.io/service-account-token" and \
                    (s.metadata.annotations or {}).get("kubernetes.io/service-account.name") == "fedml-agent":
                return base64.b64decode(s.data["token"]).decode()
        return None

    tok = wait_for("the fedml-agent ServiceAccount's token", token, timeout=30)
    server = (plane.dir / "url").read_text().strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(plane.dir / "ca.crt")}}],
        "users": [{"name": "fedml-agent", "user": {"token": tok}}],
        "contexts": [{"name": "fedml-agent", "context": {"cluster": "test", "user": "fedml-agent", "namespace": NS}}],
        "current-context": "fedml-agent"}))
    return path


@dataclass
class Pool:
    c: Cluster
    plane: ControlPlane
    kubelet: FakeKubelet
    login: subprocess.CompletedProcess[str]
    kubeconfig: Path
    runs: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.c.base / "agents" / "nodes" / POOL

    def launch(self, dir: Path, script: str = "echo hi", workspace: dict[str, str] | None = None, **doc: Any) -> str:
        path = write_job(dir, script, extra=yaml.safe_dump(doc, sort_keys=False) if doc else "", workspace=workspace)
        r = self.c.fedml("launch", str(path), "--detach")
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.strip()
        self.runs.append(run_id)
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        return self.c.json("run", "status", run_id)

    def wait_status(self, run_id: str, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(f"run {run_id} to be {'/'.join(statuses)}",
                        lambda: (r if (r := self.run(run_id))["status"] in statuses else None), timeout, every=0.2)

    def jobs(self, run_id: str) -> list[Any]:
        return self.plane.batch.list_namespaced_job(NS, label_selector=f"fedml.ai/run-id={run_id}").items

    def pods(self, run_id: str) -> list[Any]:
        return self.plane.core.list_namespaced_pod(NS, label_selector=f"fedml.ai/run-id={run_id}").items

    def bound_pods(self, run_id: str, n: int = 1, timeout: float = 30) -> list[Any]:
        """The run's pods once the kube-scheduler has bound all `n` of them to nodes."""
        return wait_for(f"{n} pod(s) of {run_id} bound to nodes",
                        lambda: (ps if len(ps := [p for p in self.pods(run_id) if p.spec.node_name]) == n else None),
                        timeout, every=0.1)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.c.json("node", "list") if n["labels"].get("pool") == POOL}

    def free(self) -> int:
        return sum(len(n["gpus_free"]) for n in self.nodes().values())

    def total(self) -> int:
        return sum(len(n["gpus"]) for n in self.nodes().values())

    def gone(self, run_id: str) -> bool:
        return not self.jobs(run_id) and not self.pods(run_id)


@pytest.fixture(scope="module")
def pool(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    kubelet = FakeKubelet(plane)
    try:
        for name, (product, gpus) in NODES.items():
            kubelet.add_node(name, product, gpus)
        kubeconfig = service_account_kubeconfig(plane, tmp_path_factory.mktemp("sa") / "kubeconfig")
        # Heartbeat 10 s: the lease is 25 s (a Job's deadline moves on 3 s inside it: the pods' stop grace + 1),
        # a node silent for 30 s is offline; long enough for a pool agent to be restarted on a busy machine
        # (test_a_killed_pool_agent...). Only the fencing test waits on a heartbeat timeout.
        for c in start_cluster(tmp_path_factory.mktemp("pool"), (), torch=False, heartbeat=10.0):
            t0 = time.monotonic()
            login = c.agents("login", c.admin, "--server", c.url, "--kubernetes", "--namespace", NS, "--name", POOL,
                             timeout=90, env={"KUBECONFIG": str(kubeconfig)})
            assert login.returncode == 0, (login.stderr, _agent_log(c))
            print(f"pool joined in {time.monotonic() - t0:.1f} s")
            p = Pool(c, plane, kubelet, login, kubeconfig)
            yield p
            # `fedml logout` (start_cluster's clean-up) deletes the pool's Jobs, removes its nodes and its home:
            # keep the agent's log for a post-mortem
            (c.base / "pool-agent.log").write_text(_agent_log(c, 10**7))
    finally:
        kubelet.close()


def _agent_log(c: Cluster, tail: int = 3000) -> str:
    f = c.base / "agents" / "nodes" / POOL / "agent.log"
    return f.read_text()[-tail:] if f.exists() else "(no agent log)"


@pytest.fixture
def p(pool: Pool) -> Iterator[Pool]:
    """The pool, left idle by each test: its runs ended, every GPU free again."""
    yield pool
    for run_id in pool.runs:
        if pool.run(run_id)["status"] not in ("FINISHED", "FAILED", "KILLED"):
            pool.c.fedml("run", "stop", run_id)
    for run_id in pool.runs:
        pool.wait_status(run_id, "FINISHED", "FAILED", "KILLED", timeout=60)
    pool.runs.clear()
    wait_for("every GPU of the pool free", lambda: pool.free() == pool.total() == 5, timeout=30)


def env_of(job: Any) -> dict[str, str]:
    return {e.name: e.value for e in job.spec.template.spec.containers[0].env}


# -- tests -------------------------------------------------------------------------------------------------

def test_the_cluster_joins_as_a_pool_of_its_nodes(p: Pool) -> None:
    assert f"Pool {POOL} joined {p.c.url}: 3 Kubernetes node(s), 5 GPU(s), namespace {NS}" in p.login.stderr
    nodes = p.nodes()
    assert set(nodes) == {f"{POOL}-{n}" for n in NODES}
    for name, (product, gpus) in NODES.items():
        n = nodes[f"{POOL}-{name}"]
        assert n["state"] == "ONLINE"
        assert [g["name"] for g in n["gpus"]] == [product] * gpus
        assert all(g["memory_mb"] == 81920 for g in n["gpus"])
        assert n["labels"] == {"pool": POOL, "kubernetes.node": name, "kubernetes.namespace": NS}
        assert "kubernetes" in n["runtimes"]
    table = p.c.fedml("node", "list")
    assert table.returncode == 0 and f"2/2 {A100}" in table.stdout and f"1/1 {H100}" in table.stdout, table.stdout


def test_a_one_gpu_job_becomes_a_job_bound_to_a_gpu_node_and_its_states_follow_the_pod(p: Pool,
                                                                                       tmp_path: Path) -> None:
    """Simulated: the pod's phases (Running, then Succeeded) and its log text, as the kubelet would report."""
    run_id = p.launch(tmp_path, "python train.py --lr $LR", workspace={"train.py": "print('training')\n"},
                      computing={"minimum_num_gpus": 1, "resource_type": "A100-80G"},
                      envs={"LR": "0.1"}, data_args={"dataset_name": "digits"}, labels={"pool": POOL})
    [job] = wait_for("the Job", lambda: p.jobs(run_id), timeout=30)
    # the Job: backoffLimit 0, labels, limits, node selector, env
    assert job.spec.backoff_limit == 0
    assert job.metadata.labels["fedml.ai/run-id"] == run_id
    assert job.metadata.labels["fedml.ai/rank"] == "0" and job.metadata.labels["fedml.ai/attempt"] == "1"
    assert job.metadata.labels["fedml.ai/pool"] == POOL
    pod_spec = job.spec.template.spec
    assert pod_spec.restart_policy == "Never"
    ctr = pod_spec.containers[0]
    assert ctr.resources.limits == {"nvidia.com/gpu": "1"}
    assert pod_spec.node_selector == {"nvidia.com/gpu.product": A100}
    env = env_of(job)
    assert env["FEDML_CURRENT_RUN_ID"] == run_id and env["FEDML_CLIENT_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["FEDML_ENV_DATA_ARGS_DATASET_NAME"] == "digits" and env["LR"] == "0.1"
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin decides what the pod sees
    assert "PATH" not in env and "HOME" not in env  # nothing of the agent's environment leaks into the pod
    # the workspace and the scripts travel in a ConfigMap owned by the Job
    cm = p.plane.core.read_namespaced_config_map(job.metadata.name, NS)
    assert cm.metadata.owner_references[0].uid == job.metadata.uid
    assert "python train.py --lr $LR" in cm.data["job.sh"]
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(cm.binary_data["workspace.tar.gz"]))) as tar:
        assert tar.getnames() == ["train.py"]
        assert tar.extractfile("train.py").read() == b"print('training')\n"  # type: ignore[union-attr]
    # the real kube-scheduler binds the pod to the node our scheduler placed the rank on, an A100 node
    [pod] = p.bound_pods(run_id)
    run = p.run(run_id)
    assert run["status"] == "STARTING"  # Pending -> STARTING
    placed = next(n for n in p.nodes().values() if n["id"] == run["node_id"])
    assert pod.spec.node_name == placed["labels"]["kubernetes.node"] in ("gpu-a", "gpu-b")
    assert pod.metadata.annotations["fedml.ai/gpus"] == ",".join(map(str, run["gpus"]))
    assert p.free() == 4  # the pool's free GPUs went down
    # Running -> RUNNING; the log comes through the API server's pod log endpoint
    p.kubelet.run(pod.metadata.name, "epoch 1 loss 0.5\n")
    p.wait_status(run_id, "RUNNING")
    p.kubelet.write(pod.metadata.name, "epoch 2 loss 0.25\n")
    wait_for("both log lines at the scheduler", lambda: p.c.logs(run_id).get(0) == ["epoch 1 loss 0.5",
                                                                                     "epoch 2 loss 0.25"], timeout=20)
    # Succeeded -> FINISHED; the Job is cleaned up, the GPU is free again
    p.kubelet.exit(pod.metadata.name, 0)
    run = p.wait_status(run_id, "FINISHED", "FAILED")
    assert run["status"] == "FINISHED" and run["exit_code"] == 0, run
    wait_for("the Job and its pod deleted", lambda: p.gone(run_id), timeout=30)
    assert p.free() == 5
    assert any(r.startswith(f"/containerLogs/{NS}/{pod.metadata.name}/job") for r in p.kubelet.requests)


def test_a_failing_pod_fails_the_run_with_its_exit_code_and_a_failed_bootstrap_says_so(p: Pool, tmp_path: Path) -> None:
    """Simulated: the container terminating with exit code 3 (and 2 with the termination message the run
    script writes when bootstrap fails)."""
    job_fail = p.launch(tmp_path / "a", "exit 3")
    boot_fail = p.launch(tmp_path / "b", "true", bootstrap="exit 2")
    for run_id, code, msg in ((job_fail, 3, ""), (boot_fail, 2, "bootstrap")):
        [pod] = p.bound_pods(run_id)
        p.kubelet.run(pod.metadata.name)
        p.wait_status(run_id, "RUNNING")
        p.kubelet.exit(pod.metadata.name, code, msg)
    run = p.wait_status(job_fail, "FAILED", "FINISHED")
    assert (run["status"], run["exit_code"], run["reason"]) == ("FAILED", 3, "job exited with code 3")
    run = p.wait_status(boot_fail, "FAILED", "FINISHED")
    assert (run["status"], run["exit_code"], run["reason"]) == ("FAILED", 2, "bootstrap failed with exit code 2")


def test_stop_deletes_the_job_and_its_pods(p: Pool, tmp_path: Path) -> None:
    """Simulated: the pod running; after the delete, the kubelet's removal of the pod (grace 0)."""
    run_id = p.launch(tmp_path, "sleep 1000", computing={"minimum_num_gpus": 2})
    [pod] = p.bound_pods(run_id)
    p.kubelet.run(pod.metadata.name, "working\n")
    p.wait_status(run_id, "RUNNING")
    assert p.free() == 3
    r = p.c.fedml("run", "stop", run_id)
    assert r.returncode == 0, r.stderr
    run = p.wait_status(run_id, "KILLED", "FAILED", "FINISHED")
    assert run["status"] == "KILLED", run
    assert p.gone(run_id)  # KILLED is reported once the Job and its pods are gone
    assert not p.plane.core.list_namespaced_config_map(NS, label_selector=f"fedml.ai/run-id={run_id}").items or \
        wait_for("the ConfigMap collected with its Job", lambda: not p.plane.core.list_namespaced_config_map(
            NS, label_selector=f"fedml.ai/run-id={run_id}").items, timeout=30)
    wait_for("the pool's GPUs free again", lambda: p.free() == 5, timeout=10)


def test_a_two_rank_job_makes_two_jobs_and_a_headless_service_for_rank_0(p: Pool, tmp_path: Path) -> None:
    """Simulated: both pods running, then succeeding."""
    run_id = p.launch(tmp_path, "torchrun train.py", num_nodes=2,
                      computing={"minimum_num_gpus": 1, "resource_type": "A100-80G"})
    pods = p.bound_pods(run_id, 2)
    jobs = {j.metadata.labels["fedml.ai/rank"]: j for j in p.jobs(run_id)}
    assert set(jobs) == {"0", "1"}
    assert {pod.spec.node_name for pod in pods} == {"gpu-a", "gpu-b"}  # distinct nodes, both A100
    assert p.free() == 3
    [svc] = p.plane.core.list_namespaced_service(NS, label_selector=f"fedml.ai/run-id={run_id}").items
    assert svc.spec.cluster_ip == "None"
    assert svc.spec.selector == {"fedml.ai/run-id": run_id, "fedml.ai/attempt": "1", "fedml.ai/rank": "0"}
    assert svc.metadata.owner_references[0].uid == jobs["0"].metadata.uid
    master = f"{svc.metadata.name}.{NS}.svc"
    run = p.run(run_id)
    for rank, j in jobs.items():
        env = env_of(j)
        assert env["MASTER_ADDR"] == env["FEDML_NODE_0_ADDR"] == master
        assert env["MASTER_PORT"] == str(run["master_port"]) == str(svc.spec.ports[0].port)
        assert (env["NODE_RANK"], env["WORLD_SIZE"]) == (rank, "2")
    for pod in pods:
        p.kubelet.run(pod.metadata.name, f"rank {pod.metadata.labels['fedml.ai/rank']} up\n")
    p.wait_status(run_id, "RUNNING")
    for pod in pods:
        p.kubelet.exit(pod.metadata.name, 0)
    assert p.wait_status(run_id, "FINISHED", "FAILED")["status"] == "FINISHED"
    assert p.c.logs(run_id) == {0: ["rank 0 up"], 1: ["rank 1 up"]}
    wait_for("both Jobs, their pods and the Service deleted", lambda: p.gone(run_id) and not
             p.plane.core.list_namespaced_service(NS, label_selector=f"fedml.ai/run-id={run_id}").items, timeout=30)


def test_an_image_pull_error_fails_the_run_with_the_reason(p: Pool, tmp_path: Path) -> None:
    """Simulated: the kubelet reporting the container waiting with ErrImagePull."""
    run_id = p.launch(tmp_path, "true", docker={"image": "no/such:image"})
    [job] = wait_for("the Job", lambda: p.jobs(run_id), timeout=30)
    assert job.spec.template.spec.containers[0].image == "no/such:image"
    [pod] = p.bound_pods(run_id)
    p.kubelet.image_error(pod.metadata.name)
    run = p.wait_status(run_id, "FAILED", "FINISHED", "RUNNING")
    assert run["status"] == "FAILED", run
    assert run["reason"] == ("image no/such:image: ErrImagePull: pull access denied for no/such, "
                             "repository does not exist"), run
    wait_for("the Job deleted", lambda: p.gone(run_id), timeout=30)


def test_a_workspace_too_large_for_a_configmap_fails_the_run_at_start(p: Pool, tmp_path: Path) -> None:
    big = base64.b64encode(os.urandom(1 << 20)).decode()  # ~1,030 KiB gzipped: more than a ConfigMap takes
    run_id = p.launch(tmp_path, "true", workspace={"data.txt": big})
    run = p.wait_status(run_id, "FAILED", "FINISHED", "RUNNING")
    assert run["status"] == "FAILED", run
    assert "KiB compressed; the kubernetes runtime delivers it in a ConfigMap, which holds at most 960 KiB" in run["reason"]
    assert p.gone(run_id)  # nothing was created


def test_an_endpoint_is_refused_by_the_pool_with_the_reason(p: Pool, tmp_path: Path) -> None:
    run_id = p.launch(tmp_path, "python3 serve.py", job_type="serve", service={"name": "k8s-digits", "replicas": 1})
    run = p.wait_status(run_id, "FAILED", "FINISHED", "RUNNING")
    assert run["status"] == "FAILED" and "endpoints do not run on Kubernetes pools yet" in run["reason"], run
    assert p.gone(run_id)


def test_an_evicted_pod_is_lost_and_the_retry_policy_runs_it_again(p: Pool, tmp_path: Path) -> None:
    """Simulated: the kubelet evicting the running pod (phase Failed, reason Evicted), then the second
    attempt's pod running and succeeding."""
    run_id = p.launch(tmp_path, "echo go", retry={"max_attempts": 2, "on": ["lost"]})
    [pod] = p.bound_pods(run_id)
    p.kubelet.run(pod.metadata.name, "attempt 1\n")
    p.wait_status(run_id, "RUNNING")
    p.kubelet.evict(pod.metadata.name)
    # LOST, then requeued as attempt 2: a new Job (…-a2-r0) made by our scheduler's retry, not by Kubernetes
    second = wait_for("attempt 2's Job", lambda: [j for j in p.jobs(run_id) if j.metadata.labels["fedml.ai/attempt"] == "2"],
                      timeout=30)
    assert second[0].spec.backoff_limit == 0
    assert p.run(run_id)["attempt"] == 2  # retry.on is [lost] only: the eviction was reported LOST
    pod2 = next(x for x in p.bound_pods(run_id) if x.metadata.labels["fedml.ai/attempt"] == "2")
    p.kubelet.run(pod2.metadata.name, "attempt 2\n")
    p.kubelet.exit(pod2.metadata.name, 0)
    assert p.wait_status(run_id, "FINISHED", "FAILED")["status"] == "FINISHED"
    assert p.c.logs(run_id)[0] == ["attempt 1", "attempt 2"]


def test_an_evicted_pod_without_retries_ends_lost_then_failed(p: Pool, tmp_path: Path) -> None:
    """Simulated: eviction of the running pod."""
    run_id = p.launch(tmp_path, "echo go")
    [pod] = p.bound_pods(run_id)
    p.kubelet.run(pod.metadata.name)
    p.wait_status(run_id, "RUNNING")
    p.kubelet.evict(pod.metadata.name)
    run = p.wait_status(run_id, "FAILED", "FINISHED")
    assert run["status"] == "FAILED" and run["reason"].startswith(f"lost: pod {pod.metadata.name} was evicted"), run
    assert run["reason"].endswith("(no retries left)"), run


def test_gpus_held_by_other_pods_are_not_offered(p: Pool) -> None:
    """Simulated: nothing beyond the kube-scheduler binding a pod that is not ours to gpu-h (1 GPU)."""
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "someone-elses", "namespace": NS},
             "spec": {"containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                      "nodeSelector": {"kubernetes.io/hostname": "gpu-h"}}}
    p.plane.core.create_namespaced_pod(NS, other)
    try:
        wait_for("gpu-h to offer no GPU", lambda: len(p.nodes()[f"{POOL}-gpu-h"]["gpus"]) == 0, timeout=20)
        assert p.total() == 4
    finally:
        p.plane.core.delete_namespaced_pod("someone-elses", NS)
    wait_for("gpu-h to offer its GPU again", lambda: len(p.nodes()[f"{POOL}-gpu-h"]["gpus"]) == 1, timeout=20)


def test_a_killed_pool_agent_comes_back_to_its_running_job_and_ships_only_the_rest_of_its_log(
        p: Pool, tmp_path: Path) -> None:
    """Simulated: the pod running and writing a line while its agent is dead, then succeeding."""
    run_id = p.launch(tmp_path, "python train.py")
    [pod] = p.bound_pods(run_id)
    p.kubelet.run(pod.metadata.name, "line 1\n")
    wait_for("line 1 at the scheduler", lambda: p.c.logs(run_id).get(0) == ["line 1"], timeout=20)
    pid = int((p.home / "agent.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for("the pool agent gone", lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
    p.kubelet.write(pod.metadata.name, "line 2\n")
    assert p.run(run_id)["status"] == "RUNNING"  # the Job runs on without its agent
    again = p.c.agents("login", p.c.admin, "--server", p.c.url, "--kubernetes", "--namespace", NS, "--name", POOL,
                       timeout=90, env={"KUBECONFIG": str(p.kubeconfig)})
    assert again.returncode == 0, (again.stderr, _agent_log(p.c))
    assert {n["id"] for n in p.nodes().values()} == set(json.loads((p.home / "pool.json").read_text())["nodes"].values())
    wait_for("line 2 at the scheduler", lambda: p.c.logs(run_id).get(0) == ["line 1", "line 2"], timeout=20)
    p.kubelet.exit(pod.metadata.name, 0)
    assert p.wait_status(run_id, "FINISHED", "FAILED")["status"] == "FINISHED"
    assert p.c.logs(run_id) == {0: ["line 1", "line 2"]}  # nothing shipped twice
    assert len(p.nodes()) == 3


def test_a_dead_pool_agents_pods_are_ended_by_the_cluster_before_the_run_is_written_off(
        p: Pool, tmp_path: Path) -> None:
    """Fencing for pods: every Job's activeDeadlineSeconds follows its node's lease, so when the pool agent dies
    the Job controller ends the pod before the scheduler may start attempt 2 (which then runs once the agent is
    back). Simulated: the pod running; the kubelet removing it once the Job controller deleted it."""
    run_id = p.launch(tmp_path, "python train.py", retry={"max_attempts": 2, "on": ["lost"]})
    [pod] = p.bound_pods(run_id)
    p.kubelet.run(pod.metadata.name, "attempt 1\n")
    wait_for("attempt 1's line at the scheduler", lambda: p.c.logs(run_id).get(0) == ["attempt 1"], timeout=20)
    [job1] = p.jobs(run_id)
    wait_for("a deadline on the Job", lambda: p.plane.batch.read_namespaced_job(
        job1.metadata.name, NS).spec.active_deadline_seconds, timeout=20)
    pid = int((p.home / "agent.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    ended: list[float] = []

    def pod_gone() -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            got = p.plane.core.read_namespaced_pod(pod.metadata.name, NS)
        except ApiException as exc:
            if exc.status == 404:
                ended.append(time.monotonic())
                return True
            raise
        if got.metadata.deletion_timestamp is not None:
            ended.append(time.monotonic())
            return True
        return False

    h = httpx.Client(base_url=p.c.url, headers={"Authorization": f"Bearer {p.c.admin}"}, timeout=10)
    written_off: list[float] = []
    while time.monotonic() - killed < 90 and not written_off:
        if not ended:
            pod_gone()
        run = h.get(f"/api/v1/runs/{run_id}").json()
        if run["attempt"] > 1 or run["status"] not in ("RUNNING", "STARTING"):
            written_off.append(time.monotonic())
        time.sleep(0.1)
    assert written_off, "the run was never written off"
    assert ended, "attempt 1's pod was still running when the scheduler wrote the run off"
    assert ended[0] < written_off[0], (ended[0] - killed, written_off[0] - killed)
    job = p.plane.batch.read_namespaced_job(job1.metadata.name, NS)
    assert any(c.reason == "DeadlineExceeded" for c in job.status.conditions or []), job.status
    print(f"pod fencing: pod ended {ended[0] - killed:.1f} s after the agent died, the run written off at "
          f"{written_off[0] - killed:.1f} s (gap {written_off[0] - ended[0]:.1f} s)")
    again = p.c.agents("login", p.c.admin, "--server", p.c.url, "--kubernetes", "--namespace", NS, "--name", POOL,
                       timeout=90, env={"KUBECONFIG": str(p.kubeconfig)})
    assert again.returncode == 0, (again.stderr, _agent_log(p.c))
    pod2 = wait_for("attempt 2's pod", lambda: next((x for x in p.bound_pods(run_id, 1, timeout=60)
                                                     if x.metadata.name != pod.metadata.name), None), timeout=60)
    p.kubelet.run(pod2.metadata.name, "attempt 2\n")
    p.kubelet.exit(pod2.metadata.name, 0)
    assert p.wait_status(run_id, "FINISHED", "FAILED", timeout=60)["status"] == "FINISHED"
    assert p.c.logs(run_id)[0] == ["attempt 1", "attempt 2"]
    h.close()


def test_a_deleted_kubernetes_node_leaves_the_pool_and_its_run_is_lost(p: Pool, tmp_path: Path) -> None:
    """Simulated: a fourth node joining (Ready, 1 GPU), its pod running, then the Node object deleted (as
    when a cloud's autoscaler removes a machine)."""
    p.kubelet.add_node("gpu-x", A100, 1)
    wait_for("gpu-x in the pool", lambda: f"{POOL}-gpu-x" in p.nodes(), timeout=20)
    run_id = p.launch(tmp_path, "sleep 1000", labels={"kubernetes.node": "gpu-x"})
    [pod] = p.bound_pods(run_id)
    assert pod.spec.node_name == "gpu-x"
    p.kubelet.run(pod.metadata.name)
    p.wait_status(run_id, "RUNNING")
    p.plane.core.delete_node("gpu-x")
    run = p.wait_status(run_id, "FAILED", "KILLED", "FINISHED")
    assert run["status"] == "FAILED" and f"node {POOL}-gpu-x was removed" in run["reason"], run
    wait_for("gpu-x out of the pool", lambda: f"{POOL}-gpu-x" not in p.nodes(), timeout=20)
    wait_for("the run's Job deleted", lambda: p.gone(run_id), timeout=30)


def test_the_manifests_are_accepted_by_the_api_server(plane: ControlPlane, pool: Pool) -> None:
    """Every object of deploy/kubernetes/*.yaml, created server-side with dryRun=All (validation, defaulting,
    admission), in the namespace the pool fixture created from agent.yaml."""
    from kubernetes import utils

    kinds = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            if doc["kind"] == "Namespace":
                continue
            try:
                utils.create_from_dict(plane.api, doc, dry_run="All")
            except utils.FailToCreateError as exc:
                if all(getattr(e, "status", None) == 409 for e in exc.api_exceptions):
                    continue  # the RBAC objects the fixture created for real
                raise
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment"] * 3 + ["PersistentVolumeClaim"] * 3 + ["Service"] * 2


def test_fedml_help_imports_no_kubernetes(tmp_path: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['fedml', '--help']\n"
            "try:\n    runpy.run_module('fedml_cli.main', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import fedml_cli.cluster\n"
            "assert 'kubernetes' not in sys.modules and 'runtime.kubernetes' not in sys.modules, 'kubernetes imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "--kubernetes" in subprocess.run([sys.executable, "-m", "fedml_cli.main", "login", "--help"],
                                            capture_output=True, text=True, timeout=60, cwd=ROOT).stdout


def test_login_kubernetes_with_an_unknown_context_fails_clearly(pool: Pool, tmp_path: Path) -> None:
    r = pool.c.agents("login", pool.c.admin, "--server", pool.c.url, "--kubernetes", "--context", "nope",
                      "--name", "other", timeout=60, env={"KUBECONFIG": str(pool.kubeconfig)})
    assert r.returncode == 3, r.stderr
    assert "--context nope: no such context in the kubeconfig (have: fedml-agent)" in r.stderr, r.stderr
    pool.c.agents("logout", "--name", "other")


def test_zz_logout_deletes_the_pools_jobs_and_nodes(pool: Pool, tmp_path: Path) -> None:
    """Runs last in this module. Simulated: nothing (the pod stays Pending, unbound to a running kubelet)."""
    run_id = pool.launch(tmp_path, "sleep 1000")
    wait_for("the Job", lambda: pool.jobs(run_id), timeout=30)
    r = pool.c.agents("logout", "--name", POOL, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"Pool {POOL} logged out" in r.stderr, r.stderr
    assert "warning" not in r.stderr, r.stderr
    wait_for("the pool's Jobs deleted", lambda: not pool.plane.batch.list_namespaced_job(
        NS, label_selector=f"fedml.ai/pool={POOL}").items, timeout=30)
    assert not pool.nodes()
    assert pool.run(run_id)["status"] in ("QUEUED", "FAILED")  # its node left: LOST, no retries -> FAILED
    pool.runs.clear()
