"""The Kubernetes pool agent: one process represents a cluster (or one namespace of it) as a pool of nodes.

    python -m agents.k8s_agent --server URL --home DIR --pool NAME [--kubeconfig F] [--context C] [--namespace NS]
                               [--in-cluster] [--image IMG] [--label K=V] [--price-per-gpu-hour P]
    (`fedml login KEY --server URL --kubernetes ...` starts it; the key comes in a file it deletes, --key-file)

Each Kubernetes node is one node of ours, named POOL-NODE, labelled pool=POOL and kubernetes.node=NODE, so our
placement (GPU counts per node, a gang on distinct nodes) works unchanged and every rank's Job is pinned to the
node it was placed on. A node offers its allocatable nvidia.com/gpu minus what other pods hold there (ours are
counted by the scheduler's placements); its GPU name is the node's nvidia.com/gpu.product label. A node that is
not Ready, cordoned or tainted against us offers no new GPUs (and leaves the pool once none of our runs is on it);
a deleted node leaves at once (its runs become LOST). All of it is driven by the node and pod watches in
runtime.kubernetes.cluster.Cluster, not by polling.

State: DIR/pool.json (what `fedml logout` needs), DIR/nodes/<node>/ (one agent home per node: node key, runs/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runtime import fence
from runtime.kubernetes.cluster import Cluster, pod_active, pod_gpus
from runtime.kubernetes.manifests import (
    ANNOTATION_GPUS,
    DEFAULT_IMAGE,
    FENCED,
    GPU,
    GPU_MEMORY,
    GPU_PRODUCT,
    LABEL_POOL,
    KubeError,
    api_error,
    fenced,
)
from runtime.kubernetes.pod import PodHandle
from runtime.kubernetes.runtime import KubernetesRuntime
from scheduler.contract.models import GpuInfo, NodeInfo, RunStatus

from .agent import Agent, _read_key, _SingleInstance
from .client import AgentClient, Refused, Unreachable
from .worker import RunWorker, _write_json

log = logging.getLogger("fedml.k8s")

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PodWorker(RunWorker):
    """A rank whose job is a pod: RUNNING is reported when the pod runs (not when its Job is created), and an
    end that is not just an exit code (evicted -> LOST, image pull error -> FAILED with the reason) is
    reported as such."""

    def _report_running(self) -> None:
        pass  # reported by on_running, from the follow loop

    def _follow(self) -> None:
        if isinstance(self.handle, PodHandle):
            self.handle.on_running = lambda: self._retry(lambda: self.agent.client.report(
                self.run_id, self.attempt, self.agent.node_id, RunStatus.RUNNING))
        super()._follow()

    def _report_final(self, status: RunStatus, code: int | None, reason: str | None) -> None:
        outcome = getattr(self.handle, "outcome", None)
        if outcome is not None and status != RunStatus.KILLED:
            status, reason, code = RunStatus(outcome[0]), outcome[1], outcome[2]
        elif status == RunStatus.FAILED and isinstance(self.handle, PodHandle) and fenced(self.handle._read_job()):
            status, reason, code = RunStatus.LOST, FENCED, None  # its pod was ended by the lease's deadline
        super()._report_final(status, code, reason)


class NodeAgent(Agent):
    """The agent of one Kubernetes node, inside the pool process."""

    worker_class = PodWorker

    def runtime_for(self, name: str) -> Any:
        return self.runtime  # every job of a pool runs as a pod, containerized or not

    def _sweep_containers(self) -> None:
        pass  # no local containers: our Jobs carry the pool's label

    def _lease_renewed(self) -> None:
        # Pods are fenced by the cluster itself: each Job's activeDeadlineSeconds follows this node's lease
        # (runtime/kubernetes/pod.py: PodHandle.fence_until), so no guard process is needed on this machine.
        until, _ = fence.read(self.lease_file)
        if until <= 0:
            return
        wall = time.time() + (until - fence.now())
        self.runtime.lease_until = wall
        for w in list(self.workers.values()):
            if isinstance(w.handle, PodHandle):
                w.handle.fence_until(wall)


def _quantity(v: Any, default: float = 0.0) -> float:
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(v)) if v is not None else default
    except (ValueError, TypeError):
        return default


def _taints_against_us(node: dict[str, Any]) -> list[str]:
    return [f"{t.get('key')}:{t.get('effect')}" for t in (node.get("spec") or {}).get("taints") or []
            if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") != GPU]


def _ready(node: dict[str, Any]) -> bool:
    conds = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


class Pool:
    def __init__(self, server: str, home: Path, join_key: str | None, cluster: Cluster, *, image: str,
                 labels: dict[str, str], price: float | None, stop_grace: float, context: str | None,
                 kubeconfig: str | None, in_cluster: bool = False) -> None:
        self.server, self.home, self.join_key, self.cluster = server, home, join_key, cluster
        self.image, self.labels, self.price, self.stop_grace = image, labels, price, stop_grace
        self.context, self.kubeconfig, self.in_cluster = context, kubeconfig, in_cluster
        self.agents: dict[str, NodeAgent] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.dirty = threading.Event()
        self.stopping = threading.Event()
        cluster.listen(lambda kind: self.dirty.set())

    @property
    def name(self) -> str:
        return self.cluster.pool

    # -- what each node offers ---------------------------------------------------------------------------
    def inventory(self, nodes: dict[str, dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, NodeInfo]:
        """NodeInfo of every node that should be in the pool now."""
        foreign: dict[str, int] = {}
        held: dict[str, set[int]] = {}
        for p in pods:
            where = (p.get("spec") or {}).get("nodeName")
            if not where or not pod_active(p):
                continue
            if self.cluster.ours(p):
                gpus = (p["metadata"].get("annotations") or {}).get(ANNOTATION_GPUS, "")
                held.setdefault(where, set()).update(int(i) for i in gpus.split(",") if i.isdigit())
            else:
                foreign[where] = foreign.get(where, 0) + pod_gpus(p)
        out = {}
        busy = self._with_runs()
        for name, node in nodes.items():
            ours = held.get(name, set())
            usable = _ready(node) and not (node.get("spec") or {}).get("unschedulable") and not _taints_against_us(node)
            if not usable and not ours and name not in busy:
                continue
            alloc = int(_quantity((node.get("status") or {}).get("allocatable", {}).get(GPU)))
            free_n = max(0, alloc - foreign.get(name, 0) - len(ours)) if usable else 0
            indices = sorted(ours) + [i for i in range(alloc + len(ours)) if i not in ours][:free_n]
            labels = node["metadata"].get("labels") or {}
            product = labels.get(GPU_PRODUCT) or GPU
            mem = int(labels[GPU_MEMORY]) if (labels.get(GPU_MEMORY) or "").isdigit() else 0  # MiB
            status = node.get("status") or {}
            address = next((a["address"] for a in status.get("addresses") or [] if a.get("type") == "InternalIP"),
                           "127.0.0.1")
            extra = {} if usable else {"kubernetes.schedulable": "false"}
            out[name] = NodeInfo(
                name=f"{self.name}-{name}",
                gpus=[GpuInfo(index=i, name=product, memory_mb=mem) for i in indices],
                cpus=max(1, int(_quantity(status.get("allocatable", {}).get("cpu"), 1))),
                memory_mb=int(_quantity(status.get("allocatable", {}).get("memory")) // (1024 * 1024)),
                labels={**self.labels, "pool": self.name, "kubernetes.node": name,
                        "kubernetes.namespace": self.cluster.namespace, **extra},
                price_per_gpu_hour=self.price,
                # Jobs run in containers in pods: process jobs and containerized ones alike.
                runtimes=["process", "docker", "kubernetes"],
                address=address,
                agent_version=_version(),
                job_user="pod",  # jobs run in pods, apart from this agent and its keys: the nodes can be shared
            )
        return out

    def _with_runs(self) -> set[str]:
        return {n for n, a in list(self.agents.items()) if any(not w.done for w in list(a.workers.values()))}

    # -- the nodes' agents -------------------------------------------------------------------------------
    def reconcile(self) -> None:
        nodes, pods = self.cluster.snapshot()
        want = self.inventory(nodes, pods)
        for name in sorted(set(self.agents) - set(want)):
            self._retire(name, gone=name not in nodes)
        for name, info in want.items():
            agent = self.agents.get(name)
            if agent is None:
                self._start(name, info)
            elif agent.info != info:
                agent.info = info
                if agent.node_id:
                    try:
                        agent.client.register(info)  # with its node key: refreshes the inventory
                        log.info("node %s: %d GPU(s) offered", info.name, len(info.gpus))
                    except (Unreachable, Refused) as exc:
                        log.info("node %s: inventory update not sent (%s); next change retries", info.name, exc)
                        agent.info = agent.info.model_copy(update={"agent_version": ""})  # differs: sent again

    def _start(self, name: str, info: NodeInfo) -> None:
        home = self.home / "nodes" / name
        runtime = KubernetesRuntime(self.cluster, name, image=self.image, stop_grace=self.stop_grace)
        agent = NodeAgent(AgentClient(self.server, None), home, info, runtime=runtime, stop_grace=self.stop_grace,
                          join_key=self.join_key)
        self.agents[name] = agent
        t = threading.Thread(target=self._serve, args=(agent,), name=f"node-{name}", daemon=True)
        self.threads[name] = t
        t.start()
        log.info("node %s joins the pool (%d GPU(s))", info.name, len(info.gpus))

    def _serve(self, agent: NodeAgent) -> None:
        while not agent.stopping.is_set():
            try:
                agent.serve()
            except SystemExit as exc:  # refused, e.g. the name is still online from before a restart: wait
                log.warning("node %s: %s; trying again in 10 s", agent.info.name, exc)
                agent.stopping.wait(10.0)
            except Exception:
                log.exception("node %s: agent failed; restarting it", agent.info.name)
                agent.stopping.wait(2.0)

    def _retire(self, name: str, gone: bool) -> None:
        """The node left the cluster (gone) or offers nothing and runs nothing of ours: leave the pool."""
        agent = self.agents.pop(name)
        self.threads.pop(name, None)
        agent.stopping.set()
        for w in list(agent.workers.values()):
            w.request_stop(f"Kubernetes node {name} was removed" if gone else f"node {name} left the pool")
        if agent.node_id:
            try:
                agent.client.deregister(agent.node_id)
            except (Unreachable, Refused) as exc:
                log.warning("node %s: could not leave the scheduler: %s", agent.info.name, exc)
        for f in ("node.json", "node_token"):  # no longer a node of ours (its runs/ finish on their own)
            (agent.home / f).unlink(missing_ok=True)
        log.info("node %s leaves the pool (%s)", agent.info.name,
                 "deleted from Kubernetes" if gone else "not schedulable")

    def run(self) -> None:
        self.cluster.start()
        self.reconcile()
        deadline = time.monotonic() + 30
        while any(not a.node_id for a in self.agents.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        _write_json(self.home / "pool.json", {
            "pool": self.name, "server": self.server, "namespace": self.cluster.namespace, "context": self.context,
            "kubeconfig": self.kubeconfig, "in_cluster": self.in_cluster, "pid": os.getpid(),
            "nodes": {a.info.name: a.node_id for a in self.agents.values()},
            "gpus": sum(len(a.info.gpus) for a in self.agents.values())})
        log.info("pool %s: %d node(s), %d GPU(s), namespace %s", self.name, len(self.agents),
                 sum(len(a.info.gpus) for a in self.agents.values()), self.cluster.namespace)
        while not self.stopping.is_set():
            self.dirty.wait(30.0)
            time.sleep(0.1)  # a burst of watch events (a Job's pods) becomes one reconcile
            self.dirty.clear()
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed")


def _version() -> str:
    from scheduler.contract import __version__

    return __version__


# -- connecting to Kubernetes ------------------------------------------------------------------------------

def connect(kubeconfig: str | None, context: str | None, in_cluster: bool) -> tuple[Any, str]:
    """An ApiClient and the namespace of the chosen context (or of the pod's service account)."""
    from kubernetes import client, config

    if in_cluster:
        config.load_incluster_config()
        ns = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"
        return client.ApiClient(client.Configuration.get_default_copy()), ns
    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    if chosen is None:
        raise KubeError(f"--context {context}: no such context in the kubeconfig "
                        f"(have: {', '.join(c['name'] for c in contexts) or 'none'})")
    ns = (chosen.get("context") or {}).get("namespace") or "default"
    return config.new_client_from_config(config_file=kubeconfig, context=chosen["name"]), ns


def leave(home: Path, grace: float = 10.0) -> list[str]:
    """`fedml logout` for a pool (its process already stopped): delete our Jobs, remove our nodes from the
    scheduler. Returns warnings."""
    warnings: list[str] = []
    try:
        meta = json.loads((home / "pool.json").read_text())
    except (OSError, ValueError):
        return warnings
    try:
        api, _ = connect(meta.get("kubeconfig"), meta.get("context"), bool(meta.get("in_cluster")))
        from kubernetes import client

        client.BatchV1Api(api).delete_collection_namespaced_job(
            meta["namespace"], label_selector=f"{LABEL_POOL}={meta['pool']}",
            propagation_policy="Background")
    except Exception as exc:
        warnings.append(f"could not delete the pool's Jobs: {api_error(exc)}")
    for d in sorted((home / "nodes").iterdir()) if (home / "nodes").exists() else []:
        try:
            node = json.loads((d / "node.json").read_text())
            token = (d / "node_token").read_text().strip()
        except (OSError, ValueError):
            continue
        c = AgentClient(meta["server"], token)
        try:
            c.deregister(node["id"])
        except (Unreachable, Refused) as exc:
            warnings.append(f"could not remove node {node.get('name')} from the scheduler: {exc}")
        finally:
            c.close()
    return warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedml-k8s-agent", description="fedml launch Kubernetes pool agent")
    p.add_argument("--server", required=True, help="scheduler URL")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--pool", help="pool name (default: k8s-NAMESPACE)")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--namespace", help="where Jobs go (default: the context's namespace)")
    p.add_argument("--in-cluster", action="store_true", help="use the pod's service account (in a Deployment)")
    p.add_argument("--image", default=os.environ.get("FEDML_K8S_IMAGE", DEFAULT_IMAGE),
                   help="image for jobs without docker.image")
    p.add_argument("--label", action="append", default=[], help="k=v, repeatable")
    p.add_argument("--price-per-gpu-hour", type=float)
    p.add_argument("--stop-grace", type=float, default=float(os.environ.get("FEDML_STOP_GRACE", "10")))
    p.add_argument("--key-file", type=Path, help="file holding the join key (admin key or an N-use join token: "
                                                 "every node of the pool joins with it); read once, then deleted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s k8s-agent %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    args.home.mkdir(parents=True, exist_ok=True)
    lock = _SingleInstance(args.home / "agent.pid")
    join_key = _read_key(args.key_file) if args.key_file else None
    try:
        api, ns = connect(args.kubeconfig, args.context, args.in_cluster)
    except Exception as exc:
        log.error("cannot use Kubernetes: %s", api_error(exc))
        return 3
    ns = args.namespace or ns
    cluster = Cluster(api, ns, args.pool or f"k8s-{ns}")
    pool = Pool(args.server.rstrip("/"), args.home, join_key, cluster, image=args.image,
                labels=dict(kv.split("=", 1) for kv in args.label if "=" in kv), price=args.price_per_gpu_hour,
                stop_grace=args.stop_grace, context=args.context, in_cluster=args.in_cluster,
                kubeconfig=args.kubeconfig or os.environ.get("KUBECONFIG"))  # `fedml logout` may run without it

    def on_term(*_: Any) -> None:
        # Jobs keep running in the cluster; a restarted pool agent re-attaches to them.
        log.info("pool agent stopping; its Jobs keep running")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        pool.run()
    except KubeError as exc:
        log.error("cannot use Kubernetes: %s", exc)
        return 3
    finally:
        del lock
    return 0


if __name__ == "__main__":
    sys.exit(main())
