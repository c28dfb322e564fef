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

`kubernetes` is imported only where the API is used: the CLI never imports this package.

The package, by idea: `manifests` (names, labels and the Job/ConfigMap/Service documents: pure), `cluster` (one
list-and-watch cache of the pool's Jobs and pods), `runtime` (the Runtime that starts and re-attaches ranks) and
`pod` (a started rank's state machine and log follower).
"""
