"""The node agent: register, long-poll for assignments, run them, ship logs, report, obey stop.

    python -m agents.agent --server URL --token-file F --home DIR      (or --state-file for the embedded one)

State lives in HOME: node.json (our node id), node_token, a lock file so that only one agent serves a HOME,
and per attempt of a run (agents/worker.py runs each):
    runs/<ref>/    the agent's own record (agent.json) and the job's stdout/stderr: out of the job's reach
    jobs/<ref>/    the job's directory (FEDML_RUN_DIR: workspace, artifacts, scripts), owned by the job's user
HOME, runs/ and blobs/ are the agent's alone (0700; HOME and jobs/ are 0711 when jobs run as another user, so
that user can reach its own directory and list nothing). Jobs run in their own sessions and write to files, so
they keep running if the agent dies; a restarted agent re-attaches to them and ships what was not shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime import fence
from runtime.base import Runtime, StartError
from runtime.process import ProcessRuntime
from scheduler.contract.models import NodeInfo, RunStatus, attempt_ref, parse_ref

from .client import AgentClient, Refused, Unreachable, server_from_state_file
from .inventory import collect, detect_address
from .jobuser import JobUser, JobUserError, grant_traverse, interpreter_paths, resolve
from .telemetry import Sampler
from .worker import RunWorker, _write_json

log = logging.getLogger("fedml.agent")


class Agent:
    worker_class: type[RunWorker] = RunWorker  # the pool agent's pods report their own way (agents/k8s_agent.py)

    def __init__(self, client: AgentClient, home: Path, info: NodeInfo, runtime: Runtime | None = None,
                 stop_grace: float = 10.0, join_key: str | None = None,
                 orphaned: Any = None, job_user: JobUser | None = None, reclaim_orphans: bool = False) -> None:
        self.client, self.home, self.info = client, home, info
        self.job_user = job_user or resolve("self")
        self.orphaned = orphaned or (lambda: False)  # True once our scheduler is gone for good
        self.join_key = join_key  # a user/admin key, used only to join; afterwards the node key is used
        self.runtime = runtime or ProcessRuntime()
        self._runtimes: dict[str, Runtime] = {}
        self.stop_grace = stop_grace
        self.node_id = ""
        self.workers: dict[str, RunWorker] = {}
        self.lease_file = home / "lease"  # renewed by every answered poll; guards kill jobs when it runs out
        self.stopping = threading.Event()
        self._blob_locks: dict[str, threading.Lock] = {}
        self.sampler = Sampler()  # GPU samples sent with polls (agents/telemetry.py)
        # Runs this agent ran that have ended (the latest 1,000): with reclaim_orphans, their processes still on
        # a GPU are killed when sampled (--reclaim-orphans).
        self.ended: deque[str] = deque(maxlen=1000)
        self.reclaim_orphans = reclaim_orphans
        # The agent's files are its own; a job running as another user may only pass through HOME and jobs/ to
        # reach its own directory (0711: no listing), so the node key, blobs and logs stay out of its reach.
        shared = 0o711 if self.job_user.separate else 0o700
        for d, mode in ((home, shared), (home / "runs", 0o700), (home / "blobs", 0o700), (home / "jobs", shared)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)
        if self.job_user.separate:
            grant_traverse([home / "jobs", *interpreter_paths()], self.job_user)

    def blob(self, sha: str) -> Path:
        path = self.home / "blobs" / sha
        with self._blob_locks.setdefault(sha, threading.Lock()):  # runs sharing a workspace download it once
            delay = 0.2
            while not path.exists():
                try:
                    self.client.download(sha, path)
                except Unreachable:  # the scheduler is restarting: the run waits for it
                    if self.stopping.is_set():
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        return path

    def runtime_for(self, name: str) -> Runtime:
        """The runtime a job runs in: "docker" for `containerize: true`, else the process runtime."""
        if name == "process":
            return self.runtime
        if name not in self._runtimes:
            if name != "docker":
                raise StartError(f"unknown runtime {name!r}")
            from runtime.docker import DockerRuntime  # the docker SDK only where containers are used

            self._runtimes[name] = DockerRuntime(home=str(self.home.resolve()))
        return self._runtimes[name]

    def register(self) -> None:
        """Join with the node key from an earlier registration, else with the join key (which gets us a
        node key). A node key that was revoked (node removed) falls back to the join key if we have one."""
        token_file = self.home / "node_token"
        delay = 0.1
        while not self.stopping.is_set():
            node_token = token_file.read_text().strip() if token_file.exists() else None
            self.client.set_token(node_token or self.join_key)
            try:
                reg = self.client.register(self.info)
            except Unreachable as exc:
                if exc.down:
                    fence.hold(self.lease_file)  # see runtime/fence.py
                if self.orphaned():  # our local scheduler was stopped before we ever joined it
                    log.info("the local scheduler was stopped; agent exits")
                    raise SystemExit(0) from None
                log.info("scheduler not reachable (%s); retrying", exc)
                self.stopping.wait(self._retry_delay(delay))
                delay = min(delay * 2, 5.0)
                continue
            except Refused as exc:
                if exc.status == 410:
                    self._removed(exc.detail)
                if node_token and exc.status in (401, 404):
                    token_file.unlink(missing_ok=True)  # useless now; a restart with a join key joins anew
                    if self.join_key:
                        log.warning("our node key was refused (%s); joining again", exc.detail)
                        continue
                raise SystemExit(f"the scheduler refused this node: {exc.detail}") from None
            if reg.node_token:
                fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(reg.node_token)
                self.client.set_token(reg.node_token)
            self.node_id = reg.node.id
            _write_json(self.home / "node.json", {"id": reg.node.id, "name": reg.node.name,
                                                  "server": self.client.base_url()})
            log.info("registered as %s (%s)", reg.node.name, reg.node.id)
            return

    def _removed(self, detail: str) -> None:
        """This node was removed (`fedml node remove`): stop its jobs, forget its key, and exit for good."""
        log.warning("this node was removed from the scheduler (%s); stopping its runs and exiting", detail)
        self.stopping.set()
        for w in list(self.workers.values()):
            if w.handle is not None:
                with contextlib.suppress(Exception):
                    w.handle.stop(self.stop_grace)
        (self.home / "node_token").unlink(missing_ok=True)
        os._exit(0)

    def reattach(self) -> None:
        for d in sorted((self.home / "runs").iterdir()):
            f = d / "agent.json"
            if not f.exists():
                shutil.rmtree(d, ignore_errors=True)  # died before anything started
                continue
            saved = json.loads(f.read_text())
            w = self.worker_class(self, d.name, saved=saved)
            if saved.get("final"):  # finished; only the report was not acknowledged
                fin = saved["final"]
                threading.Thread(target=w._report_final, daemon=True, args=(
                    RunStatus(fin["status"]), fin["exit_code"], fin["reason"])).start()
                continue
            if not saved.get("handle"):
                shutil.rmtree(d, ignore_errors=True)
                continue
            log.info("re-attaching to %s", d.name)
            self.workers[d.name] = w
            w.start()
        if "docker" in self.info.runtimes:
            self._sweep_containers()

    def _sweep_containers(self) -> None:
        """Remove containers of this agent that no run claims (it died between creating one and recording it)."""
        keep = set()
        for ref, w in self.workers.items():
            run_id, attempt = parse_ref(ref)
            keep.add((run_id, str(attempt), str(w.saved.get("rank", 0))))
        try:
            n = self.runtime_for("docker").sweep(keep)  # type: ignore[attr-defined]
        except Exception as exc:  # the engine is down: nothing of ours can run there either
            log.warning("could not look for leftover containers: %s", exc)
            return
        if n:
            log.info("removed %d container(s) no run claims", n)

    def _retry_delay(self, delay: float) -> float:
        """Back off, but while our lease runs try again often enough to renew it in time (a scheduler replica
        that died mid-request is replaced behind the balancer within a second)."""
        _, length = fence.read(self.lease_file)
        return min(delay, length / 4) if length > 0 else delay

    def _lease_renewed(self) -> None:
        """The lease file was just renewed (or held): runtimes that fence by other means follow it."""

    def serve(self) -> None:
        self.register()
        self.reattach()
        delay = 0.2
        failed = False
        while not self.stopping.is_set():
            for rid in [r for r, w in self.workers.items() if w.done]:
                del self.workers[rid]
                self.ended.append(parse_ref(rid)[0])
            try:
                # Every attempt this node still has, finishing ones included: a placement the scheduler thinks
                # runs here and that is missing from this list is written off (its final report was lost).
                running = list(self.workers)
                sent = fence.now()
                _, length = fence.read(self.lease_file)
                # The scheduler holds a poll half an interval (a fifth of the lease): one that takes 40 % of the
                # lease is lost (a replica died under it), and the next try must come while the lease still runs.
                # After a failed poll, ask for an answer at once (wait 0): the lease is renewed in milliseconds
                # instead of after a long poll that a dying replica may drop again.
                given = {w.run_id: w.gpus_given() for w in self.workers.values()}
                gone = set(self.ended) - set(given) if self.reclaim_orphans else None
                gpus = self.sampler.sample(given, gone)
                resp = self.client.poll(self.node_id, running, wait=0.0 if failed else 15.0,
                                        timeout=max(1.0, length * 0.4) if length > 0 else None, gpus=gpus)
                failed = False
                if resp.lease > 0:
                    # From when the poll was sent, not answered: the scheduler saw us no earlier than that.
                    fence.renew(self.lease_file, sent + resp.lease, resp.lease)
                    self._lease_renewed()
                delay = 0.2
            except Unreachable as exc:
                failed = True
                if exc.down and fence.hold(self.lease_file):  # no scheduler runs: nothing to fence
                    self._lease_renewed()
                until, _ = fence.read(self.lease_file)
                log.info("poll failed (%s); lease left %.1f s", exc, until - fence.now())
                if self.orphaned():
                    fence.park(self.lease_file)
                    log.info("the local scheduler was stopped; agent exits (%d run(s) keep running; the next "
                             "scheduler start re-attaches to them)", len(self.workers))
                    return
                self.stopping.wait(self._retry_delay(delay))
                delay = min(delay * 2, 5.0)
                continue
            except Refused as exc:
                if exc.status == 410:  # an admin removed this node: that sticks
                    self._removed(exc.detail)
                if exc.status in (401, 404):  # the scheduler forgot us (a new database): join again
                    self.register()
                    continue
                log.warning("poll refused: %s", exc)
                self.stopping.wait(2.0)
                continue
            if resp.shutdown and not resp.start and not self.workers:
                log.warning("the scheduler asks this agent to exit: %s", resp.shutdown)
                self.stopping.set()
                return
            try:
                for a in resp.start:
                    ref = attempt_ref(a.run.id, a.run.attempt)
                    if ref not in self.workers:
                        w = self.worker_class(self, ref, assignment=a)
                        self.workers[ref] = w
                        w.start()
                for rid in resp.stop:
                    if rid in self.workers:
                        if rid in resp.grace:  # preempted: the job's own grace to save a checkpoint
                            self.workers[rid].request_stop("preempted", grace=resp.grace[rid])
                        else:
                            self.workers[rid].request_stop()
                for rid, n in resp.scale.items():
                    if rid in self.workers:
                        self.workers[rid].desired = n
            except Exception:  # a bug handling one answer must not take the node down
                log.exception("handling the scheduler's answer failed")


class _SingleInstance:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another agent already serves {path.parent}") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()


def _read_key(path: Path) -> str | None:
    """The join key from its hand-off file, which is then deleted (where it can be: systemd's credential
    directory is read-only, and private to the unit anyway)."""
    try:
        with open(path, "rb") as f:
            key = f.read(4096).decode(errors="replace").strip() or None
    except OSError as exc:
        raise SystemExit(f"fedml agent: cannot read the key file {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        path.unlink()
    return key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedml-agent", description="fedml launch node agent")
    p.add_argument("--server", help="scheduler URL")
    p.add_argument("--state-file", type=Path, help="read the scheduler URL from this file (embedded mode)")
    p.add_argument("--key-file", "--token-file", dest="key_file", type=Path,
                   help="file holding the join key (admin key, join token or user key); read once, then deleted. "
                        "Never give a key by argv or environment: jobs and `ps` could read it there")
    p.add_argument("--run-as", default=os.environ.get("FEDML_RUN_AS", "auto"),
                   help="user jobs run as: auto (fedml-job when the agent is root, else the agent's own user), "
                        "self, or a user name. Only a root agent can isolate jobs from itself; any other agent "
                        "makes a single-tenant node that runs only its owner's runs")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--name")
    p.add_argument("--gpus", help="declare GPUs where NVML is absent, e.g. A100-80G:4")
    p.add_argument("--label", action="append", default=[], help="k=v, repeatable")
    p.add_argument("--price-per-gpu-hour", type=float)
    p.add_argument("--address", help="address other nodes reach this one at (default: detected)")
    p.add_argument("--stop-grace", type=float, default=float(os.environ.get("FEDML_STOP_GRACE", "10")))
    p.add_argument("--reclaim-orphans", action="store_true",
                   default=os.environ.get("FEDML_RECLAIM_ORPHANS", "").lower() in ("1", "true", "yes"),
                   help="kill processes of runs this agent ran, which have ended, that still hold a GPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns what matters
    os.umask(0o077)  # whatever the agent writes is its own unless it says otherwise
    join_key = _read_key(args.key_file) if args.key_file else None  # first: the file goes even if we exit next
    lock = _SingleInstance(args.home / "agent.pid")
    try:
        job_user = resolve(args.run_as)
    except JobUserError as exc:
        raise SystemExit(f"fedml agent: {exc}") from None
    server: Any = server_from_state_file(args.state_file) if args.state_file else args.server
    if not server:
        p.error("give --server or --state-file")
    labels = dict(kv.split("=", 1) for kv in args.label if "=" in kv)
    info = collect(args.name, args.gpus, labels=labels, price=args.price_per_gpu_hour,
                   address=args.address or (detect_address(args.server) if args.server else "127.0.0.1"))
    info.job_user = job_user.name if job_user.separate else None
    state_file = args.state_file
    # The embedded agent follows its scheduler: a clean stop removes the state file (a crash does not).
    orphaned = (lambda: not state_file.exists()) if state_file else None
    agent = Agent(AgentClient(server, None), args.home, info, stop_grace=args.stop_grace, join_key=join_key,
                  reclaim_orphans=args.reclaim_orphans,
                  orphaned=orphaned, job_user=job_user)

    def on_term(*_: Any) -> None:
        # Jobs keep running: they write to files and the next agent re-attaches to them (within the lease; for
        # ever when our embedded scheduler was stopped first, see runtime/fence.py: park).
        if orphaned is not None and orphaned():
            fence.park(agent.lease_file)
        log.info("agent stopping; %d run(s) keep running", len(agent.workers))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        agent.serve()
    finally:
        del lock
    return 0


if __name__ == "__main__":
    sys.exit(main())
