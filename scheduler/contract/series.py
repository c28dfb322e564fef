"""GPU series as the store keeps them: bounded, downsampled, appended in blocks (issue 17).

Two tiers per series: FINE, a point every SAMPLE_S (5 s) kept an hour, and COARSE, the mean of each minute kept a
week. A tier is cut into blocks (FINE: 10 minutes, COARSE: an hour); a store appends packed points to a block
(SQLite: `doc || ?` on one row; Redis: APPEND to one key, which expires with its block) and drops blocks past the
tier's keep. A block holds at most block/step points (120 or 60 of 20 bytes), so an append rewrites little.

Series keys: `gpu:NODE:INDEX` (every GPU of every node) and `run:RUN:ATTEMPT:RANK` (a rank's GPUs together:
mean utilisation, memory summed). A point is (time, utilisation %, memory used MB, power W, temperature C); a
value the sample did not have is NaN, returned as None.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SAMPLE_S = 5.0  # a point per series at most this often (agents poll more often than they sample)
FLUSH_S = 60.0  # points wait in the scheduler's memory at most this long before they are written (soft state)


@dataclass(frozen=True)
class Tier:
    id: int
    step: float  # seconds between points
    block: int  # seconds per block
    keep: int  # seconds a block is kept after its end


FINE = Tier(0, SAMPLE_S, 600, 3600)
COARSE = Tier(1, 60.0, 3600, 7 * 24 * 3600)
TIERS = (FINE, COARSE)

_POINT = struct.Struct("<Iffff")  # time (s), util, mem used MB, power W, temperature C
Point = tuple[float, float | None, float | None, float | None, float | None]
FIELDS = ("util_pct", "mem_used_mb", "power_w", "temp_c")


def gpu_key(node_id: str, index: int) -> str:
    return f"gpu:{node_id}:{index}"


def run_key(run_id: str, attempt: int, rank: int) -> str:
    return f"run:{run_id}:{attempt}:{rank}"


def _v(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


@functools.lru_cache(maxsize=256)
def _points(n: int) -> struct.Struct:
    return struct.Struct("<" + "Iffff" * n)


_F32_MAX = 3.4e38


def _f32(x: float | None) -> float:
    """A value as a point stores it: missing, or past what a float32 holds (a node's samples are bounded when
    they come, but a point must never make a whole flush fail), as NaN."""
    return x if x is not None and -_F32_MAX < x < _F32_MAX else math.nan


def pack(points: Sequence[Point]) -> bytes:
    flat: list[float] = []
    for t, u, m, p, c in points:
        flat += (int(t), _f32(u), _f32(m), _f32(p), _f32(c))
    return _points(len(points)).pack(*flat) if len(points) <= 256 else b"".join(
        pack(points[i:i + 256]) for i in range(0, len(points), 256))


def unpack(data: bytes) -> list[Point]:
    usable = len(data) - len(data) % _POINT.size  # (a torn tail, if a store ever kept one, is left out)
    return [(float(t), _v(u), _v(m), _v(p), _v(c)) for t, u, m, p, c in _POINT.iter_unpack(data[:usable])]


def block_of(tier: Tier, t: float) -> int:
    return int(t // tier.block)


def expired_before(tier: Tier, now: float) -> int:
    """Blocks of `tier` numbered below this are past their keep."""
    return int((now - tier.keep) // tier.block)


def _mean(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def coarse(points: Sequence[Point]) -> list[Point]:
    """The mean of each minute of `points` (in time order), stamped at the minute's start."""
    out: list[Point] = []
    step = COARSE.step
    i, n = 0, len(points)
    while i < n:
        minute = int(points[i][0] // step)
        j = i + 1
        while j < n and int(points[j][0] // step) == minute:
            j += 1
        cols = list(zip(*points[i:j], strict=True))
        out.append((minute * step, _mean(cols[1]), _mean(cols[2]), _mean(cols[3]), _mean(cols[4])))
        i = j
    return out


def rows(buffered: dict[str, list[Point]]) -> list[tuple[str, int, int, bytes]]:
    """What a flush appends: (key, tier, block, packed points) for each key's buffered points (time order)."""
    out = []
    for key, points in buffered.items():
        for tier, pts in ((FINE, points), (COARSE, coarse(points))):
            first, last = block_of(tier, pts[0][0]), block_of(tier, pts[-1][0])
            if first == last:  # (nearly always: a flush holds a minute)
                out.append((key, tier.id, first, pack(pts)))
                continue
            by_block: dict[int, list[Point]] = {}
            for p in pts:
                by_block.setdefault(block_of(tier, p[0]), []).append(p)
            out += [(key, tier.id, block, pack(ps)) for block, ps in by_block.items()]
    return out


def read_plan(since: float, now: float) -> list[tuple[Tier, range]]:
    """The blocks to read for points from `since` to `now`: COARSE up to where FINE still holds everything,
    FINE after."""
    fine_from = max(since, now - FINE.keep)
    plan = []
    if since < fine_from:
        plan.append((COARSE, range(block_of(COARSE, since), block_of(COARSE, fine_from) + 1)))
    plan.append((FINE, range(block_of(FINE, fine_from), block_of(FINE, now) + 1)))
    return plan


def merge(since: float, now: float, coarse_pts: list[Point], fine_pts: list[Point]) -> list[Point]:
    """One series from `since`: minute means before the last hour, then every point of the last hour (a point
    written twice, by a flush retried after a failed write, is read once)."""
    fine_from = max(since, now - FINE.keep)
    once = {p[0]: p for p in coarse_pts if since <= p[0] < fine_from}
    fine = {p[0]: p for p in fine_pts if p[0] >= fine_from}
    return [once[t] for t in sorted(once)] + [fine[t] for t in sorted(fine)]
