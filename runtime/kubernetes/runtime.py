"""The Kubernetes runtime: starts a rank as a Job (with its ConfigMap and, for a gang, a Service) and
re-attaches to one after an agent restart."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..base import LaunchSpec, Runtime, substitute
from ..env import run_env
from .cluster import Cluster
from .manifests import (
    DEFAULT_IMAGE,
    GPU_PRODUCT,
    LABEL_ATTEMPT,
    LABEL_RANK,
    LABEL_RUN,
    POD_ARTIFACTS,
    POD_FILES,
    POD_WORKSPACE,
    WORKSPACE_MAX_BYTES,
    KubeError,
    api_error,
    configmap_manifest,
    fence_deadline,
    job_manifest,
    labels_of,
    names,
    owned_by,
    pack_workspace,
    service_manifest,
)
from .pod import PodHandle, _create

log = logging.getLogger("fedml.kubernetes")

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
