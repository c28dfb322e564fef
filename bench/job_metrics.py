"""Job metrics ingest (issue 17): how fast the scheduler reads a run's metrics out of its stored log
(scheduler/service/metrics.py), against reading the same number of plain log lines, in one process over a real
SQLite store.

A run's log holds LINES lines, a share of them FEDML_METRIC lines of 3 values each (as `fedml.log` prints them);
the first `GET /runs/ID/metrics` parses them all (timed), a second one after BATCH more lines parses only those.

    .venv/bin/python bench/job_metrics.py [--lines 200000] [--share 0.5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402
from scheduler.contract.metrics import line  # noqa: E402
from scheduler.contract.models import Principal, Run  # noqa: E402
from scheduler.notify import Notifier  # noqa: E402
from scheduler.service import Scheduler  # noqa: E402
from scheduler.sqlite_store import SQLiteStore  # noqa: E402

BATCH = 5000
WHO = Principal(scope="user", owner="alice", key_id="bench")


def fill(s: Scheduler, run_id: str, n: int, share: float, start: int = 0) -> None:
    rng = random.Random(start)
    lines = []
    for i in range(start, start + n):
        text = line({"loss": 1.0 / (i + 1), "acc": rng.random(), "lr": 0.001}, step=i) if rng.random() < share \
            else f"epoch {i // 100} batch {i % 100}: a plain log line of ordinary length"
        lines.append((float(i), "stdout", text))
    for k in range(0, n, BATCH):
        s.store.append_logs(run_id, 1, 0, start + k, lines[k:k + BATCH])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--share", type=float, default=0.5, help="of the lines, FEDML_METRIC ones (default 0.5)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = Scheduler(SQLiteStore(Path(tmp) / "s.db"), Notifier(), rng=random.Random(1))
        out = {}
        for label, share in (("plain", 0.0), ("metrics", a.share)):
            run = s.store.create_run(Run(id=f"run-{label}", name=label, job={"job": "x"}, owner="alice"))
            fill(s, run.id, a.lines, share)
            t = time.perf_counter()
            got = s.run_metrics(run.id, WHO)
            first = time.perf_counter() - t
            fill(s, run.id, BATCH, share, start=a.lines)
            t = time.perf_counter()
            s.run_metrics(run.id, WHO)
            again = time.perf_counter() - t
            points = sum(x["reported"] for x in got["series"])
            out[label] = {"lines": a.lines, "first_read_s": first, "lines_per_s": a.lines / first,
                          "values": points, "values_per_s": points / first, "next_batch_ms": again * 1e3}
            print(f"{label:>7}: {a.lines:,} log lines ({share:.0%} metric lines) read in {first:.2f} s = "
                  f"{a.lines / first:,.0f} lines/s, {points:,} values ({points / first:,.0f}/s); the next "
                  f"{BATCH:,} lines {again * 1e3:.0f} ms", flush=True)
        emit("job_metrics", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
