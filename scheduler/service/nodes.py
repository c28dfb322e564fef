"""Nodes: who may register what (docs/security.md), views for `fedml node list`, drain, remove."""

from __future__ import annotations

import secrets
import time
from typing import Any

from .. import access, auth
from ..contract.errors import Conflict, Gone, Unauthenticated
from ..contract.models import (
    CLUSTER_LABEL,
    Node,
    NodeInfo,
    NodeView,
    Principal,
    Registered,
    RunStatus,
)
from ..contract.series import COARSE, FIELDS, gpu_key
from ..store import NotFound
from .core import ACTIVE, SchedulerBase, log


class NodesMixin(SchedulerBase):
    def register_node(self, info: NodeInfo, who: Principal, peer: str | None = None) -> Registered:
        """Who may register what (docs/security.md):
        - a node key: its own node coming back (new inventory; id, owner and enforced labels kept);
        - an admin key or a join token: a shared node, if its agent isolates jobs from itself (runs them as
          another user); else a node private to whoever joined it;
        - a user key: a node private to that user, reached at the address its registration came from.
        A name held by a node is never re-taken this way: that node's key, or an admin's `fedml node remove`."""
        now = time.time()
        if who.scope == "node":
            existing = self.store.get_node(who.owner)
            if existing is None:
                raise Gone("this node was removed; join it again with an admin key or a join token")
            owner = existing.owner  # a user's node stays that user's; any other follows what its agent can do now
            if not existing.peer_address:
                owner = None if info.job_user else (existing.joined_by or "admin")
            node = Node(**info.model_dump(exclude={"name", "labels", "address"}), id=existing.id, name=existing.name,
                        labels={**_claimable(info.labels), **existing.enforced_labels},
                        enforced_labels=existing.enforced_labels, autostop_minutes=existing.autostop_minutes,
                        teams=existing.teams,
                        autostop_agents=existing.autostop_agents,
                        address=(peer or existing.address) if existing.peer_address else info.address,
                        peer_address=existing.peer_address,
                        owner=owner, joined_by=existing.joined_by, draining=existing.draining,
                        registered_at=existing.registered_at, last_seen=now)
            self._group.write(self.store, lambda: self.store.upsert_node(node))  # (10,000 agents restarting)
            self._nodes_changed()
            self._heard_on_join(node.id, now)
            self.kick()
            return Registered(node=node)
        access.require_may_register(who)
        same = self.store.node_by_name(info.name)
        if same is not None:
            raise Conflict(f"a node named {info.name} exists already ({same.id}, {same.state.lower()}): pick "
                                f"another --name, come back with that node's key, or have an admin remove it "
                                f"first (`fedml node remove {info.name}`)")
        enforced: dict[str, str] = {}
        teams: list[str] = []
        if who.scope == "join":
            try:
                token = auth.use_join(self.store, who.key_id)
            except ValueError as exc:
                raise Unauthenticated(str(exc)) from None
            enforced = dict(token.labels)
            teams = list(token.teams)
        if who.scope == "user":
            owner: str | None = who.owner
        else:
            owner = None if info.job_user else who.owner
        # A user's node is reached where its registration came from: a user cannot point the scheduler's
        # gateway at an address of their choosing (SSRF). Admins and join tokens vouch for what the agent says.
        address = (peer or info.address) if who.scope == "user" else info.address
        node = Node(**info.model_dump(exclude={"labels", "address"}), labels={**_claimable(info.labels), **enforced},
                    address=address, peer_address=who.scope == "user", enforced_labels=enforced, owner=owner, joined_by=who.owner,
                    teams=teams,
                    id="node-" + secrets.token_hex(8), registered_at=now, last_seen=now)
        # One transaction where the store has them (SQLite; shared with concurrent registrations' as one durable
        # commit): a registration that loses the race for its name leaves no key. Elsewhere the key first: a
        # scheduler that dies between the two leaves an unused key, never a node that holds its name with no key
        # to come back with.
        def write() -> str:
            secret = auth.issue(self.store, name=f"node {node.name}", scope="node", owner=node.id)[1]
            self.store.upsert_node(node)
            return secret

        token_secret = self._group.write(self.store, write)
        self._nodes_changed()
        self._heard_on_join(node.id, now)
        log.info("node %s (%s) registered by %s (%s)%s", node.name, node.id, who.owner, who.scope,
                 f", private to {owner}" if owner else "")
        self.kick()
        return Registered(node=node, node_token=token_secret)

    def _heard_on_join(self, node_id: str, now: float) -> None:
        """The registration just written (ONLINE, last_seen now) is its agent heard from: recorded as its
        heartbeat, so that its first poll writes nothing (10,000 agents joining: 10,000 durable writes, not
        20,000)."""
        if self.store.heartbeat_unless_offline(node_id, now):
            self._heard[node_id] = now

    def node_views(self) -> list[NodeView]:
        active = self.store.list_runs(status=ACTIVE, limit=1_000_000)
        count: dict[str, int] = {}
        for r in active:
            for p in r.placements:
                if not p.done:
                    count[p.node_id] = count.get(p.node_id, 0) + 1
        samples = self.gpu_samples()
        return [NodeView(**c.node.model_dump(exclude={"last_seen"}), last_seen=self.last_seen(c.node, {}),
                         gpus_free=[g.index for g in c.free], active_runs=count.get(c.node.id, 0),
                         gpu_samples=samples.get(c.node.id, (0.0, []))[1])
                for c in self._candidates(active)]

    def node_gpu_series(self, ref: str, since: float, who: Principal) -> dict[str, Any]:
        """Each GPU of a node over time (contract/series.py: every 5 s over the last hour, minute means before
        it, a week at most): {node, name, since, gpus: [{index, name, points: [[t, util %, mem MB, W, C]]}]}."""
        access.require_not_node(who, "read node GPU series")
        node = self.find_node(ref)
        now = time.time()
        since = max(since, now - COARSE.keep)
        return {"node": node.id, "name": node.name, "since": since,
                "fields": ["time", *FIELDS],
                "gpus": [{"index": g.index, "name": g.name, "memory_mb": g.memory_mb,
                          "points": [list(p) for p in self.series(gpu_key(node.id, g.index), since, now)]}
                         for g in node.gpus]}

    def find_node(self, ref: str) -> Node:
        node = self.store.get_node(ref) or self.store.node_by_name(ref)
        if node is None:
            raise NotFound(f"node {ref} not found")
        return node

    def set_draining(self, ref: str, draining: bool, who: Principal) -> Node:
        access.require_admin(who, "only an admin key can drain nodes")
        node = self.find_node(ref).model_copy(update={"draining": draining})
        self.store.upsert_node(node)
        self._nodes_changed()
        self.kick()
        return node

    def remove_node(self, ref: str, who: Principal) -> Node:
        node = self.find_node(ref)
        access.require_may_remove_node(who, node)
        for run in self.store.list_runs(status=ACTIVE, node_id=node.id, limit=1_000_000):
            self._rank_update(run.id, node.id, RunStatus.LOST, None, f"node {node.name} was removed")
        self.store.delete_node(node.id)
        self._nodes_changed()
        for k in self.store.list_keys():
            if k.scope == "node" and k.owner == node.id and k.revoked_at is None:
                auth.revoke(self.store, k, why="node removed")  # its agent is told to exit, not to join again
        self.kick()
        return node


def _claimable(labels: dict[str, str]) -> dict[str, str]:
    """The labels an agent may give its node: not a cluster's (CLUSTER_LABEL), which only an admin gives
    (`fedml cluster create`, or a join token's labels): a node must not join a cluster to capture its runs."""
    return {k: v for k, v in labels.items() if not k.startswith(CLUSTER_LABEL)}
