"""The Kubernetes Job manifest and the pod fencing deadline: pure functions, checked fast without a cluster
(tests/test_kubernetes.py runs them against a real API server)."""

from __future__ import annotations

import pytest

from runtime.kubernetes.manifests import GPU, GPU_PRODUCT, fence_deadline, fenced, job_manifest

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def manifest(**kw: object) -> dict:
    args: dict = {"name": "fedml-run-1-a1-r0", "namespace": "ns", "labels": {"fedml.ai/run-id": "run-1"},
                  "node": "gpu-a", "gpus": [0, 1], "gpu_product": "NVIDIA-A100-SXM4-80GB", "image": "img",
                  "pull_policy": None, "env": {"B": "2", "A": "1"}, "grace": 9.6}
    args.update(kw)
    return job_manifest(**args)  # type: ignore[arg-type]


def test_a_rank_is_one_pod_pinned_to_its_node_with_its_gpus() -> None:
    m = manifest(cpus=1.5, memory_gb=4)
    spec = m["spec"]
    pod = spec["template"]["spec"]
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # a retry is ours to decide
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-a"]}]}]
    assert pod["nodeSelector"] == {GPU_PRODUCT: "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    c = pod["containers"][0]
    assert c["resources"] == {"limits": {GPU: "2", "memory": "4096Mi"}, "requests": {"cpu": "1500m",
                                                                                     "memory": "4096Mi"}}
    assert [e["name"] for e in c["env"]] == ["A", "B"]  # sorted: the same job gives the same manifest
    assert pod["terminationGracePeriodSeconds"] == 10 and pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False  # no cluster credential inside the job
    assert "activeDeadlineSeconds" not in spec  # set by the runtime from the node's lease


def test_a_cpu_job_asks_for_no_gpu_and_tolerates_no_gpu_taint() -> None:
    pod = manifest(gpus=[], gpu_product=None)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "resources" not in pod["containers"][0] or GPU not in pod["containers"][0]["resources"].get("limits", {})


def test_the_fencing_deadline_ends_the_pods_grace_included_before_the_lease() -> None:
    # lease until t=1000, Job started at t=900, pods need 10 s to stop: deadline 89 s (pods gone by 999 + 1)
    assert fence_deadline(1000.0, 900.0, 10.0) == 89
    assert fence_deadline(1000.0, 999.5, 10.0) == 1  # already past: as soon as Kubernetes allows
    assert fence_deadline(1000.9, 900.0, 0.0) == 99  # rounded down, never past the lease


def test_only_a_deadline_failure_reads_as_fenced() -> None:
    def job(reason: str) -> dict:
        return {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason}]}}

    assert fenced(job("DeadlineExceeded"))
    assert not fenced(job("BackoffLimitExceeded")) and not fenced({}) and not fenced(None)
