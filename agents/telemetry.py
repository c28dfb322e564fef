"""The agent's GPU samples (issue 17): per GPU its utilisation, memory, power, temperature and compute processes,
read from NVML (nvidia-ml-py; agents/nvml_double.py where FEDML_NVML_DOUBLE says so) at most every SAMPLE_S and
sent with the next poll (models.GpuSample, ~100 bytes a GPU).

A process on a GPU belongs to a run of this node when its environment says so (FEDML_CURRENT_RUN_ID, which every
job's processes inherit; a root agent reads every process's): one that belongs to no run it runs now (an orphan of
a stopped run, something started outside the scheduler) is reported as `outside`, and the scheduler then keeps
that GPU from new runs until it is free.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil

from scheduler.contract.models import GpuSample

log = logging.getLogger("fedml.agent")
SAMPLE_S = float(os.environ.get("FEDML_GPU_SAMPLE_S", "5"))  # (tests sample faster)


def nvml() -> Any:
    """The NVML module: the real one, or the test double."""
    if os.environ.get("FEDML_NVML_DOUBLE"):
        from . import nvml_double

        return nvml_double
    import pynvml

    return pynvml


def run_of(pid: int) -> str | None:
    """The run a process belongs to (its FEDML_CURRENT_RUN_ID), None when it has none or cannot be read."""
    try:
        return psutil.Process(pid).environ().get("FEDML_CURRENT_RUN_ID")
    except (psutil.Error, OSError):
        return None


class Sampler:
    def __init__(self) -> None:
        self._nv: Any = None
        self._at = 0.0
        self._last: list[GpuSample] | None = None
        self._off = False  # no NVML library here: not asked again
        self._retry_at = 0.0  # NVML failed (no driver, no GPU): asked again from then
        self._said = False

    def sample(self, runs: set[str]) -> list[GpuSample] | None:
        """The latest sample (a new one at most every SAMPLE_S); None without NVML or GPUs. `runs`: the ids of
        the runs this node runs now."""
        now = time.monotonic()
        if self._off or now < self._retry_at or (self._last is not None and now - self._at < SAMPLE_S):
            return self._last
        try:
            if self._nv is None:
                nv = nvml()
                nv.nvmlInit()
                self._nv = nv
            self._last = self._read(self._nv, runs) or None
        except ImportError:
            self._off = True
            return None
        except Exception as exc:  # NVMLError and friends: no driver, a GPU gone: tried again in a minute
            if not self._said:
                log.info("no GPU samples (NVML: %s); trying again every minute", exc)
                self._said = True
            self._nv, self._last, self._retry_at = None, None, now + 60.0
        self._at = now
        return self._last

    def _read(self, nv: Any, runs: set[str]) -> list[GpuSample]:
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = power = temp = None
            try:
                util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                temp = int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:  # noqa: BLE001 - not every GPU answers every query
                pass
            pids = sorted({int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)})[:256]
            outside = [p for p in pids if run_of(p) not in runs]
            out.append(GpuSample(index=i, util=util, mem_used_mb=int(mem.used) >> 20, mem_total_mb=int(mem.total) >> 20,
                                 power_w=power, temp_c=temp, pids=pids, outside=outside))
        return out

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
