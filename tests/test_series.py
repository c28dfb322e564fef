"""GPU series (scheduler/contract/series.py): packing, minute means, blocks, and what a read merges. Pure."""

from __future__ import annotations

import math

import pytest

from scheduler.contract import series as S

pytestmark = pytest.mark.unit


def test_points_pack_to_20_bytes_and_back_with_missing_values_as_none() -> None:
    pts = [(1000.7, 55.0, 2048.0, None, 41.0), (1005.0, None, None, 300.5, None)]
    data = S.pack(pts)
    assert len(data) == 40
    assert S.unpack(data) == [(1000.0, 55.0, 2048.0, None, 41.0), (1005.0, None, None, 300.5, None)]
    assert S.unpack(data + b"\x01\x02") == S.unpack(data)  # a torn tail is left out


def test_minute_means_ignore_missing_values_and_start_at_the_minute() -> None:
    pts = [(120.0 + 5 * i, float(i), None, 100.0, None) for i in range(12)] + [(180.0, 50.0, 1.0, None, None)]
    got = S.coarse(pts)
    assert got[0] == (120.0, 5.5, None, 100.0, None)
    assert got[1] == (180.0, 50.0, 1.0, None, None)


def test_a_flush_appends_each_key_to_its_blocks_of_both_tiers() -> None:
    pts = [(590.0, 1.0, 1.0, 1.0, 1.0), (595.0, 3.0, 1.0, 1.0, 1.0), (600.0, 5.0, 1.0, 1.0, 1.0)]
    rows = S.rows({"gpu:n:0": pts})
    fine = {(b, len(d) // 20) for k, t, b, d in rows if t == S.FINE.id}
    coarse = [(b, S.unpack(d)) for k, t, b, d in rows if t == S.COARSE.id]
    assert fine == {(0, 2), (1, 1)}  # 10-minute blocks: 590 and 595 in block 0, 600 in block 1
    assert coarse == [(0, [(540.0, 2.0, 1.0, 1.0, 1.0), (600.0, 5.0, 1.0, 1.0, 1.0)])]  # hour block 0


def test_a_read_takes_minute_means_before_the_last_hour_and_every_point_after() -> None:
    now = 10 * 3600.0
    plan = S.read_plan(now - 3 * 3600, now)
    assert [(t.id, r.start, r.stop) for t, r in plan] == [(1, 7, 10), (0, 54, 61)]
    assert S.read_plan(now - 600, now) == [(S.FINE, range(59, 61))]
    coarse = [(now - 7200.0, 1.0, None, None, None), (now - 1800.0, 9.0, None, None, None)]
    fine = [(now - 1800.0, 2.0, None, None, None), (now - 10.0, 3.0, None, None, None)]
    got = S.merge(now - 3 * 3600, now, coarse, fine)
    assert [p[1] for p in got] == [1.0, 2.0, 3.0]  # no minute mean where every point is kept


def test_blocks_expire_after_their_tier_keeps_them() -> None:
    now = 100 * 86400.0
    assert S.expired_before(S.FINE, now) == math.floor((now - 3600) / 600)
    assert S.expired_before(S.COARSE, now) == math.floor((now - 7 * 86400) / 3600)


def test_the_scheduler_buffers_a_point_per_5_s_and_keeps_them_when_a_flush_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scheduler.notify import Notifier
    from scheduler.service import Scheduler
    from scheduler.sqlite_store import SQLiteStore

    sched = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0)
    now = 1_000_000.0
    key = S.gpu_key("node-1", 0)
    assert sched.add_point(key, (now, 10.0, 1.0, None, None))
    assert not sched.add_point(key, (now + 1, 20.0, 1.0, None, None))  # polls come faster than samples
    assert sched.add_point(key, (now + 5, 30.0, 1.0, None, None))
    real = sched.store.append_series

    def full(rows, at):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    sched.store.append_series = full  # type: ignore[method-assign]
    with pytest.raises(OSError):
        sched.flush_series(now + 6)
    sched.store.append_series = real  # type: ignore[method-assign]
    assert sched.add_point(key, (now + 10, 40.0, 1.0, None, None))
    assert sched.flush_series(now + 11) == 3  # the two kept back, then the new one
    assert [p[1] for p in sched.series(key, now - 1, now + 12)] == [10.0, 30.0, 40.0]
    assert sched.series(key, now - 1, now + 12) == S.unpack(sched.store.read_series(key, S.FINE.id, range(1666, 1668)))


def test_a_flush_that_fails_half_way_writes_the_rest_later_and_each_point_is_read_once(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from scheduler.notify import Notifier
    from scheduler.service import Scheduler, core
    from scheduler.sqlite_store import SQLiteStore

    monkeypatch.setattr(core, "SERIES_WRITE", 3)  # rows per write: a flush of 4 series is 3 writes of 8 rows
    sched = Scheduler(SQLiteStore(tmp_path / "s.db"), Notifier(), heartbeat_interval=1.0)
    now = 1_000_000.0
    keys = [S.gpu_key("node-1", g) for g in range(4)]
    for k in keys:
        sched.add_point(k, (now, 10.0, None, None, None))
    real, calls = sched.store.append_series, []

    def second_fails(rows, at):  # type: ignore[no-untyped-def]
        calls.append(len(rows))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(rows, at)

    sched.store.append_series = second_fails  # type: ignore[method-assign]
    with pytest.raises(OSError):
        sched.flush_series(now + 1)
    assert sched.flush_series(now + 2) > 0
    for k in keys:
        assert sched.series(k, now - 1, now + 3) == [(now, 10.0, None, None, None)], k


def test_a_value_past_a_float32_is_kept_as_missing_and_never_fails_a_flush() -> None:
    """A flush packs a minute of every GPU's points at once: one value no float32 holds raised, and the flush, which
    keeps what it did not write, failed again every minute (found by tests/test_fuzz.py)."""
    pts = [(1000.0, 1e300, math.inf, -1e39, 41.0), (1005.0, math.nan, 3.3e38, -3.3e38, None)]
    got = S.unpack(S.pack(pts))
    assert got[0] == (1000.0, None, None, None, 41.0)
    assert got[1][:2] == (1005.0, None) and got[1][2] == pytest.approx(3.3e38, rel=1e-6) and got[1][4] is None
