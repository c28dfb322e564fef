"""The docker runtime: `containerize: true` runs the rank in a container through the Docker Engine API.

Built on the `docker` SDK (imported lazily: the CLI never loads this module's dependencies). Any engine that
speaks the API works; the tests use podman (`scripts/podman-up.sh`).

Layout of a run directory (the agent's), and where each part is inside the container:
    workspace/   -> /fedml/workspace   the working directory (read-write)
    artifacts/   -> /fedml/artifacts   FEDML_ARTIFACT_DIR
    ctr/         -> /fedml/ctr         bootstrap.sh, job.sh, wrapper.sh; written by the wrapper: exit_code,
                                       stdout.log and stderr.log (the job's output, which the agent tails)

The job's output goes to files in a mounted directory, as with the process runtime, not through the Engine's
followed log stream: podman's (4.3) loses lines under fast output (19,455 of 50,000 lines arrived in a test),
a known bug of its k8s-file driver. So shipping, resuming after an agent restart and the last lines of a
finished job work exactly as for processes. The Engine's `wait` says when the container has stopped.
Containers carry labels (run, attempt, rank, node, agent home): a restarted agent finds its container by
them; containers of ours that no run claims are removed (`sweep`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scheduler.contract.models import parse_ref

from .base import ExitStatus, Handle, LaunchSpec, Runtime, StartError, read_job_file, substitute, write_job_file
from .container import DockerHandle, _Finished
from .engine import _client, docker_host

if TYPE_CHECKING:
    from scheduler.contract.jobspec import JobSpec

log = logging.getLogger("fedml.agent")

IN_WORKSPACE, IN_ARTIFACTS, IN_CTR = "/fedml/workspace", "/fedml/artifacts", "/fedml/ctr"
# Credentials for pulls, from the run's env (`--env`, `envs`) or the agent's; never passed into the container.
AUTH_VARS = ("FEDML_DOCKER_USERNAME", "FEDML_DOCKER_PASSWORD")

WRAPPER = r"""# written by the fedml agent: PID 1 of the container; bootstrap then job with `set -e` semantics
exec >>/fedml/ctr/stdout.log 2>>/fedml/ctr/stderr.log
cd /fedml/workspace || exit 1
SH=sh
command -v bash >/dev/null 2>&1 && SH=bash
# The kernel drops SIGTERM to PID 1 unless it has a handler: pass `docker stop`'s SIGTERM on to every other
# process of the container, so the job can end cleanly within the grace period before the SIGKILL.
trap 'kill -TERM -1 2>/dev/null' TERM INT
phase() {
    "$SH" -e "$2" &
    pid=$!
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break  # still there: `wait` was cut short by the trap
    done
    if [ "$rc" -ne 0 ] || [ "$1" = job ]; then
        echo "$1 $rc" > /fedml/ctr/exit_code
        exit "$rc"
    fi
}
[ -s /fedml/ctr/bootstrap.sh ] && phase bootstrap /fedml/ctr/bootstrap.sh
phase job /fedml/ctr/job.sh
"""


@dataclass
class ContainerOptions:
    """What a job asks of its container, from the job YAML (`docker`, `image_pull_policy`, `computing`)."""

    image: str
    pull_policy: str = "IfNotPresent"
    username: str | None = None
    password: str | None = None
    registry: str | None = None
    network: str | None = None
    ports: list[int] = field(default_factory=list)
    memory_bytes: int | None = None
    nano_cpus: int | None = None

    @classmethod
    def from_job(cls, spec: JobSpec) -> ContainerOptions:
        d = spec.docker
        if d is None or not d.image:
            raise StartError("containerize: true needs docker.image (the image to run the job in)")
        image = d.image.strip()
        first = image.split("/", 1)[0]
        if d.registry and not ("/" in image and ("." in first or ":" in first or first == "localhost")):
            image = f"{d.registry.rstrip('/')}/{image}"  # FedML: `registry` is where a bare image name lives
        c = spec.computing
        return cls(image=image, pull_policy=spec.image_pull_policy or "IfNotPresent", username=d.username,
                   password=d.password, registry=d.registry, network=d.network, ports=list(d.ports or []),
                   memory_bytes=int(c.memory_gb * 1024**3) if c.memory_gb else None,
                   nano_cpus=int(c.cpus * 1e9) if c.cpus else None)


def _volumes(spec: str | None) -> dict[str, dict[str, str]]:
    """FEDML_DOCKER_VOLUMES of the agent: `SRC:DST[:ro],...`, host paths the node lends to every container
    (e.g. a dataset cache, or the host's /usr and Python for images without one). A node's choice, not a
    job's: a job YAML that could mount any host path would own the host."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        bits = item.split(":")
        if len(bits) not in (2, 3) or bits[-1] not in ("ro", "rw", bits[1]):
            raise StartError(f"FEDML_DOCKER_VOLUMES: {item!r}: expected SRC:DST or SRC:DST:ro")
        out[bits[0]] = {"bind": bits[1], "mode": bits[2] if len(bits) == 3 else "rw"}
    return out


def _gpu_requests(env: dict[str, str]) -> tuple[list[Any], str]:
    """device_requests for the allocated GPU indices only, and CUDA_VISIBLE_DEVICES as the container numbers
    them (the Engine exposes just those devices, as 0..n-1)."""
    ids = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not ids:
        return [], ""
    from docker.types import DeviceRequest

    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])], ",".join(str(i) for i in range(len(ids)))


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(self, home: str = "") -> None:
        self.home = home  # the agent's home: labels containers as ours when several agents share an engine
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _client()
            return self._client

    # ---- images -------------------------------------------------------------------------------------------
    def ensure_image(self, opts: ContainerOptions, env: dict[str, str]) -> None:
        import docker
        from docker.utils import parse_repository_tag

        have = True
        try:
            self.client.images.get(opts.image)
        except docker.errors.NotFound:  # ImageNotFound, or podman's "image not known" (docker-py says NotFound)
            have = False
        except docker.errors.APIError as exc:
            raise StartError(f"image {opts.image}: {exc.explanation or exc}") from None
        if opts.pull_policy == "Never":
            if not have:
                raise StartError(f"image {opts.image} is not on this node and image_pull_policy is Never")
            return
        if have and opts.pull_policy == "IfNotPresent":
            return
        user = opts.username or env.get(AUTH_VARS[0]) or os.environ.get(AUTH_VARS[0])
        password = opts.password or env.get(AUTH_VARS[1]) or os.environ.get(AUTH_VARS[1])
        auth = {"username": user, "password": password} if user and password else None
        # A pull that stalls must end in an error, not hang the run: each read waits at most this long.
        puller = _client(timeout=float(os.environ.get("FEDML_DOCKER_PULL_TIMEOUT", "300")))
        what = "is not on this node and could not be pulled" if not have else "could not be pulled (Always)"
        repo, tag = parse_repository_tag(opts.image)
        try:
            # The low-level stream: the engine reports a failed pull inside it (unauthorized, no such
            # manifest), which images.pull() drops in favour of a bare "no such image".
            for msg in puller.api.pull(repo, tag=tag or "latest", stream=True, decode=True, auth_config=auth):
                if isinstance(msg, dict) and msg.get("error"):
                    raise StartError(f"image {opts.image} {what}: {msg['error']}")
            self.client.images.get(opts.image)
        except (docker.errors.DockerException, OSError) as exc:
            why = getattr(exc, "explanation", None) or str(exc)
            raise StartError(f"image {opts.image} {what}: {why}") from None
        finally:
            puller.close()

    # ---- Runtime ------------------------------------------------------------------------------------------
    def start(self, spec: LaunchSpec) -> DockerHandle:
        import docker

        job = spec.job_spec
        assert job is not None, "the agent passes the job spec to container runtimes"
        opts = ContainerOptions.from_job(job)
        d = spec.run_dir
        ctr = d / "ctr"
        ctr.mkdir(parents=True, exist_ok=True)
        spec.workspace.mkdir(parents=True, exist_ok=True)
        (d / "artifacts").mkdir(exist_ok=True)
        spec.own(ctr, d / "artifacts")
        (ctr / "exit_code").unlink(missing_ok=True)
        env = {k: v for k, v in spec.env.items() if k not in AUTH_VARS}
        env.update({"FEDML_WORKSPACE_DIR": IN_WORKSPACE, "FEDML_ARTIFACT_DIR": IN_ARTIFACTS})
        devices, visible = _gpu_requests(env)
        env["CUDA_VISIBLE_DEVICES"] = visible
        for name, text in (("bootstrap.sh", substitute(spec.bootstrap, env) + "\n"),
                           ("job.sh", substitute(spec.job, env) + "\n"), ("wrapper.sh", WRAPPER)):
            write_job_file(ctr / name, text.encode(), spec.uid, spec.gid)
        volumes = _volumes(os.environ.get("FEDML_DOCKER_VOLUMES"))
        volumes.update({str(spec.workspace.resolve()): {"bind": IN_WORKSPACE, "mode": "rw"},
                        str((d / "artifacts").resolve()): {"bind": IN_ARTIFACTS, "mode": "rw"},
                        str(ctr.resolve()): {"bind": IN_CTR, "mode": "rw"}})
        network = opts.network or os.environ.get("FEDML_DOCKER_NETWORK") or "host"
        labels = self._labels(spec)
        kw: dict[str, Any] = {
            "command": ["/bin/sh", f"{IN_CTR}/wrapper.sh"], "entrypoint": [], "environment": env,
            "working_dir": IN_WORKSPACE, "labels": labels, "volumes": volumes, "network_mode": network,
            "name": _name(d), "detach": True, "stdin_open": False, "tty": False,
        }
        if spec.uid is not None:  # a root agent: the container runs as the job's user too, not as root
            kw["user"] = f"{spec.uid}:{spec.gid}"
        if devices:
            kw["device_requests"] = devices
        if opts.memory_bytes:
            kw["mem_limit"] = opts.memory_bytes
            kw["memswap_limit"] = opts.memory_bytes  # no swap on top: the limit is the limit
        if opts.nano_cpus:
            kw["nano_cpus"] = opts.nano_cpus
        if opts.ports and network not in ("host", "none"):
            kw["ports"] = {f"{p}/tcp": p for p in opts.ports}
        self.ensure_image(opts, spec.env)
        try:
            try:
                container = self.client.containers.create(opts.image, **kw)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                self.remove(kw["name"])  # left by an agent that died between create and saving its state
                container = self.client.containers.create(opts.image, **kw)
            try:
                container.start()
            except docker.errors.APIError:
                self.remove(container.id)
                raise
        except docker.errors.APIError as exc:
            raise StartError(f"container for image {opts.image}: {exc.explanation or exc}") from None
        except (docker.errors.DockerException, OSError) as exc:
            raise StartError(f"Docker Engine API at {docker_host()}: {exc}") from None
        return DockerHandle(self, spec.run_id, d, container, labels)

    def _labels(self, spec: LaunchSpec) -> dict[str, str]:
        return {"fedml.run": spec.run_id, "fedml.attempt": str(parse_ref(spec.run_dir.name)[1]),
                "fedml.rank": str(spec.rank), "fedml.node": spec.env.get("FEDML_CURRENT_EDGE_ID", ""),
                "fedml.home": self.home}

    def find(self, labels: dict[str, str]) -> list[Any]:
        keys = ("fedml.run", "fedml.attempt", "fedml.rank", "fedml.node", "fedml.home")
        return listed(self.client, {"label": [f"{k}={labels[k]}" for k in keys if labels.get(k)]})

    def reattach(self, state: dict[str, Any], run_dir: Path) -> Handle | None:
        if state.get("runtime") != "docker":
            return None
        run_id = str(state.get("run_id", run_dir.name))
        final = read_job_file(run_dir / "ctr" / "final", 4096)
        if final:  # ended and removed; only the report is missing
            phase, code, *why = final.decode(errors="replace").split(" ", 2)
            return _Finished(run_id, run_dir, ExitStatus(code=int(code), phase=phase, reason=(why or [""])[0] or None,
                                                         signal=9 if int(code) == 137 else None))
        labels = dict(state.get("labels") or {})
        if not (labels.get("fedml.run") and labels.get("fedml.home")):
            return None  # never match by fewer labels: that could pick up another agent's container
        deadline = time.monotonic() + 30
        while True:  # the engine may be restarting along with us
            try:
                found = self.find(labels)
                break
            except Exception as exc:  # docker.errors.DockerException, requests' errors, OSError
                if time.monotonic() > deadline:
                    raise StartError(f"Docker Engine API at {docker_host()}: {exc}") from None
                time.sleep(1.0)
        if not found:
            return None
        return DockerHandle(self, run_id, run_dir, found[0], labels)

    def remove(self, container: str) -> None:
        """Remove the container, stopping it first. Podman refuses a forced remove of a container caught in
        the middle of stopping (500 "could not be stopped ... container state improper"): that answer is tried
        again, briefly (5 tries, 0.1 s to 1 s apart), since the stop it waits for ends on its own."""
        import docker
        import tenacity

        retry = tenacity.Retrying(stop=tenacity.stop_after_attempt(5),
                                  wait=tenacity.wait_exponential(multiplier=0.1, max=1.0),
                                  retry=tenacity.retry_if_exception(_stopping), reraise=True)
        with contextlib.suppress(docker.errors.NotFound):
            try:
                for attempt in retry:
                    with attempt:
                        self.client.api.remove_container(container, force=True, v=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 404:
                    raise

    def sweep(self, keep: set[tuple[str, str, str]]) -> int:
        """Remove this agent's containers that no run of it claims (run, attempt, rank): what an agent that
        died between creating a container and recording it would otherwise leave running."""
        if not self.home:
            return 0
        n = 0
        for row in self.client.api.containers(all=True, filters={"label": f"fedml.home={self.home}"}):
            lab = row.get("Labels") or {}
            if (lab.get("fedml.run", ""), lab.get("fedml.attempt", ""), lab.get("fedml.rank", "")) not in keep:
                self.remove(row["Id"])
                n += 1
        return n


def _stopping(exc: BaseException) -> bool:
    """The engine's answer to removing a container that is stopping at that moment (podman 4)."""
    import docker

    text = str(getattr(exc, "explanation", "") or exc).lower()
    return (isinstance(exc, docker.errors.APIError) and exc.status_code == 500
            and ("state improper" in text or "could not be stopped" in text))


def listed(client: Any, filters: dict[str, Any]) -> list[Any]:
    """The containers matching `filters`, less any removed meanwhile. docker-py's `containers.list` inspects
    each container it lists and fails on one that went in between (podman answers that with a 500)."""
    import docker

    out = []
    for row in client.api.containers(all=True, filters=filters):
        try:
            out.append(client.containers.get(row["Id"]))
        except docker.errors.APIError as exc:
            if exc.status_code != 404 and "no such container" not in str(exc.explanation or "").lower():
                raise
    return out


def _name(run_dir: Path) -> str:
    # One name per run directory: unique across agents sharing an engine, the same on a retried create.
    return f"fedml-{run_dir.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
