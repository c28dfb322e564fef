"""The autoscaler's arithmetic and its load integral, fast (tests/test_serve.py drives it end to end)."""

from __future__ import annotations

import pytest

from scheduler import gateway
from scheduler.gateway import Load, wanted_replicas

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


@pytest.mark.parametrize("now,up,down,want", [
    (1, 9.0, None, 3),      # 9 in flight at 4 per replica: 3 at once
    (3, 9.0, 9.0, 3),       # steady
    (3, 2.0, 2.0, 1),       # the whole long window wanted one: down to 1
    (3, 2.0, None, 3),      # not enough history to scale down
    (3, 0.0, 0.0, 1),       # idle: one replica stays
    (1, 100.0, None, 5),    # capped at max_replicas
    (5, 1.0, 1.0, 2),       # floored at min_replicas
])
def test_scale_up_at_once_down_only_over_the_long_window_within_bounds(now: int, up: float | None,
                                                                       down: float | None, want: int) -> None:
    lo = 2 if now == 5 else 1
    assert wanted_replicas(now, up, down, 4.0, lo, 5) == want


def test_load_is_requests_in_flight_integrated_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: clock[0])
    load = Load()
    load.sample()
    for _ in range(3):
        load.enter()  # 3 requests in flight for 10 s
    clock[0] += 10
    load.sample()
    assert load.average(10) == pytest.approx(3.0)
    for _ in range(3):
        load.leave()
    clock[0] += 10
    load.sample()
    assert load.average(20) == pytest.approx(1.5)  # 3 for half of it, none for the other half
    assert load.average(100) is None  # not that much history
