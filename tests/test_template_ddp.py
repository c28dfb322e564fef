"""The train_ddp template end to end: a real head scheduler (`fedml scheduler start`), two real agents
(`fedml login KEY --server URL --node`) on this machine, and `fedml launch job_templates/train_ddp/job.yaml`
running real torch.distributed (gloo over loopback) on both.

Both ranks must log under their rank, the loss must fall, and the two ranks must end with identical weights
(the `weights sha256:` line each prints).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster, start_cluster
from .conftest import ROOT

TEMPLATE = ROOT / "job_templates" / "train_ddp" / "job.yaml"
NODE_NAMES = ("dA", "dB")


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, NODE_NAMES)


def weights_sha256(checkpoint: Path) -> str:
    """What the template prints as `weights sha256:`, recomputed from a saved state_dict: each tensor's
    name, dtype, shape and bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(torch.load(checkpoint, weights_only=True).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


EPOCH = re.compile(r"^epoch (\d+)/(\d+) loss ([0-9.]+)(?: accuracy ([0-9.]+))?$")
HASH = re.compile(r"^weights sha256: ([0-9a-f]{64})$")


def test_train_ddp_template_trains_on_two_nodes_to_identical_weights(two_nodes: Cluster) -> None:
    c = two_nodes
    started = time.monotonic()
    r = c.fedml("launch", str(TEMPLATE), "--json", timeout=90)
    took = time.monotonic() - started
    recs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert r.returncode == 0, (r.stderr, recs)
    run_id = recs[-1]["run_id"]
    assert recs[-1]["status"] == "FINISHED", recs[-1]

    # the run: one placement per rank, on two distinct nodes, both done
    run = c.json("run", "status", run_id)
    assert run["status"] == "FINISHED" and run["num_nodes"] == 2, run
    ps = sorted(run["placements"], key=lambda p: p["rank"])
    assert [p["rank"] for p in ps] == [0, 1], ps
    nodes = {n["id"]: n["name"] for n in c.json("node", "list")}
    assert len({p["node_id"] for p in ps}) == 2 and {nodes[p["node_id"]] for p in ps} == set(NODE_NAMES), ps
    assert all(p["status"] == "FINISHED" and p["exit_code"] == 0 for p in ps), ps

    # the logs, stored per rank
    r = c.fedml("logs", run_id, "--json")
    assert r.returncode == 0, r.stderr
    logs = [x for x in (json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()) if "line" in x]
    by_rank: dict[int, list[str]] = {}
    for x in logs:
        by_rank.setdefault(x["rank"], []).append(x["line"])
    assert set(by_rank) == {0, 1}, logs
    hashes: dict[int, str] = {}
    for rank, lines in by_rank.items():
        assert any(f"rank {rank}/2: backend gloo" in ln for ln in lines), (rank, lines)
        found = [m.group(1) for ln in lines if (m := HASH.match(ln))]
        assert len(found) == 1, (rank, lines)
        hashes[rank] = found[0]
        epochs = [m for ln in lines if (m := EPOCH.match(ln))]
        assert [int(m.group(1)) for m in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) >= 3, lines
        assert all((m.group(4) is not None) == (rank == 0) for m in epochs), lines  # accuracy: rank 0 only
    assert hashes[0] == hashes[1], hashes  # DDP kept the replicas in sync: identical weights

    epochs0 = [m for ln in by_rank[0] if (m := EPOCH.match(ln))]
    losses = [float(m.group(3)) for m in epochs0]
    assert losses[-1] < 0.5 * losses[0] and min(losses) < losses[0], losses
    accuracy = float(epochs0[-1].group(4))
    assert accuracy >= 0.85, by_rank[0]

    # the CLI views: ranks tagged in the plain view, one rank alone with --rank
    r = c.fedml("logs", run_id)
    assert r.returncode == 0, r.stderr
    assert f"[rank 1] weights sha256: {hashes[1]}" in r.stdout.splitlines(), r.stdout
    assert f"[rank 0] weights sha256: {hashes[0]}" in r.stdout.splitlines(), r.stdout
    r = c.fedml("logs", run_id, "--rank", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [x["line"] for x in logs if x["rank"] == 1 and x.get("stream") != "stderr"]
    # rank 0's checkpoint, kept as the run's artifact, holds the very weights both ranks hashed
    assert any(ln.startswith("checkpoint saved to ") for ln in by_rank[0]), by_rank[0]
    dest = c.base / "artifacts"
    r = c.fedml("run", "artifacts", run_id, "--download", str(dest))
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["rank0/model_ddp.pt"]
    assert weights_sha256(dest / "rank0" / "model_ddp.pt") == hashes[0]

    print("\n".join(f"[rank {x['rank']}] {x['line']}" for x in logs))
    print(f"train_ddp: launch took {took:.1f} s, loss {losses[0]} -> {losses[-1]}, accuracy {accuracy}, "
          f"weights sha256 {hashes[0]}")
