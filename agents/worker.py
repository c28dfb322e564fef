"""One rank of one run on this node, from download to the final report: prepare the job's directory, start it
in the runtime, guard it (fencing), ship its log, keep its artifacts, report its end, obey stop and scale."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from runtime import fence
from runtime.base import ExitStatus, Handle, LaunchSpec, StartError, read_job_file, substitute, write_job_file
from runtime.env import run_env
from scheduler.contract import supervisor
from scheduler.contract.archive import Packed, PackError, UnsafeArchive, pack, unpack
from scheduler.contract.jobspec import JobSpec
from scheduler.contract.models import Assignment, RunStatus, parse_ref

from .client import Refused, Unreachable
from .jobuser import chown_tree
from .shipper import SHIP_EVERY, Shipper

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("fedml.agent")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RunWorker(threading.Thread):
    """One rank of one run on this node, from download to the final report."""

    def __init__(self, agent: Agent, ref: str, assignment: Assignment | None = None,
                 saved: dict[str, Any] | None = None) -> None:
        super().__init__(name=f"run-{ref}", daemon=True)
        self.ref = ref  # one attempt of a run: "run-1a2b3c4d.2"
        self.run_id, self.attempt = parse_ref(ref)
        self.agent, self.assignment, self.saved = agent, assignment, saved or {}
        self.dir = agent.home / "runs" / ref  # the agent's
        self.job_dir = agent.home / "jobs" / ref  # the job's (FEDML_RUN_DIR)
        self.stop_event = threading.Event()
        self.stop_reason = "stopped by user"
        self.handle: Handle | None = None
        self.finishing = False  # the final report is being sent: no longer "running" for the scheduler
        self.done = False
        # serve runs: replicas the scheduler wants (from polls), and what was last written / reported
        self.desired: int | None = None
        self._desired_written: int | None = None
        self._replicas_mtime = 0
        self._replicas_checked = 0.0

    def request_stop(self, reason: str = "stopped by user", grace: float | None = None) -> None:
        """Stop the job: SIGTERM, then `grace` seconds (default: the agent's --stop-grace), then SIGKILL."""
        if not self.stop_event.is_set() and not self.finishing:
            self.stop_reason = reason
            self._save(stop_requested=True, **({} if grace is None else {"stop_grace": grace}))
            self.stop_event.set()

    def _save(self, **fields: Any) -> None:
        self.saved.update(fields)
        try:
            _write_json(self.dir / "agent.json", self.saved)
        except FileNotFoundError:  # the run directory is already cleaned up
            pass

    def gpus_given(self) -> set[int] | None:
        """The GPUs this rank was given on the node (None: not known, e.g. re-attached from an older agent)."""
        if self.assignment is not None:
            return set(self.assignment.gpus)
        got = self.saved.get("gpus")
        return set(got) if isinstance(got, list) else None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # never leave a run hanging because of an agent bug
            log.exception("run %s: agent error", self.run_id)
            self._report_final(RunStatus.FAILED, None, f"agent error: {exc}")
        finally:
            self.done = True

    def _run(self) -> None:
        if self.saved.get("handle"):  # re-attaching after an agent restart
            rt = self.agent.runtime_for(self.saved["handle"].get("runtime", "process"))
            self.handle = rt.reattach(self.saved["handle"], self.job_dir)
            if self.saved.get("stop_requested"):
                self.stop_event.set()
            if self.handle is None:
                self._report_final(RunStatus.FAILED, None, "lost: the agent restarted and the job is gone")
                return
            self._guard()
        else:
            assert self.assignment is not None
            run = self.assignment.run
            spec = run.job
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.saved = {"run_id": run.id, "rank": self.assignment.rank, "attempt": run.attempt,
                          "max_duration": spec.max_duration, "started": time.time(), "gpus": self.assignment.gpus}
            self._save()
            # Made by us, reachable by no one else until it is handed to the job's user just before the start.
            shutil.rmtree(self.job_dir, ignore_errors=True)
            self.job_dir.mkdir(mode=0o700, parents=True)
            workspace = self.job_dir / "workspace"
            try:
                if run.workspace_sha:
                    unpack(self.agent.blob(run.workspace_sha), workspace)
                else:
                    workspace.mkdir(parents=True, exist_ok=True)
            except (UnsafeArchive, Refused, Unreachable, OSError) as exc:
                self._report_final(RunStatus.FAILED, None, f"workspace: {exc}")
                return
            for m in run.mounts:  # named storage (`storage:` in the job): into the workspace, never through a link
                try:
                    unpack(self.agent.blob(m.sha256), workspace / m.path)
                except (UnsafeArchive, Refused, Unreachable, OSError) as exc:
                    self._report_final(RunStatus.FAILED, None, f"storage {m.name} (at {m.path}): {exc}")
                    return
            a = self.assignment
            (self.job_dir / "artifacts").mkdir(exist_ok=True)
            self._resume_artifacts(run, a.rank)
            user = self.agent.job_user
            env = run_env(run_id=run.id, spec=spec, node_id=self.agent.node_id, rank=a.rank, num_nodes=a.num_nodes,
                          node0_addr=a.node0_addr, node0_port=a.node0_port, gpus=a.gpus, overrides=run.env,
                          artifact_dir=str(self.job_dir / "artifacts"), attempt=run.attempt,
                          base={} if spec.containerize else None,  # a container gets the run's env, not ours
                          user=(user.name, str(self.job_dir)) if user.separate else None)
            commands = spec.commands()
            if spec.job_type == "federate" and a.rank == 0 and a.num_nodes > 1:
                commands = spec.server_commands() or commands  # rank 0 is the federation's server
            if spec.serves:  # the job runs once per replica, under the serve supervisor
                commands = self._prepare_serve(spec, env, a)
            chown_tree(self.job_dir, user)
            launch = LaunchSpec(run_id=run.id, run_dir=self.job_dir, workspace=workspace,
                                bootstrap=spec.bootstrap_commands(), job=commands, env=env,
                                rank=self.assignment.rank, job_spec=spec, assignment=a, log_dir=self.dir,
                                uid=user.uid if user.separate else None, gid=user.gid if user.separate else None)
            if self.stop_event.is_set():
                self._report_final(RunStatus.KILLED, None, self.stop_reason)
                return
            try:
                self.handle = self.agent.runtime_for("docker" if spec.containerize else "process").start(launch)
            except (OSError, StartError) as exc:
                self._report_final(RunStatus.FAILED, None, f"could not start: {exc}")
                return
            self._save(handle=self.handle.state())
            self._guard()
            self._report_running()
        self._follow()

    def _resume_artifacts(self, run: Any, rank: int) -> None:
        """A later attempt (retried, or requeued after a preemption) starts with what this rank left in
        FEDML_ARTIFACT_DIR in the latest attempt before it that kept any: a job resumes from its checkpoint there
        (docs/teams.md). Unpacked like a workspace (no link followed, sizes bounded); an archive that cannot be
        fetched or unpacked leaves the directory empty, and the job starts afresh."""
        earlier = [x for x in run.artifacts if x.rank == rank and x.attempt < run.attempt]
        if not earlier:
            return
        last = max(earlier, key=lambda x: x.attempt)
        dest = self.job_dir / "artifacts"
        try:
            unpack(self.agent.blob(last.sha256), dest)
            log.info("run %s rank %d: attempt %d starts with attempt %d's artifacts", self.run_id, rank,
                     run.attempt, last.attempt)
        except (UnsafeArchive, Refused, Unreachable, OSError) as exc:
            log.warning("run %s rank %d: attempt %d's artifacts not restored (%s); it starts without them",
                        self.run_id, rank, last.attempt, exc)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()

    def _guard(self) -> None:
        """Make sure a lease guard (runtime/fence.py) watches this attempt: it kills the job if this agent stops
        renewing the node's lease, so the scheduler can start another attempt elsewhere without two running."""
        assert self.handle is not None
        state = self.handle.state()
        if state.get("runtime") not in ("process", "docker"):
            return  # pods: fenced by their Job's deadline (agents/k8s_agent.py: _lease_renewed)
        g = self.saved.get("guard")
        if g:
            try:
                p = psutil.Process(int(g["pid"]))
                if abs(p.create_time() - float(g["created"])) < 0.5 and p.status() != psutil.STATUS_ZOMBIE:
                    return  # the guard of an earlier agent process still watches
            except (psutil.Error, KeyError, ValueError, TypeError):
                pass
        pid = fence.spawn(self.agent.lease_file, self.dir / "fenced", state, self.job_dir)
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            created = 0.0
        self._save(guard={"pid": pid, "created": created})

    def _report_running(self) -> None:
        """The runtime started the job: report RUNNING (a runtime that starts asynchronously reports later)."""
        self._retry(lambda: self.agent.client.report(self.run_id, self.attempt, self.agent.node_id, RunStatus.RUNNING))

    def _prepare_serve(self, spec: JobSpec, env: dict[str, str], a: Assignment) -> str:
        svc = spec.service_config()
        want = a.run.endpoint.replicas if a.run.endpoint else svc.replicas
        env["FEDML_SERVE_HOST"] = self.agent.info.address  # where the gateway reaches this node's replicas
        (self.job_dir / "replica.sh").write_text(substitute(spec.commands(), env) + "\n")
        self._assign_ports(max(want, svc.bounds[1]))
        cfg = supervisor.ServeConfig(readiness_path=svc.readiness_path, replicas=want, ports=self.saved["ports"],
                                     gpus=[str(g) for g in a.gpus], grace=max(1.0, self.agent.stop_grace * 0.8))
        _write_json(self.job_dir / supervisor.CONFIG, json.loads(cfg.dumps()))
        self.desired = want
        self._save(serve=True)
        return f'exec {shlex.quote(sys.executable)} -m {supervisor.MODULE} --dir "$FEDML_RUN_DIR"'

    def _assign_ports(self, n: int) -> bool:
        """Ports for replicas 0..n-1, chosen by the agent (free now). Only these are reported to the scheduler,
        whatever the job's supervisor writes: a job cannot point the gateway at another service of this host."""
        ports: dict[str, int] = dict(self.saved.get("ports") or {})
        added = False
        for i in range(n):
            if str(i) not in ports:
                ports[str(i)] = supervisor.free_port()
                added = True
        self.saved["ports"] = ports
        return added

    def _sync_serve(self) -> None:
        """Tell the supervisor the replica count the scheduler wants; tell the scheduler the replicas' states."""
        if self.desired is not None and self.desired != self._desired_written:
            user = self.agent.job_user
            if self._assign_ports(self.desired):
                self._save()
            write_job_file(self.job_dir / supervisor.CONTROL,
                           supervisor.Control(self.desired, self.saved["ports"]).dumps().encode(),
                           user.uid if user.separate else None, user.gid)
            self._desired_written = self.desired
        now = time.monotonic()
        if now - self._replicas_checked < 0.1:
            return
        self._replicas_checked = now
        f = self.job_dir / supervisor.STATE  # written by the job's serve supervisor: the job's to forge
        try:
            mtime = f.stat(follow_symlinks=False).st_mtime_ns
            if mtime == self._replicas_mtime:
                return
            doc = json.loads(read_job_file(f, 1 << 20) or b"")
            if not isinstance(doc, dict) or not isinstance(doc.get("replicas"), list):
                return
            assigned = {int(p) for p in (self.saved.get("ports") or {}).values()}
            doc["replicas"] = [r for r in doc["replicas"]
                               if isinstance(r, dict) and isinstance(r.get("port"), int) and r["port"] in assigned]
        except (FileNotFoundError, ValueError):
            return
        try:
            self.agent.client.report_replicas(self.run_id, self.attempt, self.agent.node_id, doc["replicas"])
            self._replicas_mtime = mtime  # only once acknowledged: a failed report is sent again
        except Unreachable:
            pass
        except Refused as exc:
            log.warning("run %s: replica report refused: %s", self.run_id, exc)
            self._replicas_mtime = mtime

    def _follow(self) -> None:
        assert self.handle is not None
        h = self.handle
        serving = bool(self.saved.get("serve"))
        ck = self.saved.get("shipper", {})
        shipper = Shipper(self.agent.client, self.run_id, int(self.saved.get("rank", 0)), h.log_files(),
                          offsets=ck.get("offsets"), next_seq=int(ck.get("next_seq", 0)),
                          attempt=int(self.saved.get("attempt", 1)))
        stopper: threading.Thread | None = None
        deadline = None
        if self.saved.get("max_duration"):
            deadline = float(self.saved["started"]) + float(self.saved["max_duration"])
        status: ExitStatus | None = None
        while status is None:
            if deadline and time.time() > deadline and not self.stop_event.is_set():
                self.request_stop(f"exceeded max_duration ({self.saved['max_duration']:.0f} s)")
            if self.stop_event.is_set() and stopper is None:
                grace = self.saved.get("stop_grace")
                grace = float(grace) if isinstance(grace, int | float) else self.agent.stop_grace
                stopper = threading.Thread(target=h.stop, args=(grace,), daemon=True)
                stopper.start()
            status = h.poll()
            read_at = time.monotonic()
            try:
                n = shipper.pump()
                if n:
                    self._save(shipper=shipper.checkpoint())
            except Unreachable:
                n = 0
                time.sleep(0.5)
            if serving and status is None:
                self._sync_serve()
            if status is None and not n:
                h.wait(0.02)
            elif status is None and shipper.caught_up:  # (SHIP_EVERY: more lines to a batch; returns at the exit)
                h.wait(max(0.0, read_at + SHIP_EVERY - time.monotonic()))
        if stopper is not None:
            stopper.join()
        shipper.drain()
        self._save(shipper=shipper.checkpoint())
        shipper.close()
        self._keep_artifacts()
        if (self.dir / "fenced").exists():
            self._report_final(RunStatus.LOST, status.code, "fenced: the node's lease expired (the scheduler had not "
                                                            "heard from this agent in time), so the job was killed")
        elif self.stop_event.is_set():
            self._report_final(RunStatus.KILLED, status.code, self.stop_reason)
        elif status.code == 0:
            self._report_final(RunStatus.FINISHED, 0, None)
        elif status.phase == "bootstrap":
            self._report_final(RunStatus.FAILED, status.code, f"bootstrap failed with exit code {status.code}")
        elif status.reason:
            self._report_final(RunStatus.FAILED, status.code, status.reason)
        elif status.signal:
            self._report_final(RunStatus.FAILED, status.code, f"killed by signal {status.signal}")
        else:
            self._report_final(RunStatus.FAILED, status.code, f"job exited with code {status.code}")

    def _keep_artifacts(self) -> None:
        """Upload what the job left in FEDML_ARTIFACT_DIR (before the final report, so a finished run has them)."""
        art = self.job_dir / "artifacts"
        try:
            if not art.is_dir() or art.is_symlink() or not any(art.iterdir()):
                return
        except OSError:
            return
        try:
            packed = self._pack_artifacts(art)
        except (PackError, OSError, subprocess.TimeoutExpired) as exc:
            log.warning("run %s: artifacts not kept: %s", self.run_id, exc)
            return
        rank = int(self.saved.get("rank", 0))
        try:
            self._retry(lambda: self.agent.client.upload_artifacts(self.run_id, rank, self.attempt, packed.path,
                                                                   packed.sha256, packed.files))
        finally:
            os.unlink(packed.path)

    def _pack_artifacts(self, art: Path) -> Packed:
        """The job controls its artifact tree: a job running as another user has it packed by a process of that
        user (`python -m scheduler.contract.archive pack`), so no link it planted is ever read with the agent's rights."""
        user = self.agent.job_user
        if not user.separate:
            return pack(art)
        import hashlib
        import tempfile

        fd, path = tempfile.mkstemp(prefix="artifacts-", suffix=".tar.gz", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as out:
                r = subprocess.run([sys.executable, "-m", "scheduler.contract.archive", "pack", str(art)], stdout=out,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd="/", timeout=600,
                                   user=user.uid, group=user.gid, extra_groups=[], umask=0o077,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(self.job_dir)})
            if r.returncode != 0:
                raise PackError(r.stderr.decode(errors="replace").strip()[-500:] or f"exit {r.returncode}")
            try:
                files, sha = r.stderr.decode(errors="replace").split()[-2:]
                int(files)
            except ValueError:
                raise PackError(f"the packer said {r.stderr[-200:]!r}") from None
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                raise PackError("the packed artifacts do not match their digest")
            return Packed(path=path, sha256=sha, files=int(files), size=os.path.getsize(path))
        except BaseException:
            os.unlink(path)
            raise

    def _report_final(self, status: RunStatus, code: int | None, reason: str | None) -> None:
        self.finishing = True
        self._save(final={"status": status.value, "exit_code": code, "reason": reason})

        def send() -> None:
            try:
                self.agent.client.report(self.run_id, self.attempt, self.agent.node_id, status, code, reason)
            except Refused as exc:
                if exc.status not in (403, 404, 409):  # the scheduler has settled this run already
                    raise
        self._retry(send)
        shutil.rmtree(self.job_dir, ignore_errors=True)  # fd-based on Linux: never follows the job's links
        shutil.rmtree(self.dir, ignore_errors=True)

    def _retry(self, fn: Any) -> None:
        delay = 0.2
        while True:
            try:
                fn()
                return
            except Unreachable:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Refused as exc:
                if exc.status >= 500:  # the scheduler cannot store it now (a full disk: 503): the outcome must
                    log.warning("run %s: report not stored yet (%s); retrying", self.run_id, exc)  # not be lost
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.warning("run %s: scheduler refused a report: %s", self.run_id, exc)
                return
