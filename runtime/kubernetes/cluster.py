"""The pool's Jobs and pods as one list-and-watch cache (the kubelet's informer pattern): handles read their
state from it rather than polling the API server per pod."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from .manifests import GPU, LABEL_POOL, KubeError, api_error

log = logging.getLogger("fedml.kubernetes")

class Cluster:
    """A live view of the cluster's nodes and pods: listed once, then kept current by watches (never by
    polling). Shared by the pool agent (capacity) and every PodHandle (its pod's phase).

    Pods are watched cluster-wide where RBAC allows it (so GPUs held by other workloads are seen), else in
    `namespace` only."""

    WATCH_S = 240

    def __init__(self, api_client: Any, namespace: str, pool: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.namespace, self.pool = namespace, pool
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._by_job: dict[str, dict[str, dict[str, Any]]] = {}  # our namespace's pods by their job-name label
        self.all_namespaces = True
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._stopping = threading.Event()
        self.synced = threading.Event()

    def listen(self, fn: Callable[[str], None]) -> None:
        """`fn(kind)` is called (on a watch thread) after every change of a node or pod."""
        self._listeners.append(fn)

    def unlisten(self, fn: Callable[[str], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def _changed(self, kind: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind)
            except Exception:
                log.exception("a %s listener failed", kind)

    def start(self) -> None:
        """List nodes and pods (raises KubeError if the API refuses), then keep them current in two threads."""
        from kubernetes.client.exceptions import ApiException

        try:
            node_rv = self._relist("nodes")
            try:
                pod_rv = self._relist("pods")
            except ApiException as exc:
                if exc.status != 403:
                    raise
                log.warning("may not list pods cluster-wide (%s); watching namespace %s only: GPUs held by other "
                            "namespaces' pods are not seen", api_error(exc), self.namespace)
                self.all_namespaces = False
                pod_rv = self._relist("pods")
        except ApiException as exc:
            raise KubeError(api_error(exc)) from None
        except Exception as exc:  # urllib3's connection errors, bad TLS, ...
            raise KubeError(f"cannot reach the Kubernetes API: {exc}") from None
        self.synced.set()
        for kind, rv in (("nodes", node_rv), ("pods", pod_rv)):
            threading.Thread(target=self._watch, args=(kind, rv), name=f"watch-{kind}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _list_fn(self, kind: str) -> Callable[..., Any]:
        if kind == "nodes":
            return self.core.list_node
        if self.all_namespaces:
            return self.core.list_pod_for_all_namespaces
        return lambda **kw: self.core.list_namespaced_pod(self.namespace, **kw)

    def _relist(self, kind: str) -> str:
        resp = self._list_fn(kind)(_preload_content=False, _request_timeout=60)
        doc = json.loads(resp.data)
        with self._lock:
            if kind == "nodes":
                self.nodes = {o["metadata"]["name"]: o for o in doc["items"]}
            else:
                self.pods = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in doc["items"]}
                self._by_job = {}
                for o in doc["items"]:
                    self._index(o, deleted=False)
        self._changed(kind)
        return str(doc["metadata"]["resourceVersion"])

    def _watch(self, kind: str, rv: str) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                rv = self._watch_once(kind, rv)
                delay = 0.5
            except _Gone:
                rv = self._safe_relist(kind, rv)
            except Exception as exc:  # the API server restarted, the connection dropped: list again
                log.info("%s watch interrupted (%s); listing again in %.1f s", kind, api_error(exc), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)
                rv = self._safe_relist(kind, rv)

    def _safe_relist(self, kind: str, rv: str) -> str:
        try:
            return self._relist(kind)
        except Exception as exc:
            log.info("listing %s failed: %s", kind, api_error(exc))
            return rv

    def _watch_once(self, kind: str, rv: str) -> str:
        resp = self._list_fn(kind)(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                   timeout_seconds=self.WATCH_S, _preload_content=False,
                                   _request_timeout=(10, self.WATCH_S + 30))
        try:
            buf = b""
            for chunk in resp.stream(65536, decode_content=False):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    obj, typ = ev["object"], ev["type"]
                    if typ == "ERROR":
                        if obj.get("code") == 410:
                            raise _Gone()
                        raise KubeError(f"watch error: {obj.get('message')}")
                    rv = obj["metadata"]["resourceVersion"]
                    if typ == "BOOKMARK":
                        continue
                    self._apply(kind, typ, obj)
        finally:
            resp.release_conn()
        return rv

    def _apply(self, kind: str, typ: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            if kind == "nodes":
                if typ == "DELETED":
                    self.nodes.pop(meta["name"], None)
                else:
                    self.nodes[meta["name"]] = obj
            else:
                key = (meta["namespace"], meta["name"])
                if typ == "DELETED":
                    self.pods.pop(key, None)
                else:
                    self.pods[key] = obj
                self._index(obj, deleted=typ == "DELETED")
        self._changed(kind)

    def _index(self, pod: dict[str, Any], deleted: bool) -> None:
        meta = pod["metadata"]
        job = (meta.get("labels") or {}).get("job-name")
        if job is None or meta["namespace"] != self.namespace:
            return
        pods = self._by_job.setdefault(job, {})
        if deleted:
            pods.pop(meta["name"], None)
            if not pods:
                del self._by_job[job]
        else:
            pods[meta["name"]] = pod

    # -- queries -----------------------------------------------------------------------------------------
    def pods_of_job(self, job: str) -> list[dict[str, Any]]:
        """The Job's pods, oldest first (the job controller labels them job-name=<job>)."""
        with self._lock:
            pods = list(self._by_job.get(job, {}).values())
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def ours(self, pod: dict[str, Any]) -> bool:
        return (pod["metadata"]["namespace"] == self.namespace
                and pod["metadata"].get("labels", {}).get(LABEL_POOL) == self.pool)

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            return dict(self.nodes), list(self.pods.values())


class _Gone(Exception):
    """The watch's resource version is too old (HTTP 410): list again."""


def pod_gpus(pod: dict[str, Any]) -> int:
    """GPUs a pod holds: the largest of its init containers' requests and the sum of its containers'."""
    def req(c: dict[str, Any]) -> int:
        res = c.get("resources") or {}
        v = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU) or 0
        try:
            return int(v)
        except ValueError:
            return 0

    spec = pod.get("spec") or {}
    return max([sum(req(c) for c in spec.get("containers") or []),
                *(req(c) for c in spec.get("initContainers") or [])])


def pod_active(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
