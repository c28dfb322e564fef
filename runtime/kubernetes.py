"""The Kubernetes runtime: one rank of a run is one batch/v1 Job (one pod) on the Kubernetes node our
scheduler chose. Used by the pool agent (agents/k8s_agent.py), where every Kubernetes node is one of our nodes.

What a rank becomes (only batch/v1 and core/v1, so it works from Kubernetes 1.20 to today's):
    Job  fedml-<run>-a<attempt>-r<rank>   backoffLimit 0 (our retry policy decides), labels run id/attempt/rank/pool,
         pod pinned to the node by a required node affinity on metadata.name (the kube-scheduler still binds it
         and checks that it fits), nodeSelector nvidia.com/gpu.product when the job names a GPU type,
         limits nvidia.com/gpu from the placement, the run's env (CUDA_VISIBLE_DEVICES left to the device plugin)
    ConfigMap (same name)   the workspace as a tar.gz (at most WORKSPACE_MAX_BYTES) + bootstrap/job scripts;
         owned by the Job, so deleting the Job deletes it
    Service fedml-<run>-a<attempt>   multi-node only: headless, selects rank 0, so MASTER_ADDR / FEDML_NODE_0_ADDR
         is a stable DNS name (<service>.<namespace>.svc)

Pod phases -> our states: Pending -> STARTING (an image pull error -> FAILED with the reason), Running ->
RUNNING, Succeeded -> FINISHED, Failed -> FAILED with the exit code (Evicted, or the pod deleted under us ->
LOST). The pod's log is followed through the API server into stdout.log, which the agent ships like any
runtime's. Stop deletes the Job with foreground propagation and waits until its pods are gone.

`kubernetes` is imported only where the API is used: the CLI never imports this module.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import ExitStatus, Handle, LaunchSpec, Runtime, substitute
from .env import run_env

log = logging.getLogger("fedml.kubernetes")

LABEL_RUN = "fedml.ai/run-id"
LABEL_ATTEMPT = "fedml.ai/attempt"
LABEL_RANK = "fedml.ai/rank"
LABEL_POOL = "fedml.ai/pool"
ANNOTATION_GPUS = "fedml.ai/gpus"  # the GPU indices our scheduler allocated: lets the pool agent keep them stable
MANAGED_BY = "app.kubernetes.io/managed-by"
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"  # set by NVIDIA's GPU feature discovery
GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB, same source
CONTAINER = "job"
# A ConfigMap holds at most 1 MiB (data and binaryData together); the rest is for the scripts.
WORKSPACE_MAX_BYTES = 960 * 1024
IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                          "RegistryUnavailable"})
START_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
DEFAULT_IMAGE = "python:3.11-slim"
POD_WORKSPACE = "/workspace"
POD_FILES = "/fedml"
POD_ARTIFACTS = "/fedml-artifacts"

# Runs in the pod: unpack the workspace, then bootstrap and job with `set -e` semantics, as the process
# runtime does. A failing bootstrap says so in the termination message (the pod status carries it).
RUN_SH = r"""# written by the fedml agent
mkdir -p "$FEDML_WORKSPACE_DIR" "$FEDML_ARTIFACT_DIR" || exit 1
if [ -s /fedml/workspace.tar.gz ]; then
    tar -xzf /fedml/workspace.tar.gz -C "$FEDML_WORKSPACE_DIR" || { echo unpack > /dev/termination-log; exit 1; }
fi
cd "$FEDML_WORKSPACE_DIR" || exit 1
SH=sh
command -v bash >/dev/null 2>&1 && SH=bash
if [ -s /fedml/bootstrap.sh ]; then
    $SH -e /fedml/bootstrap.sh
    rc=$?
    if [ $rc -ne 0 ]; then
        echo bootstrap > /dev/termination-log
        exit $rc
    fi
fi
exec $SH -e /fedml/job.sh
"""


class KubeError(OSError):
    """The Kubernetes API refused or failed a request (the agent reports the run FAILED with this text)."""


def api_error(exc: Exception) -> str:
    """'403 Forbidden: jobs.batch is forbidden: ...' from an ApiException's JSON body, else str(exc)."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    try:
        msg = json.loads(body).get("message") if body else None
    except ValueError:
        msg = None
    if status:
        return f"{status} {getattr(exc, 'reason', '')}: {msg or body or ''}".strip(": ")
    return str(exc) or type(exc).__name__


