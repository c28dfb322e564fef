"""A test double of NVML (the part of nvidia-ml-py's `pynvml` the agent calls), used instead of the real library
when FEDML_NVML_DOUBLE names a JSON file. The tests own that file and change it while the agent runs: every call
reads it afresh, so the next sample sees what a test just wrote. Nothing else reads it; CI has no GPU.

    {"gpus": [{"name": "NVIDIA A100 80GB PCIe", "memory_total_mb": 81920, "memory_used_mb": 1024,
               "utilization": 35, "power_w": 120.5, "temperature_c": 51, "pids": [4242],
               "ecc_uncorrected": 0, "xid": [79]}]}

Each GPU's `pids` are its compute processes (nvmlDeviceGetComputeRunningProcesses), as real ones would be: host
process ids. `xid`: critical errors, each delivered once to the process's event set (nvmlEventSetWait) in the
order written; `ecc_uncorrected`: the volatile count of uncorrected ECC errors.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
nvmlEventTypeXidCriticalError = 8  # noqa: N816 - NVML's name
_delivered: dict[int, int] = {}  # GPU -> how many of its `xid` entries were delivered


class NVMLError(Exception):
    pass


class NVMLError_Timeout(NVMLError):  # noqa: N801 - pynvml's name
    pass


def _gpus() -> list[dict[str, Any]]:
    path = os.environ.get("FEDML_NVML_DOUBLE", "")
    try:
        with open(path, encoding="utf-8") as f:
            return list(json.load(f).get("gpus", []))
    except (OSError, ValueError) as exc:
        raise NVMLError(f"NVML double {path}: {exc}") from None


def nvmlInit() -> None:  # noqa: N802 - NVML's names
    _gpus()


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(i: int) -> int:  # noqa: N802
    if not 0 <= i < len(_gpus()):
        raise NVMLError(f"no GPU {i}")
    return i


def _gpu(h: int) -> dict[str, Any]:
    gpus = _gpus()
    if not 0 <= h < len(gpus):
        raise NVMLError(f"GPU {h} is gone")
    return gpus[h]


def nvmlDeviceGetName(h: int) -> str:  # noqa: N802
    return str(_gpu(h).get("name", "NVIDIA Test GPU"))


def nvmlDeviceGetMemoryInfo(h: int) -> Any:  # noqa: N802
    g = _gpu(h)
    total, used = int(g.get("memory_total_mb", 16384)) << 20, int(g.get("memory_used_mb", 0)) << 20
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(h: int) -> Any:  # noqa: N802
    return SimpleNamespace(gpu=int(_gpu(h).get("utilization", 0)), memory=0)


def nvmlDeviceGetPowerUsage(h: int) -> int:  # noqa: N802 - milliwatts, as NVML's
    return int(float(_gpu(h).get("power_w", 0.0)) * 1000)


def nvmlDeviceGetTemperature(h: int, sensor: int) -> int:  # noqa: N802
    return int(_gpu(h).get("temperature_c", 0))


def nvmlDeviceGetComputeRunningProcesses(h: int) -> list[Any]:  # noqa: N802
    return [SimpleNamespace(pid=int(p), usedGpuMemory=None) for p in _gpu(h).get("pids", [])]


def nvmlDeviceGetTotalEccErrors(h: int, error_type: int, counter: int) -> int:  # noqa: N802
    return int(_gpu(h).get("ecc_uncorrected", 0))


def nvmlDeviceGetIndex(h: int) -> int:  # noqa: N802
    return h


def nvmlEventSetCreate() -> Any:  # noqa: N802
    return SimpleNamespace(devices=set())


def nvmlDeviceRegisterEvents(h: int, types: int, event_set: Any) -> None:  # noqa: N802
    event_set.devices.add(h)


def nvmlEventSetWait(event_set: Any, timeout_ms: int) -> Any:  # noqa: N802
    for h in sorted(event_set.devices):
        xids = list(_gpu(h).get("xid", []))
        done = _delivered.get(h, 0)
        if done < len(xids):
            _delivered[h] = done + 1
            return SimpleNamespace(device=h, eventType=nvmlEventTypeXidCriticalError, eventData=int(xids[done]))
    raise NVMLError_Timeout("no event")

