"""Clusters (FedML's `fedml cluster ...`): a named set of nodes. Membership is an enforced label on each node,
CLUSTER_LABEL + NAME = "true", which only an admin gives (agents cannot claim it: nodes._claimable), so
`fedml launch -c NAME` is a job asking for that label, placed like any other. Stopping a cluster drains its nodes
and stops the runs on them; autostop drains a node of it once it has had no run for the given time."""

from __future__ import annotations

import time

from .. import access
from ..contract.errors import Invalid
from ..contract.models import CLUSTER_LABEL, CLUSTER_NAME, Cluster, ClusterCreate, Node, Principal, RunStatus
from ..store import NotFound
from .core import ACTIVE, SchedulerBase, log


def cluster_key(name: str) -> str:
    if not CLUSTER_NAME.fullmatch(name):
        raise Invalid(f'cluster name "{name[:80]}": letters, digits, "-", "_", "." (up to 63)')
    return CLUSTER_LABEL + name


class ClustersMixin(SchedulerBase):
    def create_cluster(self, name: str, body: ClusterCreate, who: Principal) -> Cluster:
        """Put the named nodes, and those carrying body.label now, in the cluster (admin). Adding to an
        existing cluster is allowed; a node not found refuses the whole request."""
        access.require_admin(who, "only an admin key can make clusters")
        key = cluster_key(name)
        nodes = [self.find_node(ref) for ref in body.nodes]
        if body.label is not None:
            k, sep, v = body.label.partition("=")
            if not sep or not k:
                raise Invalid(f'label: expected KEY=VALUE, got "{body.label[:80]}"')
            nodes += [n for n in self.store.list_nodes() if n.labels.get(k) == v]
        if not nodes:
            raise Invalid("no nodes: name them, or give a label some nodes carry")
        for node in {n.id: n for n in nodes}.values():
            self._set_labels(node, {**node.enforced_labels, key: "true"})
        return self.cluster(name, who)

    def _set_labels(self, node: Node, enforced: dict[str, str]) -> Node:
        gone = set(node.enforced_labels) - set(enforced)
        labels = {k: v for k, v in node.labels.items() if k not in gone}
        node = node.model_copy(update={"enforced_labels": enforced, "labels": {**labels, **enforced}})
        self.store.upsert_node(node)
        self._nodes_changed()
        self.kick()
        return node

    def clusters(self, who: Principal) -> list[Cluster]:
        access.require_not_node(who, "list clusters")
        names = sorted({k[len(CLUSTER_LABEL):] for n in self.store.list_nodes() for k in n.enforced_labels
                        if k.startswith(CLUSTER_LABEL)})
        views = self.node_views()
        return [self._cluster(name, views) for name in names]

    def cluster(self, name: str, who: Principal) -> Cluster:
        access.require_not_node(who, "read clusters")
        found = self._cluster(name, self.node_views())
        if not found.nodes:
            raise NotFound(f"cluster {name} not found (`fedml cluster list`)")
        return found

    @staticmethod
    def _cluster(name: str, views: list) -> Cluster:  # type: ignore[type-arg]
        key = cluster_key(name)
        mine = [v for v in views if v.enforced_labels.get(key) == "true"]
        stops = {v.autostop_minutes for v in mine}
        return Cluster(name=name, nodes=mine, gpus=sum(len(v.gpus) for v in mine),
                       autostop_agents=any(v.autostop_agents for v in mine),
                       gpus_free=sum(len(v.gpus_free) for v in mine), active_runs=sum(v.active_runs for v in mine),
                       draining=sum(1 for v in mine if v.draining),
                       autostop_minutes=stops.pop() if len(stops) == 1 else None)

    def stop_cluster(self, name: str, who: Principal, *, kill: bool = False) -> Cluster:
        """Drain the cluster's nodes and stop the runs on them and those queued for it (admin). `kill`: also
        dissolve the cluster (its nodes leave it; drained, they take no runs until `fedml node drain --undo`)."""
        access.require_admin(who, "only an admin key can stop clusters")
        found = self.cluster(name, who)
        key = cluster_key(name)
        stopped: set[str] = set()
        for view in found.nodes:
            self.set_draining(view.id, True, who)
            for run in self.store.list_runs(status=ACTIVE, node_id=view.id, limit=1_000_000):
                if run.id not in stopped:
                    stopped.add(run.id)
                    self.stop_run(run.id, who)
        for run in self.store.list_runs(status=[RunStatus.QUEUED], limit=1_000_000):  # launched with -c NAME
            if run.job.labels.get(key) == "true" and run.id not in stopped:
                stopped.add(run.id)
                self.stop_run(run.id, who)
        log.info("cluster %s stopped by %s: %d nodes drained, %d runs stopped", name, who.owner, len(found.nodes),
                 len(stopped))
        if kill:
            for view in found.nodes:
                node = self.store.get_node(view.id)
                if node is not None:
                    self._set_labels(node, {k: v for k, v in node.enforced_labels.items() if k != key})
            return found.model_copy(update={"nodes": [], "gpus": 0, "gpus_free": 0})
        return self.cluster(name, who)

    def start_cluster(self, name: str, who: Principal) -> Cluster:
        """Undrain the cluster's nodes (admin)."""
        access.require_admin(who, "only an admin key can start clusters")
        for view in self.cluster(name, who).nodes:
            node = self.set_draining(view.id, False, who)
            if node.stop_agent:  # (its agent may have exited already: it comes back with `fedml login --node`)
                self.store.upsert_node(node.model_copy(update={"stop_agent": False}))
                self._nodes_changed()
        return self.cluster(name, who)

    def autostop_cluster(self, name: str, minutes: float | None, who: Principal, *,
                         stop_agents: bool = False) -> Cluster:
        """Drain each node of the cluster once it has had no run for `minutes` (None: never), and with
        `stop_agents` tell its agent to exit then (admin)."""
        access.require_admin(who, "only an admin key can set autostop")
        if minutes is not None and not 0 < minutes <= 525_600:
            raise Invalid("minutes: between 0 and 525600 (a year)")
        for view in self.cluster(name, who).nodes:
            node = self.store.get_node(view.id)
            if node is not None:
                self.store.upsert_node(node.model_copy(update={"autostop_minutes": minutes,
                                                               "autostop_agents": stop_agents and bool(minutes)}))
        self._nodes_changed()
        return self.cluster(name, who)

    def check_autostop(self, now: float | None = None) -> list[Node]:
        """Drain the nodes with autostop that have been without a run for that long (from when this scheduler
        first saw them idle: a restart waits the whole time again). Returns the nodes drained."""
        now = time.time() if now is None else now
        idle_since = self._idle_since
        drained = []
        for node in self.nodes():
            if node.autostop_minutes is None or node.draining:
                idle_since.pop(node.id, None)
                continue
            if self.store.list_runs(status=ACTIVE, node_id=node.id, limit=1):
                idle_since.pop(node.id, None)
                continue
            since = idle_since.setdefault(node.id, now)
            if now - since >= node.autostop_minutes * 60:
                fresh = self.store.get_node(node.id)
                if fresh is not None and not fresh.draining:
                    self.store.upsert_node(fresh.model_copy(update={"draining": True,
                                                                    "stop_agent": fresh.autostop_agents}))
                    self._nodes_changed()
                    drained.append(fresh)
                    log.info("node %s drained: no run for %.0f min (autostop)", node.name, node.autostop_minutes)
                idle_since.pop(node.id, None)
        return drained
