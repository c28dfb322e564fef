"""GPU series in the store (issue 17): what writing them costs a scheduler of N nodes x 8 GPUs, and reading them.

In process, over a real store (SQLite on disk, synchronous=FULL; and/or Redis on 127.0.0.1:6379, a key prefix of
its own, wiped afterwards): a minute of points (one every 5 s) for every GPU and for one run rank per node is
buffered as polls buffer them, then one flush_series() writes it (as the scheduler does once a minute) — timed,
as a share of one core over that minute. Then: the series of one GPU over the last hour, of a node over an hour,
and of one GPU over a week of minute means (written for the purpose), each read as the API does.

    .venv/bin/python bench/gpu_series.py [--nodes 10000] [--store sqlite,redis]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402
from scheduler.contract import series as S  # noqa: E402
from scheduler.notify import Notifier  # noqa: E402
from scheduler.service import Scheduler  # noqa: E402
from scheduler.sqlite_store import SQLiteStore  # noqa: E402

GPUS = 8


def measure(kind: str, nodes: int, tmp: Path) -> dict[str, object]:
    if kind == "sqlite":
        store = SQLiteStore(tmp / "series.db")
    else:
        from scheduler.redis_store import RedisStore

        store = RedisStore(f"redis://127.0.0.1:6379/7?prefix=bench-series-{secrets.token_hex(4)}:")
    sched = Scheduler(store, Notifier(), heartbeat_interval=10.0)
    try:
        now = time.time() - 60
        flushes = []
        points = 0
        for minute in range(3):  # (the first flush creates the rows; later ones append to them)
            t0 = now - (2 - minute) * 60
            for i in range(12):
                t = t0 + i * S.SAMPLE_S
                for n in range(nodes):
                    for g in range(GPUS):
                        sched.add_point(S.gpu_key(f"node-{n:06d}", g), (t, 50.0, 40960.0, 300.0, 60.0))
                    sched.add_point(S.run_key(f"run-{n:06d}", 1, 0), (t, 50.0, 40960.0 * GPUS, 2400.0, 60.0))
            t = time.perf_counter()
            points = sched.flush_series(t0 + 60)
            flushes.append(time.perf_counter() - t)
        key = S.gpu_key("node-000000", 0)
        one_hour = _timed(lambda: sched.series(key, now - 3600, now + 60))
        node_hour = _timed(lambda: [sched.series(S.gpu_key("node-000001", g), now - 3600, now + 60)
                                    for g in range(GPUS)])
        week_key = S.gpu_key("node-000002", 0)  # a week of minute means, written hour block by hour block
        week = [(now - 7 * 86400 + 60 * i, 50.0, 1.0, 1.0, 1.0) for i in range(7 * 24 * 60)]
        store.append_series([(week_key, S.COARSE.id, b, S.pack(ps)) for b, ps in _blocks(week).items()], now)
        week_read = _timed(lambda: sched.series(week_key, now - 7 * 86400 + 1, now + 60))
        got = len(sched.series(week_key, now - 7 * 86400 + 1, now + 60))
        return {"store": kind, "nodes": nodes, "series": nodes * (GPUS + 1), "points_per_flush": points,
                "flush_s": round(statistics.median(flushes[1:]), 3),
                "core_share_pct": round(statistics.median(flushes[1:]) / 60 * 100, 2),
                "read_gpu_hour_ms": round(one_hour * 1e3, 2), "read_node_hour_ms": round(node_hour * 1e3, 2),
                "read_gpu_week_ms": round(week_read * 1e3, 2), "week_points": got,
                "bytes_per_gpu_week": 7 * 24 * 60 * 20 + 3600 // 5 * 20}
    finally:
        if kind == "redis":
            store.wipe()  # type: ignore[attr-defined]
        store.close()


def _blocks(points: list[S.Point]) -> dict[int, list[S.Point]]:
    out: dict[int, list[S.Point]] = {}
    for p in points:
        out.setdefault(S.block_of(S.COARSE, p[0]), []).append(p)
    return out


def _timed(fn: object, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--store", default="sqlite,redis")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.store.split(","):
            r = measure(kind, args.nodes, Path(tmp))
            results.append(r)
            print(f"{kind:6s} {r['nodes']} nodes x {GPUS} GPUs ({r['series']} series): a minute of points "
                  f"({r['points_per_flush']}) written in {r['flush_s']} s = {r['core_share_pct']} % of a core; "
                  f"read: a GPU's hour {r['read_gpu_hour_ms']} ms, a node's hour {r['read_node_hour_ms']} ms, "
                  f"a GPU's week ({r['week_points']} points) {r['read_gpu_week_ms']} ms")
    emit("gpu_series", {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
