"""A started rank: its pod's state read from the Cluster's cache, mapped to our states (Pending -> STARTING,
Running -> RUNNING, Succeeded -> FINISHED, Failed -> FAILED; evicted or deleted -> LOST; a fencing deadline ->
LOST, fenced), its log followed into stdout.log, and stop (delete with foreground propagation, wait)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..base import ExitStatus, Handle
from .cluster import Cluster, pod_active
from .manifests import CONTAINER, FENCED, IMAGE_ERRORS, START_ERRORS, api_error, fence_deadline, fenced

log = logging.getLogger("fedml.kubernetes")

def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _create(fn: Callable[[], Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        fn()
    except ApiException as exc:
        if exc.status != 409:  # exists already: made before an agent restart
            raise


class PodHandle(Handle):
    """A started rank: reads its pod's state from the Cluster's watch cache, follows its log into stdout.log.

    `outcome` is set when the pod's end is not just an exit code: (status, reason, exit code) with status
    LOST (evicted, deleted under us) or FAILED (image pull error, OOMKilled...). `on_running` is called once,
    on the polling thread, when the pod first runs."""

    LOG_GRACE_S = 20.0  # after the pod ended, how long to keep trying to read the rest of its log

    def __init__(self, cluster: Cluster, job: str, run_id: str, run_dir: Path, image: str = "",
                 grace: float = 10.0) -> None:
        self.cluster, self.job, self.run_id, self.run_dir, self.image = cluster, job, run_id, run_dir, image
        self.grace = grace
        self._job_start: float | None = None  # the Job's status.startTime: what activeDeadlineSeconds counts from
        self._deadline: int | None = None
        self.namespace = cluster.namespace
        self.outcome: tuple[str, str, int | None] | None = None
        self.on_running: Callable[[], None] | None = None
        self._running_seen = False
        self._status: ExitStatus | None = None
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._pod_name: str | None = None
        self._ended_at: float | None = None
        self._logs: threading.Thread | None = None
        self._logs_done = threading.Event()
        self._created = time.monotonic()
        self._job_checked = 0.0
        self._cleaned = False
        run_dir.mkdir(parents=True, exist_ok=True)
        cluster.listen(self._on_change)

    def fence_until(self, lease_until: float) -> None:
        """Fencing for pods: the node's lease runs out at wall-clock `lease_until`; have the cluster's own Job
        controller end this Job's pods before then (activeDeadlineSeconds, counted from the Job's start, minus
        the pods' stop grace). Called each time the agent renews the lease; if the agent dies, is stopped or
        is cut off, nobody moves the deadline and the pods are gone before the scheduler writes the node off,
        whether or not the agent's machine still reaches the cluster."""
        from kubernetes.client.exceptions import ApiException

        if self._status is not None or self._stopping.is_set():
            return
        if self._job_start is None:
            job = self._read_job()
            if not job:
                return
            meta, st = job.get("metadata") or {}, job.get("status") or {}
            stamp = st.get("startTime") or meta.get("creationTimestamp")
            if not stamp:
                return
            self._job_start = _epoch(stamp)
            self._deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        deadline = fence_deadline(lease_until, self._job_start, self.grace)
        if self._deadline is not None and deadline <= self._deadline:
            return  # never shortened: a renewal only moves it on
        try:
            self.cluster.batch.patch_namespaced_job(self.job, self.namespace,
                                                    {"spec": {"activeDeadlineSeconds": deadline}},
                                                    _preload_content=False)
            self._deadline = deadline
        except ApiException as exc:
            if exc.status != 404:
                log.warning("Job %s: could not move its deadline on: %s", self.job, api_error(exc))
        except Exception as exc:
            log.warning("Job %s: could not move its deadline on: %s", self.job, exc)

    # -- Handle --------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"runtime": "kubernetes", "job": self.job, "namespace": self.namespace, "run_id": self.run_id,
                "image": self.image}

    def log_files(self) -> dict[str, Path]:
        return {"stdout": self.run_dir / "stdout.log", "stderr": self.run_dir / "stderr.log"}

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def _on_change(self, kind: str) -> None:
        if kind == "pods":
            self._changed.set()

    def poll(self) -> ExitStatus | None:
        if self._status is not None:
            return self._status
        pods = self.cluster.pods_of_job(self.job)
        pod = next((p for p in reversed(pods) if p["metadata"]["name"] == self._pod_name), None) or (
            pods[-1] if pods else None)
        if pod is None:
            return self._no_pod()
        self._pod_name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        phase = st.get("phase") or "Pending"
        cs = next((c for c in st.get("containerStatuses") or [] if c.get("name") == CONTAINER), {})
        state = cs.get("state") or {}
        if phase == "Pending":
            if self._stopping.is_set():
                return self._end(137, None, cleanup=False) if self._job_gone() else None
            waiting = state.get("waiting") or {}
            why = waiting.get("reason")
            if why in IMAGE_ERRORS:
                return self._end(125, ("FAILED", f"image {self.image}: {why}: {waiting.get('message') or ''}".rstrip(": "),
                                       None))
            if why in START_ERRORS:
                return self._end(126, ("FAILED", f"{why}: {waiting.get('message') or ''}".rstrip(": "), None))
            return None
        if phase == "Running" or state.get("running") or state.get("terminated"):
            self._follow_logs(pod)
            if not self._running_seen:
                self._running_seen = True
                if self.on_running:
                    self.on_running()
        if phase == "Running":
            return None
        if phase == "Unknown":
            return None
        # Succeeded or Failed
        if st.get("reason") == "Evicted":
            return self._end(137, ("LOST", f"pod {self._pod_name} was evicted: {st.get('message') or ''}".rstrip(": "),
                                   None), wait_logs=self._logs is not None)
        term = state.get("terminated") or {}
        if not term:
            why = st.get("reason") or "the pod failed before its container ran"
            return self._end(1, ("FAILED", f"{why}: {st.get('message') or ''}".rstrip(": "), None))
        code = int(term.get("exitCode", 1))
        if term.get("reason") == "OOMKilled":
            return self._end(code, ("FAILED", f"OOMKilled: the container exceeded its memory limit (exit code {code})",
                                    code), wait_logs=True)
        phase_of = "bootstrap" if (term.get("message") or "").strip() in ("bootstrap", "unpack") else "job"
        return self._end(code, None, phase=phase_of, wait_logs=True)

    def _no_pod(self) -> ExitStatus | None:
        if self._stopping.is_set():
            if self._job_gone():
                return self._end(137, None, cleanup=False)
            return None
        if self._pod_name is not None:  # we saw it, and now it is gone without ending
            return self._end(137, ("LOST", f"pod {self._pod_name} was deleted before it ended", None),
                             wait_logs=self._logs is not None)
        # No pod yet: normal for a moment. Now and then ask the Job why (quota, admission, deleted under us).
        now = time.monotonic()
        if now - self._job_checked > 5.0:
            self._job_checked = now
            job = self._read_job()
            if job is None:
                return self._end(137, ("LOST", f"Job {self.job} was deleted", None), cleanup=False)
            if fenced(job):
                return self._end(137, ("LOST", FENCED, None), cleanup=False)
            for cond in (job.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Failed" and cond.get("status") == "True":
                    return self._end(1, ("FAILED", f"Job {self.job}: {cond.get('reason')}: {cond.get('message')}", None))
        return None

    def _read_job(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self.cluster.batch.read_namespaced_job(self.job, self.namespace,
                                                                     _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            return {}
        except Exception:
            return {}

    def _job_gone(self) -> bool:
        now = time.monotonic()
        if now - self._job_checked < 0.25:
            return False
        self._job_checked = now
        return self._read_job() is None

    def _end(self, code: int, outcome: tuple[str, str, int | None] | None, *, phase: str = "job",
             wait_logs: bool = False, cleanup: bool = True) -> ExitStatus | None:
        """The pod is over: wait (bounded) for its log to be read, then delete the Job and answer."""
        if self._ended_at is None:
            self._ended_at = time.monotonic()
        if wait_logs and self._logs is not None and not self._logs_done.is_set():
            if time.monotonic() - self._ended_at < self.LOG_GRACE_S:
                return None
            self._note("the rest of the pod's log could not be read")
        self.outcome = outcome
        self._status = ExitStatus(code=code, phase=phase)
        if cleanup and not self._stopping.is_set():
            self._delete("Background")
        self.cluster.unlisten(self._on_change)
        return self._status

    def _delete(self, propagation: str) -> None:
        """Delete the Job; its pods, ConfigMap and Service go with it (owner references)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        log.info("deleting Job %s (%s)", self.job, "stop" if self._stopping.is_set() else
                 (self.outcome[1] if self.outcome else f"ended: {self._status}"))
        try:
            self.cluster.batch.delete_namespaced_job(self.job, self.namespace,
                                                     body=client.V1DeleteOptions(propagation_policy=propagation))
        except ApiException as exc:
            if exc.status != 404:
                log.warning("deleting Job %s: %s", self.job, api_error(exc))
        except Exception as exc:
            log.warning("deleting Job %s: %s", self.job, exc)

    def stop(self, grace: float) -> None:
        """Delete the Job (foreground: the Job goes once its pods are gone), wait until it is gone."""
        self._stopping.set()
        self._delete("Foreground")
        deadline = time.monotonic() + grace + 30
        while time.monotonic() < deadline:
            if self._read_job() is None and not self.cluster.pods_of_job(self.job):
                break
            time.sleep(0.2)
        else:
            log.warning("Job %s still has pods %.0f s after it was deleted (is the node's kubelet down?)",
                        self.job, grace + 30)
        self._changed.set()

    # -- logs ----------------------------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        with open(self.run_dir / "stderr.log", "a") as f:
            f.write(f"[fedml] {text}\n")

    def _follow_logs(self, pod: dict[str, Any]) -> None:
        if self._logs is None:
            self._logs = threading.Thread(target=self._read_logs, args=(pod["metadata"]["name"],),
                                          name=f"logs-{self.job}", daemon=True)
            self._logs.start()

    def _read_logs(self, pod: str) -> None:
        """Follow the container's log into stdout.log. A re-read (the stream dropped, the agent restarted)
        starts from the beginning of the pod's log and skips the bytes the file already holds."""
        from kubernetes.client.exceptions import ApiException

        out = self.run_dir / "stdout.log"
        delay, said = 0.2, ""
        try:
            while True:
                last_error = ""
                have = out.stat().st_size if out.exists() else 0
                ended = self._pod_ended(pod)
                try:
                    resp = self.cluster.core.read_namespaced_pod_log(
                        pod, self.namespace, container=CONTAINER, follow=not ended, _preload_content=False,
                        # a quiet job's follow is re-opened after an hour of silence (the skip makes it seamless)
                        _request_timeout=(10, 3600))
                    try:
                        skip = have
                        with open(out, "ab") as f:
                            for chunk in resp.stream(65536, decode_content=True):
                                if skip:
                                    cut = min(skip, len(chunk))
                                    chunk, skip = chunk[cut:], skip - cut
                                if chunk:
                                    f.write(chunk)
                                    f.flush()
                                    self._changed.set()
                    finally:
                        resp.release_conn()
                    if ended or self._pod_ended(pod):
                        if not ended:
                            continue  # one more plain read catches what the follow may have missed
                        return
                    delay = 0.2
                except ApiException as exc:
                    last_error = api_error(exc)
                    if exc.status == 404 and self._stopping.is_set():
                        return
                    if exc.status == 404 or (ended and time.monotonic() - (self._ended_at or 0) > self.LOG_GRACE_S):
                        self._note(f"the pod's log could not be read: {last_error}")
                        return
                except Exception as exc:
                    last_error = str(exc)
                if last_error and last_error != said:
                    log.info("Job %s: reading the log of pod %s: %s", self.job, pod, last_error)
                    said = last_error
                if self._stopping.is_set() and self._pod_gone(pod):
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._logs_done.set()
            self._changed.set()

    def _pod_ended(self, name: str) -> bool:
        pod = self.cluster.pods.get((self.namespace, name))
        return pod is None or not pod_active(pod)

    def _pod_gone(self, name: str) -> bool:
        return (self.namespace, name) not in self.cluster.pods
