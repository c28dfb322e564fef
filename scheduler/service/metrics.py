"""Job metrics (`fedml run metrics`, the dashboard's plots): read out of the run's stored log, where jobs print
them (scheduler/contract/metrics.py). Each run's series are kept here as they are read, and only lines stored
since the last read are parsed the next time; a restarted scheduler (or another replica) reads the log again.

Bounded, whatever a job prints: at most MAX_SERIES series a run (name, rank, attempt), each thinned to at most
MAX_POINTS points (every other point dropped when it is full: an even sample of the whole run, the latest point
always kept), held as arrays of doubles (24 bytes a point: 6 MiB a run at most); at most CACHED runs held; a read
parses at most SCAN_LINES new lines and says when there is more.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..contract.metrics import parse
from ..contract.models import Principal
from .core import SchedulerBase

MAX_SERIES = 256
MAX_POINTS = 1000
CACHED = 32
SCAN_LINES = 200_000  # (~0.7 s: a user cycling runs past the cache costs that a request, not 1M lines' worth)
WINDOW = 5000


@dataclass
class _Series:
    steps: array = field(default_factory=lambda: array("d"))
    values: array = field(default_factory=lambda: array("d"))
    stamps: array = field(default_factory=lambda: array("d"))
    every: int = 1  # points kept: every n-th reported (doubled each time the arrays are full)
    seen: int = 0  # points reported
    last: tuple[float, float, float] | None = None  # (step, value, ts)

    def add(self, step: float, value: float, ts: float) -> None:
        self.seen += 1
        self.last = (step, value, ts)
        if (self.seen - 1) % self.every == 0:
            self.steps.append(step)
            self.values.append(value)
            self.stamps.append(ts)
            if len(self.steps) >= MAX_POINTS:
                self.steps, self.values, self.stamps = self.steps[::2], self.values[::2], self.stamps[::2]
                self.every *= 2

    def points(self) -> list[list[float]]:
        out = [[s, v, t] for s, v, t in zip(self.steps, self.values, self.stamps, strict=True)]
        if self.last is not None and (not out or tuple(out[-1]) != self.last):
            out.append(list(self.last))  # (the latest, also when thinning skipped it)
        return out


@dataclass
class _RunMetrics:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pos: int = -1  # the last log position read
    series: dict[tuple[str, int, int], _Series] = field(default_factory=dict)
    ignored: int = 0
    why: str | None = None  # the latest reason a metric line was ignored
    dropped: int = 0  # values of series beyond MAX_SERIES


class MetricsMixin(SchedulerBase):
    _metrics: OrderedDict[str, _RunMetrics] | None = None
    _metrics_lock = threading.Lock()

    def run_metrics(self, run_id: str, who: Principal, names: set[str] | None = None) -> dict[str, Any]:
        """The run's metric series read so far from its log (all of it unless more than SCAN_LINES lines came
        since the last read: then `complete` is false and the next read goes on)."""
        run = self.get_run(run_id, who)  # (NotFound: not theirs)
        with self._metrics_lock:
            if self._metrics is None:
                self._metrics = OrderedDict()
            state = self._metrics.get(run_id)
            if state is None:
                state = self._metrics[run_id] = _RunMetrics()
                while len(self._metrics) > CACHED:
                    self._metrics.popitem(last=False)
            self._metrics.move_to_end(run_id)
        with state.lock:
            complete = self._read(run_id, state)
            series = [{"name": name, "rank": rank, "attempt": attempt, "points": s.points(),
                       "reported": s.seen, "last": s.last[1] if s.last else None}
                      for (name, rank, attempt), s in sorted(state.series.items())
                      if names is None or name in names]
            ignored, why, dropped, pos = state.ignored, state.why, state.dropped, state.pos
        # Its GPUs as the agents sampled them (the store's series: every 5 s over the last hour, minute means
        # before it, a week at most): steps are seconds since the run started.
        t0 = run.started_at or run.created_at
        for (attempt, rank), samples in sorted(self.gpu_use(run).items()):
            for name, pick in (("gpu/util_pct", 1), ("gpu/mem_used_mb", 2), ("gpu/power_w", 3)):
                pts = [[round(p[0] - t0), float(p[pick]), p[0]] for p in samples if p[pick] is not None]
                if pts and (names is None or name in names):
                    series.append({"name": name, "rank": rank, "attempt": attempt, "points": pts,
                                   "reported": len(pts), "last": pts[-1][1]})
        return {"run_id": run.id, "status": run.status.value, "series": series, "ignored": ignored,
                "ignored_why": why, "dropped": dropped, "read_to": pos, "complete": complete}

    def _read(self, run_id: str, state: _RunMetrics) -> bool:
        scanned = 0
        while scanned < SCAN_LINES:
            rows = self.store.read_logs(run_id, state.pos, WINDOW)
            if not rows:
                return True
            for r in rows:
                got = parse(r.line)
                if got is None:
                    continue
                if got.problem is not None:
                    state.ignored += 1
                    state.why = f"line {r.pos}: {got.problem}"
                    continue
                for name, value in got.values.items():
                    key = (name, r.rank, r.attempt)
                    s = state.series.get(key)
                    if s is None:
                        if len(state.series) >= MAX_SERIES:
                            state.dropped += 1
                            continue
                        s = state.series[key] = _Series()
                    s.add(float(got.step) if got.step is not None else float(s.seen), value, r.ts)
            state.pos = rows[-1].pos
            scanned += len(rows)
            if len(rows) < WINDOW:
                return True
        return False
