"""What server and clients share: the configuration from the environment, weights as bytes, FedAvg."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

MAX_BODY = 1 << 30  # 1 GiB: no model this is for comes close


class FederateError(RuntimeError):
    """A federated run cannot go on (too few clients, server gone, bad configuration)."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise FederateError(f"{name}={value!r} is not an integer") from None


@dataclass
class FederateConfig:
    """Where the server is and the shape of the run, as the scheduler describes it in the environment."""

    host: str = "127.0.0.1"
    port: int = 0
    rank: int = 0
    clients: int = 1
    rounds: int = 1
    min_clients: int = 1

    @classmethod
    def from_env(cls) -> FederateConfig:
        host = (os.environ.get("FEDML_NODE_0_ADDR") or os.environ.get("FEDML_SERVER_ADDR") or "127.0.0.1").strip()
        port = _env_int("FEDML_NODE_0_PORT")
        if port is None:
            raise FederateError("FEDML_NODE_0_PORT is not set: run this as a `job_type: federate` job, or set "
                                "FEDML_NODE_0_ADDR / FEDML_NODE_0_PORT by hand")
        num_nodes = _env_int("FEDML_NUM_NODES")
        clients = _env_int("FEDML_ENV_FEDERATE_CLIENTS", (num_nodes - 1) if num_nodes else None)
        if clients is None or clients < 1:
            raise FederateError("the number of clients is unknown: set federate.clients in the job YAML "
                                "(FEDML_ENV_FEDERATE_CLIENTS)")
        rounds = _env_int("FEDML_ENV_FEDERATE_ROUNDS", 1) or 1
        min_clients = _env_int("FEDML_ENV_FEDERATE_MIN_CLIENTS", clients) or clients
        rank = _env_int("FEDML_CLIENT_RANK", 0) or 0
        return cls(host=host, port=port, rank=rank, clients=clients, rounds=rounds,
                   min_clients=max(1, min(min_clients, clients)))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# --- weights as bytes ---------------------------------------------------------------------------------------

def state_to_bytes(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def bytes_to_state(data: bytes) -> dict[str, Any]:
    import torch

    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError("not a state_dict")
    return state


def fedavg(updates: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The average of the state_dicts, each weighted by its sample count. Integer tensors (counters such as
    BatchNorm's num_batches_tracked) are taken from the update with the most samples."""
    import torch

    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(max(n, 0) for n, _ in updates))
    weights = [(max(n, 0) / total) if total > 0 else 1.0 / len(updates) for n, _ in updates]
    biggest = max(range(len(updates)), key=lambda i: updates[i][0])
    out: dict[str, Any] = {}
    for key, ref in updates[0][1].items():
        if not torch.is_floating_point(ref):
            out[key] = updates[biggest][1][key].clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for w, (_, state) in zip(weights, updates, strict=True):
            acc += w * state[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out
