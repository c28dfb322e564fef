"""Where the Docker Engine API is (DOCKER_HOST, else the default socket), whether it answers, and a client
for it (Docker or podman; the docker SDK is imported only here, when a container is used)."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

from .base import StartError

DEFAULT_HOST = "unix:///var/run/docker.sock"
API_VERSION = "1.41"  # Docker 20.10 and podman 4 speak it; newer engines still accept it
OOM_REASON = "killed: out of memory or SIGKILL"


def _client(timeout: float | None = 60) -> Any:
    import docker

    try:
        # A fixed API version: "auto" asks GET /version first, which takes ~1 s on podman, for every client.
        return docker.DockerClient(base_url=docker_host(), timeout=timeout,  # type: ignore[arg-type]
                                   version=os.environ.get("DOCKER_API_VERSION", API_VERSION))
    except docker.errors.DockerException as exc:
        raise StartError(f"no Docker Engine API at {docker_host()}: {exc}") from None


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def engine_answers(host: str | None = None, timeout: float = 1.0) -> bool:
    """Does a Docker Engine API answer `GET /_ping` at `host` (DOCKER_HOST or the default socket)?

    A raw socket, not the SDK: the agent asks this at start-up and the answer must be quick and cheap.
    """
    url = urlsplit(host or docker_host())
    try:
        if url.scheme == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: Any = url.path
        elif url.scheme in ("tcp", "http") and url.hostname:
            s = socket.socket(socket.AF_INET6 if ":" in url.hostname else socket.AF_INET, socket.SOCK_STREAM)
            addr = (url.hostname, url.port or 2375)
        else:
            return False
        with s:
            s.settimeout(timeout)
            s.connect(addr)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            head = s.recv(64)
        return head.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, IndexError):
        return False
