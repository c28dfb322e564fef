"""What a rank becomes in Kubernetes, as plain documents: names, labels, the Job (with its fencing deadline),
its ConfigMap and the gang's headless Service. Pure: no API calls, table-tested in tests/test_kube_manifests.py."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from pathlib import Path
from typing import Any

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
