"""What this machine has: GPUs from NVML (nvidia-ml-py) when present, CPU and memory from psutil."""

from __future__ import annotations

import os
import socket

import psutil

from scheduler.contract.models import GpuInfo, NodeInfo, parse_gpu_decl


def nvml_gpus() -> tuple[list[GpuInfo], str | None]:
    """GPUs seen by NVML, or ([], why not)."""
    try:
        from .telemetry import nvml

        pynvml = nvml()  # (or the test double: agents/nvml_double.py)
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and friends: no driver, no device
        return [], f"NVML not available ({exc})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                util = None
            out.append(GpuInfo(index=i, name=name, memory_mb=int(mem.total // (1024 * 1024)), utilization=util))
        return out, None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect_address(server_url: str) -> str:
    """The local address this machine uses towards the scheduler: what other nodes can likely reach.
    (A UDP connect sends nothing; it only asks the kernel for the route.)"""
    from urllib.parse import urlsplit

    host = urlsplit(server_url).hostname or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def available_runtimes() -> list[str]:
    """"process" always; "docker" when a Docker Engine API (Docker, podman) answers at DOCKER_HOST or the default
    socket. (runtime.engine asks without the docker SDK, which is imported only when a container starts.)"""
    from runtime.engine import engine_answers

    return ["process", "docker"] if engine_answers() else ["process"]


def collect(name: str | None = None, gpus_decl: str | None = None, labels: dict[str, str] | None = None,
            price: float | None = None, runtimes: list[str] | None = None, address: str = "127.0.0.1") -> NodeInfo:
    from scheduler.contract import __version__

    gpus = parse_gpu_decl(gpus_decl) if gpus_decl else nvml_gpus()[0]
    return NodeInfo(
        name=name or socket.gethostname(),
        gpus=gpus,
        cpus=os.cpu_count() or 1,
        memory_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        labels=labels or {},
        price_per_gpu_hour=price,
        runtimes=runtimes or available_runtimes(),
        address=address,
        agent_version=__version__,
    )


if __name__ == "__main__":  # `fedml env` asks across a process boundary: python -m agents.inventory
    import json

    found, why = nvml_gpus()
    print(json.dumps({"gpus": [g.model_dump() for g in found], "why": why}))
