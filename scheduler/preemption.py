"""Which running runs to stop so that a waiting one fits (docs/teams.md: preemption). Pure: the scheduler
(scheduler/service/preempting.py) says who may be stopped, in which order it would rather stop them, and what
each would free; this module picks the set.

The rules, after Kueue's: stop the fewest runs, and among as few, the lowest in priority and the youngest; a run
is stopped whole (a gang frees its GPUs on every node at once), never half of it. A waiting run asking for one
node looks node by node for the node that needs the fewest victims (a victim also frees what it holds elsewhere,
which does not help it); a gang adds victims in order until enough nodes would fit it (also starting from each of
the first few, one at a time), then drops each victim it turns out not to need, and keeps the cheapest set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Victim:
    """A running run the waiting one may stop, as the choice needs it."""

    run_id: str
    priority: int
    started: float  # when its attempt was placed: the youngest goes first among equals
    freed: dict[str, int] = field(default_factory=dict)  # node -> GPUs it frees there that the waiting run could use
    quota_gpus: int = 0  # GPUs it frees of the waiting run's own quota (a run of the same team and quota)
    team: str | None = None

    def order(self) -> tuple[int, float, str]:
        """The order victims are taken in: lowest priority, then youngest."""
        return (self.priority, -self.started, self.run_id)


@dataclass(frozen=True, slots=True)
class Need:
    """What the waiting run lacks: `nodes` nodes with `gpus` GPUs it can use on each, and, when it waits for its
    team's quota, `quota` more GPUs of that quota (0: the quota is not what it waits for)."""

    gpus: int
    nodes: int = 1
    quota: int = 0


Allowed = Callable[[Victim, Sequence[Victim]], bool]
SEEDS = 32  # a gang's choice starts from each of this many victims (the cost grows with their square)


def _fits(need: Need, free: dict[str, int], chosen: Sequence[Victim]) -> bool:
    if need.quota and sum(v.quota_gpus for v in chosen) < need.quota:
        return False
    extra: dict[str, int] = {}
    for v in chosen:
        for node, n in v.freed.items():
            extra[node] = extra.get(node, 0) + n
    nodes = set(free) | set(extra)
    return sum(1 for node in nodes if free.get(node, 0) + extra.get(node, 0) >= need.gpus) >= need.nodes


def _cost(chosen: Sequence[Victim]) -> tuple[int, int, float]:
    """Fewer victims, then lower priorities, then younger."""
    return (len(chosen), sum(v.priority for v in chosen), -sum(v.started for v in chosen))


def _minimal(need: Need, free: dict[str, int], chosen: list[Victim]) -> list[Victim]:
    """`chosen` without each victim it fits without (the last added was needed: it made the set fit). Taking a
    victim out never breaks `allowed` (a team gives back less)."""
    for v in list(chosen[:-1]):
        trial = [x for x in chosen if x is not v]
        if _fits(need, free, trial):
            chosen = trial
    return chosen


def _greedy(need: Need, free: dict[str, int], victims: Sequence[Victim], allowed: Allowed) -> list[Victim] | None:
    chosen: list[Victim] = []
    for v in victims:
        if not allowed(v, chosen):
            continue
        chosen.append(v)
        if _fits(need, free, chosen):
            return _minimal(need, free, chosen)
    return None


def choose(need: Need, free: dict[str, int], victims: Sequence[Victim],
           allowed: Allowed = lambda v, chosen: True) -> list[Victim] | None:
    """The runs to stop so that `need` fits, or None when stopping every allowed victim would not do.

    `free`: the GPUs the waiting run could use that are free now, per node it could run on (held nodes left out);
    `victims`: the runs it may stop (their `freed` counts only nodes it could run on); `allowed(v, chosen)`:
    whether `v` may join those chosen so far (a team lends back no more than it borrowed)."""
    if _fits(need, free, []):
        return []
    ordered = sorted(victims, key=Victim.order)
    if need.nodes > 1:
        # In order; and each of the first SEEDS victims first, then in order (a gang victim alone may free
        # what several single ones would): the cheapest of those.
        tries = [_greedy(need, free, ordered, allowed)] + \
            [_greedy(need, free, [seed, *(x for x in ordered if x is not seed)], allowed) for seed in ordered[:SEEDS]]
        found = [t for t in tries if t is not None]
        return min(found, key=_cost) if found else None
    best: list[Victim] | None = None
    # One node: the node that needs the fewest victims. The victims on it in order; then, if its quota is still
    # short, others that give back quota (wherever they run).
    for node in sorted({n for v in ordered for n in v.freed}):
        here = [v for v in ordered if node in v.freed]
        rest = [v for v in ordered if node not in v.freed and v.quota_gpus]
        got = _greedy(Need(need.gpus, 1, need.quota), {node: free.get(node, 0)}, here + rest, allowed)
        if got is not None and (best is None or _cost(got) < _cost(best)):
            best = got
    if need.quota:  # and where GPUs are free already: only the quota is short there
        got = _greedy(need, free, [v for v in ordered if v.quota_gpus], allowed)
        if got is not None and (best is None or _cost(got) < _cost(best)):
            best = got
    return best
