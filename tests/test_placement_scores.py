"""Placement scorers (scheduler/placement.py): each in [0, 1], named and weighted, and recorded with the run."""

from __future__ import annotations

import random
import time

import pytest

from scheduler import placement
from scheduler.contract.models import GpuInfo, Node
from scheduler.placement import (
    SCORERS,
    WEIGHTS,
    Candidate,
    Request,
    binpack,
    cheap,
    gpu_matches,
    gpus_exist,
    gpus_free,
    place,
    scores,
)
from scheduler.service import Scheduler

from .test_scheduling import join, sched, submit  # noqa: F401  (the fixture)

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def cand(name: str, total: int, free: int, price: float | None = None) -> Candidate:
    gpus = [GpuInfo(index=i, name="A100") for i in range(total)]
    return Candidate(node=Node(id=f"node-{name}", name=name, gpus=gpus, price_per_gpu_hour=price, last_seen=time.time()),
                     free=gpus[:free], now=time.time(), heartbeat_timeout=30)


def test_binpack_is_one_over_one_plus_the_gpus_left_idle() -> None:
    one = Request(gpus=1)
    assert binpack(one, cand("a", 8, 1)) == 1.0
    assert binpack(one, cand("a", 8, 2)) == 0.5
    assert binpack(one, cand("a", 8, 8)) == pytest.approx(1 / 8)
    assert binpack(Request(), cand("cpu", 0, 0)) == 1.0  # no GPUs to leave idle


def test_cost_halves_at_the_price_scale_and_stays_in_range() -> None:
    assert cheap(Request(), cand("a", 1, 1)) == 1.0
    assert cheap(Request(), cand("a", 1, 1, price=2.0)) == 0.5
    assert 0 < cheap(Request(), cand("a", 1, 1, price=1e9)) < 1e-6


def test_every_scorer_is_named_weighted_and_in_range() -> None:
    rng = random.Random(7)
    assert len({s.name for s in SCORERS}) == len(SCORERS) and all(s.weight > 0 for s in SCORERS)
    for _ in range(500):
        total = rng.randrange(0, 9)
        c = cand("x", total, rng.randrange(0, total + 1), price=rng.choice([None, 0.0, rng.uniform(0, 50)]))
        req = Request(gpus=rng.randrange(0, len(c.free) + 1))
        mean, each = scores(req, c)
        assert set(each) == set(WEIGHTS) and all(0.0 <= v <= 1.0 for v in each.values()) and 0.0 <= mean <= 1.0


def test_the_total_is_the_weighted_mean_of_the_scorers() -> None:
    rng = random.Random(11)
    for _ in range(300):
        total = rng.randrange(0, 9)
        c = cand("x", total, rng.randrange(0, total + 1), price=rng.choice([None, rng.uniform(0, 50)]))
        req = Request(gpus=rng.randrange(0, 3))
        mean, each = scores(req, c)
        assert each == {s.name: round(s.score(req, c), 4) for s in SCORERS}
        assert mean == round(sum(s.weight * each[s.name] for s in SCORERS) / sum(s.weight for s in SCORERS), 4)


NAMES = ["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090",
         "Tesla T4", "NVIDIA L40S"]


def test_gpu_filters_count_only_gpus_of_the_type_and_memory_asked_for() -> None:
    """The filters look at a node's GPUs one by one, through a table of names per wanted type: they must say
    what counting every matching GPU says, for mixed nodes, memory floors and no type at all."""
    rng = random.Random(5)
    for _ in range(2000):
        gpus = [GpuInfo(index=i, name=rng.choice(NAMES), memory_mb=rng.choice([24576, 40960, 81920]))
                for i in range(rng.randrange(0, 9))]
        free = [g for g in gpus if rng.random() < 0.6]
        req = Request(gpus=rng.randrange(1, 5), resource_type=rng.choice([None, "A100", "A100-80G", "H100", "T4", "L4"]),
                      gpu_memory_mb=rng.choice([0, 40960, 81920]))
        c = Candidate(node=Node(id="n", name="n", gpus=gpus), free=free, now=0.0, heartbeat_timeout=30)

        fits = [g.index for g in gpus if gpu_matches(req.resource_type, g.name) and g.memory_mb >= req.gpu_memory_mb]
        fits_free = [g.index for g in free if g.index in fits]
        assert (gpus_exist(req, c) is None) == (len(fits) >= req.gpus), (req, gpus)
        assert (gpus_free(req, c) is None) == (len(fits_free) >= req.gpus), (req, free)
        assert [g.index for g in placement._matching(req, free)] == fits_free


def test_the_gpu_name_tables_stay_bounded() -> None:
    """The wanted types come from users' job files and the names from agents: neither may grow the tables
    without end."""
    for i in range(3 * placement._TABLES_MAX):
        many = [GpuInfo(index=g, name=f"GPU model {i}-{g}") for g in range(40)]
        c = Candidate(node=Node(id="n", name="n", gpus=many), free=many, now=0.0, heartbeat_timeout=30)
        assert gpus_exist(Request(gpus=1, resource_type=f"X{i}"), c) is not None
        assert gpus_exist(Request(gpus=1, resource_type="MODEL"), c) is None
    assert len(placement._NAME_TABLES) <= placement._TABLES_MAX
    assert all(len(t) <= placement._NAMES_MAX for t in placement._NAME_TABLES.values())


def test_packing_wins_and_cost_breaks_ties() -> None:
    req = Request(gpus=1, count=1)
    tight, loose = cand("tight", 8, 1, price=9.0), cand("loose", 8, 4, price=0.5)
    got = place(req, [loose, tight], rng=random.Random(1))
    assert isinstance(got, list) and got[0].node.name == "tight"
    cheap_one, dear_one = cand("cheap", 2, 1, price=1.0), cand("dear", 2, 1, price=9.0)
    got = place(req, [dear_one, cheap_one], rng=random.Random(1))
    assert isinstance(got, list) and got[0].node.name == "cheap"
    assert [s.node_id for s in got[0].runners_up] == ["node-dear"]
    assert got[0].score > got[0].runners_up[0].total and got[0].scores["cost"] > got[0].runners_up[0].scores["cost"]


def test_a_placed_run_records_its_scores(sched: Scheduler) -> None:  # noqa: F811
    join(sched, "a", 2)
    join(sched, "b", 4)
    rid = submit(sched, computing={"minimum_num_gpus": 2})
    assert sched.schedule_pass() == 1
    run = sched.get_run(rid)
    chosen = [s for s in run.scores if s.rank is not None]
    assert [(s.node_id, s.rank) for s in chosen] == [(run.node_id, 0)]
    assert sched.find_node("a").id == run.node_id  # packs: a is left with no idle GPU
    assert {s.node_id for s in run.scores} == {sched.find_node("a").id, sched.find_node("b").id}
    assert all(s.weights == WEIGHTS for s in run.scores)