def names(run_id: str, attempt: int, rank: int) -> tuple[str, str]:
    """(Job/ConfigMap name, headless Service name): DNS-1123 labels, one set per attempt."""
    base = f"fedml-{run_id}-a{attempt}".lower()[:55]
    return f"{base}-r{rank}", base


# -- manifests -----------------------------------------------------------------------------------------------

def labels_of(run_id: str, attempt: int, rank: int, pool: str) -> dict[str, str]:
    return {LABEL_RUN: run_id, LABEL_ATTEMPT: str(attempt), LABEL_RANK: str(rank), LABEL_POOL: pool,
            MANAGED_BY: "fedml-launch"}


def job_manifest(*, name: str, namespace: str, labels: dict[str, str], node: str, gpus: list[int],
                 gpu_product: str | None, image: str, pull_policy: str | None, env: dict[str, str], grace: float,
                 cpus: float | None = None, memory_gb: float | None = None, port: int | None = None) -> dict[str, Any]:
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if gpus:
        limits[GPU] = str(len(gpus))  # extended resources: the request defaults to the limit
    if cpus:
        requests["cpu"] = f"{int(cpus * 1000)}m"
    if memory_gb:
        requests["memory"] = limits["memory"] = f"{int(memory_gb * 1024)}Mi"
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": ["/bin/sh", f"{POD_FILES}/run.sh"],
        "workingDir": POD_WORKSPACE,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "volumeMounts": [{"name": "fedml", "mountPath": POD_FILES, "readOnly": True},
                         {"name": "workspace", "mountPath": POD_WORKSPACE},
                         {"name": "artifacts", "mountPath": POD_ARTIFACTS}],
        "terminationMessagePolicy": "File",
    }
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    if port:
        container["ports"] = [{"name": "master", "containerPort": port}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": max(1, round(grace)),
        # Our scheduler picked the node (its GPU accounting is per node); the kube-scheduler binds the pod
        # there only if it fits, and the pod waits Pending otherwise.
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}},
        "containers": [container],
        "volumes": [{"name": "fedml", "configMap": {"name": name}},
                    {"name": "workspace", "emptyDir": {}},
                    {"name": "artifacts", "emptyDir": {}}],
        "enableServiceLinks": False,
        # A job holds no credential to the cluster: with the namespace's service account token it could, where
        # RBAC allows, patch its own Job's deadline (its fencing) or reach other workloads.
        "automountServiceAccountToken": False,
    }
    if gpu_product:
        pod_spec["nodeSelector"] = {GPU_PRODUCT: gpu_product}
    if gpus:  # GPU nodes are commonly tainted so that only pods asking for GPUs land there
        pod_spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"labels": labels, "annotations": {ANNOTATION_GPUS: ",".join(map(str, gpus))}},
                         "spec": pod_spec},
        },
    }


def owned_by(job: dict[str, Any]) -> list[dict[str, Any]]:
    meta = job["metadata"]
    return [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
             "blockOwnerDeletion": True}]


def configmap_manifest(*, name: str, namespace: str, labels: dict[str, str], owner: list[dict[str, Any]],
                       workspace_tgz: bytes, bootstrap: str, job: str) -> dict[str, Any]:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owner},
        "data": {"run.sh": RUN_SH, "bootstrap.sh": bootstrap, "job.sh": job},
        "binaryData": {"workspace.tar.gz": base64.b64encode(workspace_tgz).decode()},
    }


def service_manifest(*, name: str, namespace: str, labels: dict[str, str], owner: list[dict[str, Any]],
                     selector: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owner},
        "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": True,
                 "ports": [{"name": "master", "port": port, "targetPort": port}]},
    }


def pack_workspace(workspace: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for p in sorted(workspace.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(workspace)), recursive=False)
    return buf.getvalue()


# -- the cluster, as lists + watches -------------------------------------------------------------------------

