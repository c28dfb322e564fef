"""Who may do what: every authorization rule of the scheduler, in one place (docs/security.md has the model).

Principals: admin keys, user keys (`owner` is the user), node keys (`owner` is the node id) and join tokens (they
only register nodes). `may_*` answer a question; `require_*` raise Forbidden with the sentence the caller sees.
Routes, the service and the gateway ask here; none of them decides on its own. Pure: no store, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from .contract.errors import Conflict, Forbidden
from .contract.models import Node, Principal, Run, RunStatus

# What a node key is refused, by action: it acts only as its agent.
_NOT_FOR_NODES = {
    "launch": "a node key cannot launch runs",
    "list runs": "a node key cannot list runs",
    "stop": "a node key cannot stop runs",
    "upload": "a node key cannot upload workspaces",
    "list nodes": "a node key cannot list nodes",
    "list endpoints": "a node key cannot list endpoints",
    "scale": "a node key cannot scale endpoints",
    "list clusters": "a node key cannot list clusters",
    "read clusters": "a node key cannot read clusters",
    "use storage": "a node key has no storage (its runs get theirs through `storage:` in the job)",
    "read node GPU series": "a node key cannot read the nodes' GPU series",
}


def require_not_node(who: Principal, action: str) -> None:
    if who.scope == "node":
        raise Forbidden(_NOT_FOR_NODES[action])


def is_person(who: Principal) -> bool:
    """An admin or a user, not a node's key or a join token: who may sign in to the dashboard (and make a
    sign-in link)."""
    return who.scope in ("admin", "user")


def may_read_metrics(who: Principal) -> bool:
    """GET /metrics (Prometheus): an admin, or a metrics key (which reads nothing else: routes/deps.identify)."""
    return who.admin or who.scope == "metrics"


def require_may_read_webhook_secret(who: Principal, owner: str) -> None:
    """A person reads their own webhook signing secret; an admin anyone's."""
    if not is_person(who):
        raise Forbidden("only an admin or user key has a webhook secret")
    if owner != who.owner and not who.admin:
        raise Forbidden("only an admin reads another owner's webhook secret (or a team's)")


def may_see_team(who: Principal, team: str) -> bool:
    """Admins see every team; a person the team their key belongs to. (Others are told there is no such team.)"""
    return who.admin or (is_person(who) and who.team == team)


def require_admin(who: Principal, why: str = "this needs an admin key") -> None:
    if not who.admin:
        raise Forbidden(why)


def may_see_run(who: Principal, run: Run) -> bool:
    """Admins see every run, a user their own, a node those placed on it. (Refused as 'not found': a run's
    existence is not told to whoever may not see it.)"""
    if who.admin:
        return True
    if who.scope == "node":
        return run.placement_on(who.owner) is not None
    return run.owner == who.owner


def may_use_endpoint(who: Principal, run: Run) -> bool:
    """Inference through the gateway: whoever may see the endpoint's run, but never a node key."""
    return who.scope != "node" and may_see_run(who, run)


def runs_listed_for(who: Principal) -> str | None:
    """The owner whose runs `who` lists (None: everyone's)."""
    require_not_node(who, "list runs")
    return None if who.admin else who.owner


def require_may_register(who: Principal) -> None:
    if who.scope not in ("admin", "user", "join"):
        raise Forbidden("this key cannot register nodes")


def require_may_remove_node(who: Principal, node: Node) -> None:
    if not who.admin and not (who.scope == "node" and who.owner == node.id):
        raise Forbidden("only an admin key (or the node itself) can remove a node")


def require_acts_for_node(who: Principal, node_id: str) -> None:
    """The agent side (poll, reports): a node key for that very node (or an admin, e.g. tools and tests)."""
    if who.scope == "node" and who.owner != node_id:
        raise Forbidden("a node key acts only for its own node")
    if who.scope == "user":
        raise Forbidden("agents use their node key")


def require_log_writer(who: Principal, run_id: str, run: Run | None, attempt: int | None, *, logs: bool) -> None:
    """Logs and artifacts are written only by the node of a live placement of the run's current attempt (an admin
    may too, e.g. tests and tools). A finished rank, a superseded attempt, another node: refused. Log lines of a
    rank declared LOST are still taken while its attempt is current: they were printed before the node was
    written off, and can change nothing. Lines an earlier attempt printed before it was fenced are kept, under
    that attempt: only the node it ran on may send them, and its guard has killed it, so they are bounded."""
    if who.admin:
        return
    if who.scope != "node":
        raise Forbidden("agents use their node key")
    p = run.placement_on(who.owner) if run is not None else None
    earlier = run is not None and logs and attempt is not None and attempt < run.attempt \
        and run.ran_on(attempt, who.owner)
    if run is not None and p is None and logs and attempt is not None and run.ran_on(attempt, who.owner):
        return  # an earlier attempt's lines, from the node it ran on (the run is elsewhere now, or queued)
    if run is None or p is None:
        raise Forbidden(f"run {run_id} is not placed on this node")
    if attempt is not None and attempt != run.attempt:
        if earlier:
            return
        raise Conflict(f"run {run_id} is on attempt {run.attempt}; attempt {attempt} was superseded")
    if p.done and not (logs and p.status == RunStatus.LOST):
        raise Conflict(f"run {run_id} has ended on this node ({p.status.value}); nothing more is kept")


def may_read_blob(who: Principal, owned_by: Callable[[str], bool], placed_here: Callable[[str], bool]) -> bool:
    """A blob is visible to the principals that uploaded its bytes and to admins (the caller checks it exists),
    and to a node while a run that uses it is placed there. Content addressing must not let one user fetch, or
    learn of, another's workspace by its hash."""
    if who.admin:
        return True
    if who.scope == "node":
        return placed_here(who.owner)
    return owned_by(who.owner)
