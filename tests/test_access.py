"""Who may do what (scheduler/access.py): the rules as a table, without a server."""

from __future__ import annotations

import pytest

from scheduler import access
from scheduler.contract.errors import Conflict, Forbidden
from scheduler.contract.models import AttemptRecord, Node, Placement, Principal, Run, RunStatus

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)

ADMIN = Principal(scope="admin", owner="admin", key_id="k0")
ALICE = Principal(scope="user", owner="alice", key_id="k1")
BOB = Principal(scope="user", owner="bob", key_id="k2")
NODE_A = Principal(scope="node", owner="node-a", key_id="k3")
NODE_B = Principal(scope="node", owner="node-b", key_id="k4")
JOIN = Principal(scope="join", owner="admin", key_id="k5")


def run(**kw: object) -> Run:
    base: dict[str, object] = {"id": "run-1", "name": "r", "job": {"job": "echo"}, "owner": "alice",
                               "status": RunStatus.RUNNING, "placements": [Placement(rank=0, node_id="node-a")]}
    return Run(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("who, sees", [(ADMIN, True), (ALICE, True), (BOB, False), (NODE_A, True), (NODE_B, False),
                                       (JOIN, False)])
def test_a_run_is_seen_by_admins_its_owner_and_its_nodes(who: Principal, sees: bool) -> None:
    assert access.may_see_run(who, run()) is sees


def test_endpoints_are_never_used_with_a_node_key() -> None:
    assert access.may_use_endpoint(ALICE, run()) and not access.may_use_endpoint(NODE_A, run())


@pytest.mark.parametrize("action", ["launch", "list runs", "stop", "upload", "list nodes", "list endpoints", "scale"])
def test_node_keys_act_only_as_their_agent(action: str) -> None:
    with pytest.raises(Forbidden):
        access.require_not_node(NODE_A, action)
    access.require_not_node(ALICE, action)


def test_listing_runs_is_by_owner_except_for_admins() -> None:
    assert access.runs_listed_for(ADMIN) is None and access.runs_listed_for(ALICE) == "alice"


def test_registering_and_removing_nodes() -> None:
    for who in (ADMIN, ALICE, JOIN):
        access.require_may_register(who)
    with pytest.raises(Forbidden):
        access.require_may_register(NODE_A)
    node = Node(id="node-a", name="a")
    access.require_may_remove_node(ADMIN, node)
    access.require_may_remove_node(NODE_A, node)
    for who in (ALICE, NODE_B):
        with pytest.raises(Forbidden):
            access.require_may_remove_node(who, node)


def test_agent_calls_need_that_nodes_key() -> None:
    access.require_acts_for_node(NODE_A, "node-a")
    access.require_acts_for_node(ADMIN, "node-a")
    for who in (NODE_B, ALICE):
        with pytest.raises(Forbidden):
            access.require_acts_for_node(who, "node-a")


def test_log_writers() -> None:
    current = run(attempt=2, attempts=[AttemptRecord(attempt=1, placements=[Placement(rank=0, node_id="node-b")])])
    access.require_log_writer(NODE_A, "run-1", current, 2, logs=True)
    access.require_log_writer(NODE_B, "run-1", current, 1, logs=True)  # attempt 1's late lines, from where it ran
    with pytest.raises(Forbidden):
        access.require_log_writer(NODE_B, "run-1", current, 2, logs=True)  # not placed there now
    with pytest.raises(Forbidden):
        access.require_log_writer(NODE_B, "run-1", current, 1, logs=False)  # artifacts only from the live attempt
    with pytest.raises(Conflict):
        access.require_log_writer(NODE_A, "run-1", current, 1, logs=True)  # attempt 1 never ran on node-a
    with pytest.raises(Forbidden):
        access.require_log_writer(ALICE, "run-1", current, 2, logs=True)
    with pytest.raises(Forbidden):
        access.require_log_writer(NODE_A, "run-9", None, 1, logs=True)
    ended = run(placements=[Placement(rank=0, node_id="node-a", status=RunStatus.FINISHED)])
    with pytest.raises(Conflict):
        access.require_log_writer(NODE_A, "run-1", ended, 1, logs=True)
    lost = run(placements=[Placement(rank=0, node_id="node-a", status=RunStatus.LOST)])
    access.require_log_writer(NODE_A, "run-1", lost, 1, logs=True)  # printed before it was written off
    with pytest.raises(Conflict):
        access.require_log_writer(NODE_A, "run-1", lost, 1, logs=False)
    access.require_log_writer(ADMIN, "run-1", None, None, logs=False)


def test_blobs_are_read_by_uploaders_admins_and_nodes_running_them() -> None:
    def owned(owner: str) -> bool:
        return owner == "alice"

    def placed(node_id: str) -> bool:
        return node_id == "node-a"

    assert [access.may_read_blob(w, owned, placed) for w in (ADMIN, ALICE, BOB, NODE_A, NODE_B)] == \
        [True, True, False, True, False]


def test_every_action_refused_to_nodes_has_its_sentence() -> None:
    """Each `require_not_node(who, "ACTION")` in the scheduler names an action access.py can say (a missing one
    was a KeyError, a 500, where a node key should get a 403)."""
    import re
    from pathlib import Path

    from scheduler import access

    root = Path(access.__file__).parent
    used = {m for f in root.rglob("*.py") for m in re.findall(r'require_not_node\(who, "([^"]+)"', f.read_text())}
    assert used and used <= set(access._NOT_FOR_NODES), used - set(access._NOT_FOR_NODES)
