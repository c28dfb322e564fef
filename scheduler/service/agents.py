"""The agent side: long polls (assignments, stops, scale), rank reports, log and artifact writers, and
heartbeats (a silent node goes OFFLINE and its ranks LOST)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from .. import access
from ..contract.models import (
    SYSTEM_RANK,
    Artifact,
    Assignment,
    GpuSample,
    Node,
    PollResponse,
    Principal,
    Run,
    RunStatus,
    StatusReport,
    attempt_ref,
)
from ..contract.series import gpu_key, run_key
from ..store import Busy, NotFound, Snapshot
from .core import ACTIVE, LOCAL, SchedulerBase, log, pack_samples


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 and seconds % 3600 == 0 else (
        f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s")


class AgentsMixin(SchedulerBase):
    def poll_once(self, node_id: str, running: list[str], who: Principal = LOCAL,
                  gpus: list[GpuSample] | None = None) -> PollResponse:
        access.require_acts_for_node(who, node_id)
        now = time.time()
        before, runs = self.store.heartbeat_and_runs(node_id, now, ACTIVE)
        if before:  # (a first heartbeat is heard once it has been written: below)
            self._heard[node_id] = now
        self.tally.add("heartbeats")
        if gpus is not None:
            self._gpu_samples(node_id, gpus, now)
            self._runs_gpu_use(node_id, gpus, runs, now)
        if not before:
            try:  # first heartbeat since start, or back from OFFLINE: persist the state change
                self._group.write(self.store, lambda: self.store.touch_node(node_id, now))  # (shares commits)
                self._nodes_changed()
                self._heard[node_id] = now
            except NotFound:
                self.store.heartbeat(node_id, 0.0)  # so that every poll of it is refused
                raise NotFound(f"node {node_id} is not registered") from None
        return self._answer(node_id, running, runs, now, self.agents_to_stop, self.store.get_node)

    def poll_now(self, node_id: str, running: list[str], who: Principal = LOCAL,
                 gpus: list[GpuSample] | None = None) -> PollResponse | None:
        """poll_once, where it can be answered at once: nothing to write and nothing to wait for (the store's
        snapshot() reads; the node heard from before; the node cache current; no rank to settle, no GPU sample
        that changes a node or a run). An event loop calls this itself; None: it calls poll_once in a thread, and
        nothing was done here (no heartbeat recorded, no sample kept)."""
        access.require_acts_for_node(who, node_id)
        with self.store.snapshot() as snap:
            if snap is None:
                return None
            stopping = self.agents_to_stop_cached()
            if stopping is None:
                return None
            try:
                return self._poll_now(node_id, running, gpus, snap, stopping)
            except Busy:
                return None

    def _poll_now(self, node_id: str, running: list[str], gpus: list[GpuSample] | None, snap: Snapshot,
                  stopping: frozenset[str]) -> PollResponse | None:
        runs = snap.node_runs(node_id, ACTIVE)
        rank0 = self._quiet(node_id, running, gpus, runs)
        if rank0 is None:
            return None
        nodes = {n: snap.get_node(n) for n in rank0}  # (every read before anything is recorded: Busy leaves none)
        now = time.time()
        before = self.store.heartbeat_if_seen(node_id, now)
        if not before:  # (its first heartbeat, or back from OFFLINE: a write)
            return None
        return self._heard_now(node_id, running, gpus, runs, now, stopping, nodes.get)

    async def poll_soon(self, node_id: str, running: list[str], who: Principal = LOCAL,
                        gpus: list[GpuSample] | None = None) -> PollResponse | None:
        """poll_now, or where the store has no snapshot, the same with its reads awaited on the event loop
        (Store.poll_reads: Redis); None: poll_once in a thread answers. A poll declined after the heartbeat was
        recorded (a rank to settle, a GPU sample that changes something) records it again there: harmless, the
        node was heard from before either way."""
        resp = self.poll_now(node_id, running, who, gpus)
        if resp is not None:
            return resp
        stopping = self.agents_to_stop_cached()
        if stopping is None:
            return None
        now = time.time()
        got = await self.store.poll_reads(node_id, now, ACTIVE)  # (None at once from a store with a snapshot)
        if got is None or not got[0]:  # (none here; or its first heartbeat, or back from OFFLINE: a write)
            return None
        runs = got[1]
        rank0 = self._quiet(node_id, running, gpus, runs)
        if rank0 is None:
            return None
        nodes = {n: self.cached_node(n) for n in rank0}
        if None in nodes.values():
            return None
        return self._heard_now(node_id, running, gpus, runs, now, stopping, nodes.get)  # type: ignore[arg-type]

    def _quiet(self, node_id: str, running: list[str], gpus: list[GpuSample] | None,
               runs: list[Run]) -> set[str] | None:
        """Whether a poll with the node's `runs` as read writes nothing: the nodes of rank 0 of the runs it is
        to start (their address is in the answer), or None where it writes (poll_once answers)."""
        have = set(running)
        rank0: set[str] = set()
        for run in runs:
            p = run.placement_on(node_id)
            if p is None or p.done or attempt_ref(run.id, run.attempt) in have:
                continue
            if p.status == RunStatus.RUNNING or (run.stop_requested and p.status == RunStatus.STARTING):
                return None  # a rank the node should have and does not: poll_once settles it (a write)
            if p.status == RunStatus.STARTING:
                rank0.add(run.placements[0].node_id)
        if gpus is not None and not self._samples_quiet(node_id, gpus, runs):
            return None
        return rank0

    def _heard_now(self, node_id: str, running: list[str], gpus: list[GpuSample] | None, runs: list[Run],
                   now: float, stopping: frozenset[str], get_node: Callable[[str], Node | None]) -> PollResponse:
        """The rest of a poll answered at once, its heartbeat recorded."""
        self._heard[node_id] = now
        self.tally.add("heartbeats")
        if gpus is not None:
            self._gpu_samples(node_id, gpus, now)
            self._runs_gpu_use(node_id, gpus, runs, now)
        return self._answer(node_id, running, runs, now, lambda: stopping, get_node)

    def _samples_quiet(self, node_id: str, gpus: list[GpuSample], runs: list[Run]) -> bool:
        """Whether keeping these GPU samples writes nothing: the GPUs used outside runs are as the node has them
        (_gpu_samples), no process is on a GPU its run was not given, and no running rank here has a utilisation
        policy to judge (_runs_gpu_use)."""
        outside = sorted({g.index for g in gpus if g.outside})
        if self._outside.get(node_id) != outside and (
                (cached := self.cached_node(node_id)) is None or cached.gpus_busy_outside != outside):
            return False
        if any(g.misplaced for g in gpus):
            return False
        return not any(run.job.utilization_policy is not None for run in runs)

    def _answer(self, node_id: str, running: list[str], runs: list[Run], now: float,
                agents_to_stop: Callable[[], frozenset[str]], get_node: Callable[[str], Node | None]) -> PollResponse:
        """What a poll answers the node, from its runs as just read: assignments to start, runs to stop, the
        replicas of its serving runs; and whether its agent is to exit."""
        have = set(running)
        start: list[Assignment] = []
        wanted: set[str] = set()
        scale: dict[str, int] = {}
        grace: dict[str, float] = {}
        for run in runs:
            p = run.placement_on(node_id)
            if p is None or p.done:
                continue
            ref = attempt_ref(run.id, run.attempt)
            if run.stop_requested:
                if ref not in have and p.status == RunStatus.STARTING:  # nothing to kill: settle it here
                    self._rank_update(run.id, node_id, RunStatus.KILLED, None, run.reason or "stopped")
                elif run.status == RunStatus.PREEMPTED and run.preempted is not None:
                    grace[ref] = run.preempted.grace  # (the job's preemption.grace, not the agent's stop grace)
                continue
            wanted.add(ref)
            if p.status == RunStatus.RUNNING and ref not in have:
                # The node no longer has it, and its final report never came (lost with the agent's state):
                # after a grace period the rank is LOST rather than RUNNING for ever.
                since = self._missing.setdefault((ref, node_id), now)
                if now - since > self.heartbeat_timeout:
                    self._missing.pop((ref, node_id), None)
                    name = (self.store.get_node(node_id) or Node(id=node_id, name=node_id)).name
                    self._rank_update(run.id, node_id, RunStatus.LOST, None,
                                      f"node {name} no longer runs it (its final report was lost)",
                                      attempt=run.attempt)
                continue
            self._missing.pop((ref, node_id), None)
            if p.status == RunStatus.STARTING and ref not in have:
                rank0 = get_node(run.placements[0].node_id)
                start.append(Assignment(run=run, rank=p.rank, num_nodes=len(run.placements), gpus=p.gpus,
                                        node0_addr=rank0.address if rank0 else "127.0.0.1",
                                        node0_port=run.master_port or 29500))
            if run.endpoint is not None:
                scale[ref] = run.endpoint.replicas
        # Whatever the node runs that is no longer its to run is stopped: reconciliation after restarts.
        stop = [rid for rid in running if rid not in wanted]
        shutdown = None
        if not wanted and not running and node_id in agents_to_stop():
            shutdown = "idle past its cluster's autostop: this agent exits (`fedml login --node` starts it again)"
        return PollResponse(start=start, stop=stop, grace={r: g for r, g in grace.items() if r in stop}, scale=scale,
                            heartbeat_interval=self.heartbeat_interval,
                            lease=self.lease, shutdown=shutdown)

    def report(self, run_id: str, rep: StatusReport, node_id: str, who: Principal = LOCAL) -> Run:
        access.require_acts_for_node(who, node_id)
        if self.cached_node(node_id) is not None:  # (heard before the write: the pass that may run with it
            self._heard[node_id] = time.time()     # needs no heartbeat read for this node)
        return self._rank_update(run_id, node_id, rep.status, rep.exit_code, rep.reason, attempt=rep.attempt)

    def _gpu_samples(self, node_id: str, gpus: list[GpuSample], now: float) -> None:
        """Keep the node's latest GPU sample (soft state, like heartbeats); when the GPUs that a process of no
        run holds change, write them on the node (Node.gpus_busy_outside): placement leaves those alone, on every
        replica, until they are free again."""
        self._samples[node_id] = (now, pack_samples(gpus))
        self.add_points([(gpu_key(node_id, g.index), (now, g.util, g.mem_used_mb, g.power_w, g.temp_c)) for g in gpus])
        for g in gpus:
            if g.xid:  # (each XID comes with one poll: agents/telemetry.py)
                key = (node_id, g.index)
                self._xids[key] = self._xids.get(key, 0) + len(g.xid)
                log.warning("node %s GPU %d: XID error(s) %s", self._node_name(node_id), g.index,
                            ",".join(map(str, g.xid)))
        outside = sorted({g.index for g in gpus if g.outside})
        if self._outside.get(node_id) == outside:
            return
        if (cached := self.cached_node(node_id)) is not None and cached.gpus_busy_outside == outside:
            self._outside[node_id] = outside  # (a node's first sample since start: no read, as after a restart)
            return
        node = self.store.get_node(node_id)
        if node is None:
            return
        if node.gpus_busy_outside != outside:
            if outside:
                log.warning("node %s: GPU %s used by processes of no run (%s): not offered to runs", node.name,
                            ",".join(map(str, outside)), ", ".join(f"pid {p}" for g in gpus for p in g.outside))
            self.store.upsert_node(node.model_copy(update={"gpus_busy_outside": outside}))
            self._nodes_changed()
            self.kick()
        self._outside[node_id] = outside

    def _runs_gpu_use(self, node_id: str, gpus: list[GpuSample], runs: list[Run], now: float) -> None:
        """Each running rank's GPUs on this node as the sample saw them (mean utilisation, memory used): kept per
        run (`fedml run metrics`: gpu/util_pct, gpu/mem_used_mb), and held against its job's utilization_policy."""
        by_index = {g.index: g for g in gpus}
        mine_by_id = {r.id: r for r in runs}
        for g in gpus:
            for rid in g.misplaced:
                run = mine_by_id.get(rid)
                if run is not None and (rid, run.attempt, node_id, g.index) not in self._flagged:
                    self._flagged.add((rid, run.attempt, node_id, g.index))
                    self._misplaced(run, node_id, g.index, now)
        for run in runs:
            p = run.placement_on(node_id)
            if p is None or p.done or p.status != RunStatus.RUNNING or not p.gpus:
                continue
            mine = [by_index[i] for i in p.gpus if i in by_index]
            if not mine:
                continue
            utils = [g.util for g in mine if g.util is not None]
            util = sum(utils) / len(utils) if utils else None
            used = sum(g.mem_used_mb or 0 for g in mine)
            key = (run.id, run.attempt, p.rank)
            power = [g.power_w for g in mine if g.power_w is not None]
            temps = [g.temp_c for g in mine if g.temp_c is not None]
            self.add_point(run_key(*key), (now, util, float(used), sum(power) if power else None,
                                           max(temps) if temps else None))
            policy = run.job.utilization_policy
            if policy is None or util is None or (run.id, run.attempt) in self._idle_acted:
                continue
            if util >= policy.min_gpu_utilization:
                self._below.pop(key, None)
                continue
            since = self._below.setdefault(key, now)  # below the policy's floor since then, sample after sample
            if now - since >= policy.time_window:
                self._idle_policy(run, p.rank, policy, now)

    def _misplaced(self, run: Run, node_id: str, index: int, now: float) -> None:
        """A run's process on a GPU of the node it was not given (outside CUDA_VISIBLE_DEVICES): said in its log and
        kept in its warnings (`fedml run status`), once per GPU and attempt."""
        p = run.placement_on(node_id)
        given = ",".join(map(str, p.gpus)) if p is not None and p.gpus else "none"
        why = f"uses GPU {index} of node {self._node_name(node_id)}, which it was not given (its GPUs there: {given})"
        with contextlib.suppress(Exception):
            seq = self.store.next_seq(run.id, run.attempt, SYSTEM_RANK)
            self.store.append_logs(run.id, run.attempt, SYSTEM_RANK, seq, [(now, "fedml", f"── warning: {why}")])
            with self.run_lock(run.id):
                got = self.store.get_run(run.id)
                if got is not None:
                    self.store.update_run(run.id, warnings=[*got.warnings, why][-20:])
            self.notifier.notify(f"run:{run.id}")
        log.warning("run %s %s", run.id, why)

    def _node_name(self, node_id: str) -> str:
        return next((n.name for n in self.nodes() if n.id == node_id), node_id)

    def _idle_policy(self, run: Run, rank: int, policy: Any, now: float) -> None:
        """Stop (or warn about) a run whose GPUs on a node stayed below the policy's utilisation for its window."""
        self._idle_acted.add((run.id, run.attempt))
        why = f"GPU utilisation below {policy.min_gpu_utilization}% for {_span(policy.time_window)} " \
              f"(rank {rank}; utilization_policy)"
        line = f"── {'stopping' if policy.action == 'stop' else 'warning'}: {why}"
        with contextlib.suppress(Exception):  # (the log line says why; the stop below is what matters)
            seq = self.store.next_seq(run.id, run.attempt, SYSTEM_RANK)
            self.store.append_logs(run.id, run.attempt, SYSTEM_RANK, seq, [(now, "fedml", line)])
            self.notifier.notify(f"run:{run.id}")
        log.info("run %s: %s", run.id, line)
        if policy.action == "stop":
            self.stop_run(run.id, LOCAL, reason=f"stopped: {why}")  # type: ignore[attr-defined]  # (RunsMixin's)

    def check_log_writer(self, run_id: str, who: Principal, attempt: int | None = None, *, logs: bool = False) -> None:
        access.require_log_writer(who, run_id, None if who.admin else self.store.get_run(run_id), attempt, logs=logs)

    def add_artifact(self, run_id: str, art: Artifact, who: Principal) -> Run:
        self.check_log_writer(run_id, who, art.attempt)
        with self.run_lock(run_id):
            run = self.get_run(run_id)
            keep = [a for a in run.artifacts if (a.rank, a.attempt) != (art.rank, art.attempt)]
            return self.store.update_run(run_id, artifacts=[*keep, art])

    def check_heartbeats(self) -> list[Node]:
        """Mark silent nodes OFFLINE and their ranks LOST (and drain idle nodes with autostop: clusters.py).
        Returns the nodes that went offline."""
        with self.store.lock("heartbeats", ttl=10.0):  # one replica at a time
            gone = self._check_heartbeats()
            self.check_autostop()
            return gone

    def _check_heartbeats(self) -> list[Node]:
        now = time.time()
        gone = []
        beats = self.store.heartbeats()
        started = self._started
        # Over the node cache (re-listed only when a node is written): parsing every node every half interval
        # was most of a Redis scheduler's CPU at 10,000 nodes. A silent one is judged again on its stored record.
        for cached in self.nodes():
            if cached.state != "ONLINE" or \
                    now - max(cached.last_seen, beats.get(cached.id) or 0.0, started) <= self.heartbeat_timeout:
                continue
            node = self.store.get_node(cached.id)
            if node is None:
                continue
            seen = self.last_seen(node, beats)
            if node.state == "ONLINE" and now - seen > self.heartbeat_timeout:
                node = node.model_copy(update={"state": "OFFLINE", "last_seen": seen})
                self.store.upsert_node(node)
                self._nodes_changed()
                self.store.heartbeat(node.id, 0.0)  # its next heartbeat persists ONLINE again
                gone.append(node)
                log.warning("node %s (%s) is offline: no heartbeat for %.0f s", node.name, node.id, now - seen)
                for run in self.store.list_runs(status=ACTIVE, node_id=node.id, limit=1_000_000):
                    self._rank_update(run.id, node.id, RunStatus.LOST, None,
                                      f"node {node.name} went offline (no heartbeat for "
                                      f"{self.heartbeat_timeout:.0f} s)")
        return gone