class Cluster:
    """A live view of the cluster's nodes and pods: listed once, then kept current by watches (never by
    polling). Shared by the pool agent (capacity) and every PodHandle (its pod's phase).

    Pods are watched cluster-wide where RBAC allows it (so GPUs held by other workloads are seen), else in
    `namespace` only."""

    WATCH_S = 240

    def __init__(self, api_client: Any, namespace: str, pool: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.namespace, self.pool = namespace, pool
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._by_job: dict[str, dict[str, dict[str, Any]]] = {}  # our namespace's pods by their job-name label
        self.all_namespaces = True
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._stopping = threading.Event()
        self.synced = threading.Event()

    def listen(self, fn: Callable[[str], None]) -> None:
        """`fn(kind)` is called (on a watch thread) after every change of a node or pod."""
        self._listeners.append(fn)

    def unlisten(self, fn: Callable[[str], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def _changed(self, kind: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind)
            except Exception:
                log.exception("a %s listener failed", kind)

    def start(self) -> None:
        """List nodes and pods (raises KubeError if the API refuses), then keep them current in two threads."""
        from kubernetes.client.exceptions import ApiException

        try:
            node_rv = self._relist("nodes")
            try:
                pod_rv = self._relist("pods")
            except ApiException as exc:
                if exc.status != 403:
                    raise
                log.warning("may not list pods cluster-wide (%s); watching namespace %s only: GPUs held by other "
                            "namespaces' pods are not seen", api_error(exc), self.namespace)
                self.all_namespaces = False
                pod_rv = self._relist("pods")
        except ApiException as exc:
            raise KubeError(api_error(exc)) from None
        except Exception as exc:  # urllib3's connection errors, bad TLS, ...
            raise KubeError(f"cannot reach the Kubernetes API: {exc}") from None
        self.synced.set()
        for kind, rv in (("nodes", node_rv), ("pods", pod_rv)):
            threading.Thread(target=self._watch, args=(kind, rv), name=f"watch-{kind}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _list_fn(self, kind: str) -> Callable[..., Any]:
        if kind == "nodes":
            return self.core.list_node
        if self.all_namespaces:
            return self.core.list_pod_for_all_namespaces
        return lambda **kw: self.core.list_namespaced_pod(self.namespace, **kw)

    def _relist(self, kind: str) -> str:
        resp = self._list_fn(kind)(_preload_content=False, _request_timeout=60)
        doc = json.loads(resp.data)
        with self._lock:
            if kind == "nodes":
                self.nodes = {o["metadata"]["name"]: o for o in doc["items"]}
            else:
                self.pods = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in doc["items"]}
                self._by_job = {}
                for o in doc["items"]:
                    self._index(o, deleted=False)
        self._changed(kind)
        return str(doc["metadata"]["resourceVersion"])

    def _watch(self, kind: str, rv: str) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                rv = self._watch_once(kind, rv)
                delay = 0.5
            except _Gone:
                rv = self._safe_relist(kind, rv)
            except Exception as exc:  # the API server restarted, the connection dropped: list again
                log.info("%s watch interrupted (%s); listing again in %.1f s", kind, api_error(exc), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)
                rv = self._safe_relist(kind, rv)

    def _safe_relist(self, kind: str, rv: str) -> str:
        try:
            return self._relist(kind)
        except Exception as exc:
            log.info("listing %s failed: %s", kind, api_error(exc))
            return rv

    def _watch_once(self, kind: str, rv: str) -> str:
        resp = self._list_fn(kind)(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                   timeout_seconds=self.WATCH_S, _preload_content=False,
                                   _request_timeout=(10, self.WATCH_S + 30))
        try:
            buf = b""
            for chunk in resp.stream(65536, decode_content=False):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    obj, typ = ev["object"], ev["type"]
                    if typ == "ERROR":
                        if obj.get("code") == 410:
                            raise _Gone()
                        raise KubeError(f"watch error: {obj.get('message')}")
                    rv = obj["metadata"]["resourceVersion"]
                    if typ == "BOOKMARK":
                        continue
                    self._apply(kind, typ, obj)
        finally:
            resp.release_conn()
        return rv

    def _apply(self, kind: str, typ: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            if kind == "nodes":
                if typ == "DELETED":
                    self.nodes.pop(meta["name"], None)
                else:
                    self.nodes[meta["name"]] = obj
            else:
                key = (meta["namespace"], meta["name"])
                if typ == "DELETED":
                    self.pods.pop(key, None)
                else:
                    self.pods[key] = obj
                self._index(obj, deleted=typ == "DELETED")
        self._changed(kind)

    def _index(self, pod: dict[str, Any], deleted: bool) -> None:
        meta = pod["metadata"]
        job = (meta.get("labels") or {}).get("job-name")
        if job is None or meta["namespace"] != self.namespace:
            return
        pods = self._by_job.setdefault(job, {})
        if deleted:
            pods.pop(meta["name"], None)
            if not pods:
                del self._by_job[job]
        else:
            pods[meta["name"]] = pod

    # -- queries -----------------------------------------------------------------------------------------
    def pods_of_job(self, job: str) -> list[dict[str, Any]]:
        """The Job's pods, oldest first (the job controller labels them job-name=<job>)."""
        with self._lock:
            pods = list(self._by_job.get(job, {}).values())
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def ours(self, pod: dict[str, Any]) -> bool:
        return (pod["metadata"]["namespace"] == self.namespace
                and pod["metadata"].get("labels", {}).get(LABEL_POOL) == self.pool)

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            return dict(self.nodes), list(self.pods.values())


class _Gone(Exception):
    """The watch's resource version is too old (HTTP 410): list again."""


def pod_gpus(pod: dict[str, Any]) -> int:
    """GPUs a pod holds: the largest of its init containers' requests and the sum of its containers'."""
    def req(c: dict[str, Any]) -> int:
        res = c.get("resources") or {}
        v = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU) or 0
        try:
            return int(v)
        except ValueError:
            return 0

    spec = pod.get("spec") or {}
    return max([sum(req(c) for c in spec.get("containers") or []),
                *(req(c) for c in spec.get("initContainers") or [])])


def pod_active(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


# -- the runtime ---------------------------------------------------------------------------------------------

class KubernetesRuntime(Runtime):
    """Starts ranks as Jobs on one Kubernetes node (`node`) of the cluster."""

    name = "kubernetes"

    def __init__(self, cluster: Cluster, node: str, *, image: str = DEFAULT_IMAGE, stop_grace: float = 10.0) -> None:
        self.cluster, self.node, self.image, self.stop_grace = cluster, node, image, stop_grace
        # Wall-clock second the node's lease runs out (0: no lease yet): a Job is created with an
        # activeDeadlineSeconds inside it, and the agent moves the deadline on as it renews the lease.
        self.lease_until = 0.0

    def start(self, spec: LaunchSpec) -> PodHandle:
        from kubernetes.client.exceptions import ApiException

        a, job_spec = spec.assignment, spec.job_spec
        assert a is not None and job_spec is not None, "the agent passes the assignment and spec to pools"
        if job_spec.serves:
            raise KubeError(f"job_type {job_spec.job_type}: endpoints do not run on Kubernetes pools yet "
                            "(their supervisor and gateway need the process runtime)")
        run = a.run
        ns, pool = self.cluster.namespace, self.cluster.pool
        job_name, svc_name = names(run.id, run.attempt, a.rank)
        labels = labels_of(run.id, run.attempt, a.rank, pool)
        tgz = pack_workspace(spec.workspace)
        if len(tgz) > WORKSPACE_MAX_BYTES:
            raise KubeError(f"the workspace is {len(tgz) / 1024:.0f} KiB compressed; the kubernetes runtime "
                            f"delivers it in a ConfigMap, which holds at most {WORKSPACE_MAX_BYTES // 1024} KiB "
                            "(put large files in the image or fetch them in bootstrap)")
        multi = a.num_nodes > 1
        node0 = f"{svc_name}.{ns}.svc" if multi else "127.0.0.1"
        edge = spec.env.get("FEDML_CURRENT_EDGE_ID", "")
        # The pod does not inherit the agent's environment (base={}): the image's PATH and friends apply.
        env = run_env(run_id=run.id, spec=job_spec, node_id=edge, rank=a.rank, num_nodes=a.num_nodes,
                      node0_addr=node0, node0_port=a.node0_port, gpus=[], overrides=run.env, base={},
                      artifact_dir=POD_ARTIFACTS)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the device plugin exposes exactly the pod's GPUs
        env.update(FEDML_RUN_DIR=POD_FILES, FEDML_WORKSPACE_DIR=POD_WORKSPACE)
        c = job_spec.computing
        node = self.cluster.nodes.get(self.node) or {}
        product = node.get("metadata", {}).get("labels", {}).get(GPU_PRODUCT) if c.resource_type and a.gpus else None
        image = (job_spec.docker.image if job_spec.docker and job_spec.docker.image else None) or self.image
        manifest = job_manifest(name=job_name, namespace=ns, labels=labels, node=self.node, gpus=a.gpus,
                                gpu_product=product, image=image, pull_policy=job_spec.image_pull_policy, env=env,
                                grace=self.stop_grace, cpus=getattr(c, "cpus", None),
                                memory_gb=getattr(c, "memory_gb", None),
                                port=a.node0_port if multi and a.rank == 0 else None)
        if self.lease_until:
            manifest["spec"]["activeDeadlineSeconds"] = fence_deadline(self.lease_until, time.time(), self.stop_grace)
        try:
            created = self.cluster.batch.create_namespaced_job(ns, manifest, _preload_content=False)
            job = json.loads(created.data)
        except ApiException as exc:
            if exc.status != 409:  # 409: created before an agent restart; adopt it
                raise KubeError(f"creating Job {job_name}: {api_error(exc)}") from None
            job = json.loads(self.cluster.batch.read_namespaced_job(job_name, ns, _preload_content=False).data)
        except Exception as exc:
            raise KubeError(f"creating Job {job_name}: {exc}") from None
        handle = PodHandle(self.cluster, job_name, run.id, spec.run_dir, image=image, grace=self.stop_grace)
        try:
            owner = owned_by(job)
            cm = configmap_manifest(name=job_name, namespace=ns, labels=labels, owner=owner, workspace_tgz=tgz,
                                    bootstrap=substitute(spec.bootstrap, env) + "\n", job=substitute(spec.job, env) + "\n")
            _create(lambda: self.cluster.core.create_namespaced_config_map(ns, cm))
            if multi and a.rank == 0:
                svc = service_manifest(name=svc_name, namespace=ns, labels={**labels, LABEL_RANK: "0"}, owner=owner,
                                       selector={LABEL_RUN: run.id, LABEL_ATTEMPT: str(run.attempt), LABEL_RANK: "0"},
                                       port=a.node0_port)
                _create(lambda: self.cluster.core.create_namespaced_service(ns, svc))
        except Exception as exc:
            handle._delete("Background")  # its pod would wait for the ConfigMap forever
            handle.cluster.unlisten(handle._on_change)
            raise KubeError(f"creating the ConfigMap/Service of Job {job_name}: {api_error(exc)}") from None
        log.info("run %s rank %d: Job %s/%s on node %s (%d GPU)", run.id, a.rank, ns, job_name, self.node, len(a.gpus))
        return handle

    def reattach(self, state: dict[str, Any], run_dir: Path) -> PodHandle | None:
        from kubernetes.client.exceptions import ApiException

        if state.get("runtime") != self.name or not state.get("job"):
            return None
        try:
            self.cluster.batch.read_namespaced_job(state["job"], self.cluster.namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
        return PodHandle(self.cluster, state["job"], str(state.get("run_id", "")), run_dir, image=state.get("image", ""),
                         grace=self.stop_grace)


FENCED = ("fenced: the node's lease ran out before its agent renewed it (the Job's deadline ended its pods, so "
          "another attempt may start elsewhere)")


def fenced(job: dict[str, Any] | None) -> bool:
    """The Job was ended by the fencing deadline (not by its own failure)."""
    return any(c.get("type") == "Failed" and c.get("status") == "True" and c.get("reason") == "DeadlineExceeded"
               for c in ((job or {}).get("status") or {}).get("conditions") or [])


def fence_deadline(lease_until: float, job_start: float, grace: float) -> int:
    """activeDeadlineSeconds for a Job started at `job_start` whose pods must be gone (stop grace included) by
    `lease_until`, both wall-clock seconds; whole seconds, rounded down, at least 1."""
    return max(1, math.floor(lease_until - grace - 1.0 - job_start))


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _create(fn: Callable[[], Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        fn()
    except ApiException as exc:
        if exc.status != 409:  # exists already: made before an agent restart
            raise


class PodHandle(Handle):
    """A started rank: reads its pod's state from the Cluster's watch cache, follows its log into stdout.log.

    `outcome` is set when the pod's end is not just an exit code: (status, reason, exit code) with status
    LOST (evicted, deleted under us) or FAILED (image pull error, OOMKilled...). `on_running` is called once,
    on the polling thread, when the pod first runs."""

    LOG_GRACE_S = 20.0  # after the pod ended, how long to keep trying to read the rest of its log

    def __init__(self, cluster: Cluster, job: str, run_id: str, run_dir: Path, image: str = "",
                 grace: float = 10.0) -> None:
        self.cluster, self.job, self.run_id, self.run_dir, self.image = cluster, job, run_id, run_dir, image
        self.grace = grace
        self._job_start: float | None = None  # the Job's status.startTime: what activeDeadlineSeconds counts from
        self._deadline: int | None = None
        self.namespace = cluster.namespace
        self.outcome: tuple[str, str, int | None] | None = None
        self.on_running: Callable[[], None] | None = None
        self._running_seen = False
        self._status: ExitStatus | None = None
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._pod_name: str | None = None
        self._ended_at: float | None = None
        self._logs: threading.Thread | None = None
        self._logs_done = threading.Event()
        self._created = time.monotonic()
        self._job_checked = 0.0
        self._cleaned = False
        run_dir.mkdir(parents=True, exist_ok=True)
        cluster.listen(self._on_change)

    def fence_until(self, lease_until: float) -> None:
        """Fencing for pods: the node's lease runs out at wall-clock `lease_until`; have the cluster's own Job
        controller end this Job's pods before then (activeDeadlineSeconds, counted from the Job's start, minus
        the pods' stop grace). Called each time the agent renews the lease; if the agent dies, is stopped or
        is cut off, nobody moves the deadline and the pods are gone before the scheduler writes the node off,
        whether or not the agent's machine still reaches the cluster."""
        from kubernetes.client.exceptions import ApiException

        if self._status is not None or self._stopping.is_set():
            return
        if self._job_start is None:
            job = self._read_job()
            if not job:
                return
            meta, st = job.get("metadata") or {}, job.get("status") or {}
            stamp = st.get("startTime") or meta.get("creationTimestamp")
            if not stamp:
                return
            self._job_start = _epoch(stamp)
            self._deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        deadline = fence_deadline(lease_until, self._job_start, self.grace)
        if self._deadline is not None and deadline <= self._deadline:
            return  # never shortened: a renewal only moves it on
        try:
            self.cluster.batch.patch_namespaced_job(self.job, self.namespace,
                                                    {"spec": {"activeDeadlineSeconds": deadline}},
                                                    _preload_content=False)
            self._deadline = deadline
        except ApiException as exc:
            if exc.status != 404:
                log.warning("Job %s: could not move its deadline on: %s", self.job, api_error(exc))
        except Exception as exc:
            log.warning("Job %s: could not move its deadline on: %s", self.job, exc)

    # -- Handle --------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"runtime": "kubernetes", "job": self.job, "namespace": self.namespace, "run_id": self.run_id,
                "image": self.image}

    def log_files(self) -> dict[str, Path]:
        return {"stdout": self.run_dir / "stdout.log", "stderr": self.run_dir / "stderr.log"}

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def _on_change(self, kind: str) -> None:
        if kind == "pods":
            self._changed.set()

    def poll(self) -> ExitStatus | None:
        if self._status is not None:
            return self._status
        pods = self.cluster.pods_of_job(self.job)
        pod = next((p for p in reversed(pods) if p["metadata"]["name"] == self._pod_name), None) or (
            pods[-1] if pods else None)
        if pod is None:
            return self._no_pod()
        self._pod_name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        phase = st.get("phase") or "Pending"
        cs = next((c for c in st.get("containerStatuses") or [] if c.get("name") == CONTAINER), {})
        state = cs.get("state") or {}
        if phase == "Pending":
            if self._stopping.is_set():
                return self._end(137, None, cleanup=False) if self._job_gone() else None
            waiting = state.get("waiting") or {}
            why = waiting.get("reason")
            if why in IMAGE_ERRORS:
                return self._end(125, ("FAILED", f"image {self.image}: {why}: {waiting.get('message') or ''}".rstrip(": "),
                                       None))
            if why in START_ERRORS:
                return self._end(126, ("FAILED", f"{why}: {waiting.get('message') or ''}".rstrip(": "), None))
            return None
        if phase == "Running" or state.get("running") or state.get("terminated"):
            self._follow_logs(pod)
            if not self._running_seen:
                self._running_seen = True
                if self.on_running:
                    self.on_running()
        if phase == "Running":
            return None
        if phase == "Unknown":
            return None
        # Succeeded or Failed
        if st.get("reason") == "Evicted":
            return self._end(137, ("LOST", f"pod {self._pod_name} was evicted: {st.get('message') or ''}".rstrip(": "),
                                   None), wait_logs=self._logs is not None)
        term = state.get("terminated") or {}
        if not term:
            why = st.get("reason") or "the pod failed before its container ran"
            return self._end(1, ("FAILED", f"{why}: {st.get('message') or ''}".rstrip(": "), None))
        code = int(term.get("exitCode", 1))
        if term.get("reason") == "OOMKilled":
            return self._end(code, ("FAILED", f"OOMKilled: the container exceeded its memory limit (exit code {code})",
                                    code), wait_logs=True)
        phase_of = "bootstrap" if (term.get("message") or "").strip() in ("bootstrap", "unpack") else "job"
        return self._end(code, None, phase=phase_of, wait_logs=True)

    def _no_pod(self) -> ExitStatus | None:
        if self._stopping.is_set():
            if self._job_gone():
                return self._end(137, None, cleanup=False)
            return None
        if self._pod_name is not None:  # we saw it, and now it is gone without ending
            return self._end(137, ("LOST", f"pod {self._pod_name} was deleted before it ended", None),
                             wait_logs=self._logs is not None)
        # No pod yet: normal for a moment. Now and then ask the Job why (quota, admission, deleted under us).
        now = time.monotonic()
        if now - self._job_checked > 5.0:
            self._job_checked = now
            job = self._read_job()
            if job is None:
                return self._end(137, ("LOST", f"Job {self.job} was deleted", None), cleanup=False)
            if fenced(job):
                return self._end(137, ("LOST", FENCED, None), cleanup=False)
            for cond in (job.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Failed" and cond.get("status") == "True":
                    return self._end(1, ("FAILED", f"Job {self.job}: {cond.get('reason')}: {cond.get('message')}", None))
        return None

    def _read_job(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self.cluster.batch.read_namespaced_job(self.job, self.namespace,
                                                                     _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            return {}
        except Exception:
            return {}

    def _job_gone(self) -> bool:
        now = time.monotonic()
        if now - self._job_checked < 0.25:
            return False
        self._job_checked = now
        return self._read_job() is None

    def _end(self, code: int, outcome: tuple[str, str, int | None] | None, *, phase: str = "job",
             wait_logs: bool = False, cleanup: bool = True) -> ExitStatus | None:
        """The pod is over: wait (bounded) for its log to be read, then delete the Job and answer."""
        if self._ended_at is None:
            self._ended_at = time.monotonic()
        if wait_logs and self._logs is not None and not self._logs_done.is_set():
            if time.monotonic() - self._ended_at < self.LOG_GRACE_S:
                return None
            self._note("the rest of the pod's log could not be read")
        self.outcome = outcome
        self._status = ExitStatus(code=code, phase=phase)
        if cleanup and not self._stopping.is_set():
            self._delete("Background")
        self.cluster.unlisten(self._on_change)
        return self._status

    def _delete(self, propagation: str) -> None:
        """Delete the Job; its pods, ConfigMap and Service go with it (owner references)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        log.info("deleting Job %s (%s)", self.job, "stop" if self._stopping.is_set() else
                 (self.outcome[1] if self.outcome else f"ended: {self._status}"))
        try:
            self.cluster.batch.delete_namespaced_job(self.job, self.namespace,
                                                     body=client.V1DeleteOptions(propagation_policy=propagation))
        except ApiException as exc:
            if exc.status != 404:
                log.warning("deleting Job %s: %s", self.job, api_error(exc))
        except Exception as exc:
            log.warning("deleting Job %s: %s", self.job, exc)

    def stop(self, grace: float) -> None:
        """Delete the Job (foreground: the Job goes once its pods are gone), wait until it is gone."""
        self._stopping.set()
        self._delete("Foreground")
        deadline = time.monotonic() + grace + 30
        while time.monotonic() < deadline:
            if self._read_job() is None and not self.cluster.pods_of_job(self.job):
                break
            time.sleep(0.2)
        else:
            log.warning("Job %s still has pods %.0f s after it was deleted (is the node's kubelet down?)",
                        self.job, grace + 30)
        self._changed.set()

    # -- logs ----------------------------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        with open(self.run_dir / "stderr.log", "a") as f:
            f.write(f"[fedml] {text}\n")

    def _follow_logs(self, pod: dict[str, Any]) -> None:
        if self._logs is None:
            self._logs = threading.Thread(target=self._read_logs, args=(pod["metadata"]["name"],),
                                          name=f"logs-{self.job}", daemon=True)
            self._logs.start()

    def _read_logs(self, pod: str) -> None:
        """Follow the container's log into stdout.log. A re-read (the stream dropped, the agent restarted)
        starts from the beginning of the pod's log and skips the bytes the file already holds."""
        from kubernetes.client.exceptions import ApiException

        out = self.run_dir / "stdout.log"
        delay, said = 0.2, ""
        try:
            while True:
                last_error = ""
                have = out.stat().st_size if out.exists() else 0
                ended = self._pod_ended(pod)
                try:
                    resp = self.cluster.core.read_namespaced_pod_log(
                        pod, self.namespace, container=CONTAINER, follow=not ended, _preload_content=False,
                        # a quiet job's follow is re-opened after an hour of silence (the skip makes it seamless)
                        _request_timeout=(10, 3600))
                    try:
                        skip = have
                        with open(out, "ab") as f:
                            for chunk in resp.stream(65536, decode_content=True):
                                if skip:
                                    cut = min(skip, len(chunk))
                                    chunk, skip = chunk[cut:], skip - cut
                                if chunk:
                                    f.write(chunk)
                                    f.flush()
                                    self._changed.set()
                    finally:
                        resp.release_conn()
                    if ended or self._pod_ended(pod):
                        if not ended:
                            continue  # one more plain read catches what the follow may have missed
                        return
                    delay = 0.2
                except ApiException as exc:
                    last_error = api_error(exc)
                    if exc.status == 404 and self._stopping.is_set():
                        return
                    if exc.status == 404 or (ended and time.monotonic() - (self._ended_at or 0) > self.LOG_GRACE_S):
                        self._note(f"the pod's log could not be read: {last_error}")
                        return
                except Exception as exc:
                    last_error = str(exc)
                if last_error and last_error != said:
                    log.info("Job %s: reading the log of pod %s: %s", self.job, pod, last_error)
                    said = last_error
                if self._stopping.is_set() and self._pod_gone(pod):
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._logs_done.set()
            self._changed.set()

    def _pod_ended(self, name: str) -> bool:
        pod = self.cluster.pods.get((self.namespace, name))
        return pod is None or not pod_active(pod)

    def _pod_gone(self, name: str) -> bool:
        return (self.namespace, name) not in self.cluster.pods
