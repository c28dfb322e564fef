"""The agent's GPU samples (issue 17): per GPU its utilisation, memory, power, temperature, uncorrected ECC errors,
critical (XID) errors and compute processes,
read from NVML (nvidia-ml-py; agents/nvml_double.py where FEDML_NVML_DOUBLE says so) at most every SAMPLE_S and
sent with the next poll (models.GpuSample, ~100 bytes a GPU).

A process on a GPU belongs to a run of this node when its environment says so (FEDML_CURRENT_RUN_ID, which every
job's processes inherit; a root agent reads every process's): one that belongs to no run it runs now (an orphan of
a stopped run, something started outside the scheduler) is reported as `outside`, and the scheduler then keeps
that GPU from new runs until it is free. With reclaim (`--reclaim-orphans`), an orphan of a run this agent ran
and that has ended is killed. A run's process on a GPU it was not given is reported as `misplaced` (its run id).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil

from scheduler.contract.models import GPU_SAMPLE_BOUNDS, XID_MAX, GpuSample

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


def reclaim(pid: int, run_id: str | None, gpu: int) -> None:
    """Kill an orphan of an ended run that still holds a GPU (`--reclaim-orphans`)."""
    try:
        p = psutil.Process(pid)
        if p.environ().get("FEDML_CURRENT_RUN_ID") != run_id:  # (the pid was reused meanwhile)
            return
        p.kill()
        log.warning("killed pid %d on GPU %d: left by run %s, which has ended (--reclaim-orphans)", pid, gpu, run_id)
    except (psutil.Error, OSError) as exc:
        log.info("could not reclaim pid %d on GPU %d: %s", pid, gpu, exc)


class Sampler:
    def __init__(self) -> None:
        self._nv: Any = None
        self._at = 0.0
        self._last: list[GpuSample] | None = None
        self._off = False  # no NVML library here: not asked again
        self._retry_at = 0.0  # NVML failed (no driver, no GPU): asked again from then
        self._said = False
        self._events: Any = None  # an NVML event set for XID (critical) errors, where the driver has one

    def sample(self, runs: dict[str, set[int] | None], ended: set[str] | None = None) -> list[GpuSample] | None:
        """The latest sample (a new one at most every SAMPLE_S); None without NVML or GPUs. `runs`: the runs this
        node runs now, each with the GPUs it was given here (None: not known). `ended`: runs this agent ran that
        have ended, whose processes left on a GPU are killed (None: kill nothing)."""
        now = time.monotonic()
        if self._off or now < self._retry_at or (self._last is not None and now - self._at < SAMPLE_S):
            return self._last
        try:
            if self._nv is None:
                nv = nvml()
                nv.nvmlInit()
                self._nv = nv
                self._events = self._xid_events(nv)
            fresh = self._read(self._nv, runs, ended) or None
            self._at = now
            # XID errors go with one poll only; the polls before the next sample resend the rest of it
            self._last = [g.model_copy(update={"xid": []}) for g in fresh] if fresh else None
            return fresh
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

    @staticmethod
    def _xid_events(nv: Any) -> Any:
        """An event set every GPU reports its critical (XID) errors to; None where the driver has none."""
        try:
            events = nv.nvmlEventSetCreate()
            for i in range(nv.nvmlDeviceGetCount()):
                nv.nvmlDeviceRegisterEvents(nv.nvmlDeviceGetHandleByIndex(i), nv.nvmlEventTypeXidCriticalError, events)
            return events
        except Exception as exc:  # noqa: BLE001 - not supported on every GPU or driver
            log.info("no XID events from NVML: %s", exc)
            return None

    def _xids(self, nv: Any) -> dict[int, list[int]]:
        """The XID errors since the last sample, by GPU (the event set's queue, drained without waiting)."""
        out: dict[int, list[int]] = {}
        for _ in range(256):
            try:
                ev = nv.nvmlEventSetWait(self._events, 0)
            except Exception:  # noqa: BLE001 - NVMLError_Timeout: nothing (more) queued
                break
            out.setdefault(int(nv.nvmlDeviceGetIndex(ev.device)), []).append(int(ev.eventData))
        return out

    def _read(self, nv: Any, runs: dict[str, set[int] | None], ended: set[str] | None) -> list[GpuSample]:
        out = []
        xids = self._xids(nv) if self._events is not None else {}
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = power = temp = ecc = None
            try:
                util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                temp = int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:  # noqa: BLE001 - not every GPU answers every query
                pass
            try:
                ecc = int(nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                         nv.NVML_VOLATILE_ECC))
            except Exception:  # noqa: BLE001 - no ECC on consumer GPUs
                pass
            pids = sorted({int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)})[:256]
            owners = {p: run_of(p) for p in pids}
            outside = [p for p, rid in owners.items() if rid not in runs]
            misplaced = sorted({rid for rid in owners.values() if rid in runs and runs[rid] is not None
                                and i not in runs[rid]})  # type: ignore[operator]
            if ended:
                for p in outside:
                    if owners[p] in ended:
                        reclaim(p, owners[p], i)
            values = {"util": util, "mem_used_mb": int(mem.used) >> 20, "mem_total_mb": int(mem.total) >> 20,
                      "power_w": power, "temp_c": temp, "ecc_uncorrected": ecc}
            # (a reading past what the scheduler takes, e.g. a driver's "not available" sentinel, is left out: it
            # would refuse the whole poll)
            values = {k: v if v is None or GPU_SAMPLE_BOUNDS[k][0] <= v <= GPU_SAMPLE_BOUNDS[k][1] else None
                      for k, v in values.items()}
            out.append(GpuSample(index=i, **values, pids=pids, outside=outside, misplaced=misplaced[:64],
                                 xid=[x for x in xids.get(i, []) if 0 <= x <= XID_MAX][:16]))
        return out

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
