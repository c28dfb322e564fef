"""FedAvg round overhead (issue 4): time per round minus client compute time, for a ~1M-parameter model and
3 clients, against the real runtime/workloads/federate/ server and clients over loopback HTTP.

One FedAvgServer in this process (127.0.0.1, a free port the OS picks) and 3 FedAvgClient subprocesses. Each
client's train() is real compute: STEPS SGD steps (batch 64) on random data, timed with perf_counter. The model is
Linear(1000,1000) -> ReLU -> Linear(1000,10) (1,011,010 parameters, 4.0 MB as float32). torch.set_num_threads(1)
everywhere. Round 1 is a warm-up (it includes the clients' start-up and first connection) and is reported apart.

Per measured round, at the server: round time = serialising the global weights -> aggregated weights loaded
(the `evaluate` hook fires right after load_state_dict(fedavg(...))); overhead = round time - max client compute.
The critical path (the client whose update arrived last) is split into: open -> its GET /weights (polling
latency), the download + load, compute, serialise + POST + the server's validation, and aggregation.
Also timed alone: fedavg() of 3 state_dicts, and one state_dict <-> bytes round trip.

    .venv/bin/python bench/fedavg_round.py [--rounds 5] [--steps 10] [--poll-interval 0.2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import runtime.workloads.federate as fed  # noqa: E402
import runtime.workloads.federate.server as fed_server  # noqa: E402  (the name its rounds call, patched below)

CLIENTS = 3
BATCH = 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))


# --- client subprocess --------------------------------------------------------------------------------------

class TimedClient(fed.FedAvgClient):
    """The real client; only records when its /weights and /update requests start and end."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.marks: dict[int, dict[str, float]] = {}

    def _mark(self, path: str, key: str) -> None:
        q = dict(p.split("=", 1) for p in path.split("?", 1)[1].split("&"))
        self.marks.setdefault(int(q["round"]), {})[key] = time.monotonic()

    def _get(self, path: str, timeout: float | None = None) -> tuple[int, bytes]:
        if path.startswith("/weights"):
            self._mark(path, "get_start")
            out = super()._get(path, timeout)
            self._mark(path, "get_end")
            return out
        return super()._get(path, timeout)

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._mark(path, "post_start")  # after state_to_bytes: serialisation is train_end -> post_start
        out = super()._post(path, body)
        self._mark(path, "post_end")
        return out


def client_main(rank: int, port: int, steps: int, poll_interval: float) -> int:
    torch.set_num_threads(1)
    model = make_model()
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(BATCH, 1000, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(steps)]
    compute: dict[int, tuple[float, float, float]] = {}

    def train(m: nn.Module, r: int) -> None:
        t0, p0 = time.monotonic(), time.perf_counter()
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        compute[r] = (t0, time.monotonic(), time.perf_counter() - p0)

    c = TimedClient(model, train, rank=rank, num_samples=100 * rank, server_url=f"http://127.0.0.1:{port}",
                    poll_interval=poll_interval)
    rc = c.run()
    rec = {r: {**c.marks.get(r, {}), "train_start": s, "train_end": e, "compute_s": d}
           for r, (s, e, d) in compute.items()}
    print("BENCH_CLIENT " + json.dumps({"rank": rank, "rc": rc, "rounds": rec}), flush=True)
    return rc


# --- server (this process) ----------------------------------------------------------------------------------

class TimedServer(fed.FedAvgServer):
    """The real server; starts the client subprocesses once bound, records when each update is accepted."""

    def __init__(self, *a: Any, spawn: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.spawn = spawn
        self.procs: list[subprocess.Popen[str]] = []
        self.accepted: dict[int, dict[int, float]] = {}

    def _bind(self) -> Any:
        httpd = super()._bind()
        self.procs = self.spawn(self.port)
        return httpd

    def _accept(self, r: int, client: int, samples: int, body: bytes) -> tuple[int, str]:
        code, msg = super()._accept(r, client, samples, body)
        if code == 200:
            self.accepted.setdefault(r, {})[client] = time.monotonic()
        return code, msg


def aggregation_alone(model: nn.Module, reps: int = 5) -> dict[str, float]:
    states = []
    for k in range(CLIENTS):
        g = torch.Generator().manual_seed(100 + k)
        states.append((100 * (k + 1), {n: v + 0.01 * torch.randn(v.shape, generator=g)
                                       for n, v in model.state_dict().items()}))
    blobs = [fed.state_to_bytes(s) for _, s in states]

    def med(f: Any) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return {
        "fedavg_3_s": med(lambda: fed.fedavg(states)),
        "serialize_s": med(lambda: fed.state_to_bytes(states[0][1])),
        "deserialize_s": med(lambda: fed.bytes_to_state(blobs[0])),
        "server_aggregate_s": med(lambda: model.load_state_dict(
            fed.fedavg([(n, fed.bytes_to_state(b)) for (n, _), b in zip(states, blobs, strict=True)]))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (plus 1 warm-up)")
    ap.add_argument("--steps", type=int, default=10, help="SGD steps per client per round")
    ap.add_argument("--poll-interval", type=float, default=0.2, help="clients' GET /round interval (default: "
                    "FedAvgClient's own, 0.2 s)")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        return client_main(a.client, a.port, a.steps, a.poll_interval)

    torch.set_num_threads(1)
    model = make_model()
    params = sum(p.numel() for p in model.parameters())
    size_mb = len(fed.state_to_bytes(model.state_dict())) / 1e6

    opened: dict[int, tuple[float, float]] = {}  # round -> (serialise start, open)
    aggregated: dict[int, float] = {}
    real_to_bytes = fed.state_to_bytes
    round_no = [0]

    def to_bytes(state: dict[str, Any]) -> bytes:  # in this process only _rounds() calls it: a round opens
        t = time.monotonic()
        out = real_to_bytes(state)
        round_no[0] += 1
        opened[round_no[0]] = (t, time.monotonic())
        return out

    def evaluate(_m: nn.Module) -> float:
        aggregated[len(aggregated) + 1] = time.monotonic()
        return 0.0

    def spawn(port: int) -> list[subprocess.Popen[str]]:
        return [subprocess.Popen([sys.executable, __file__, "--client", str(k), "--port", str(port),
                                  "--steps", str(a.steps), "--poll-interval", str(a.poll_interval)],
                                 stdout=subprocess.PIPE, text=True) for k in range(1, CLIENTS + 1)]

    total_rounds = a.rounds + 1
    server = TimedServer(model, clients=CLIENTS, rounds=total_rounds, evaluate=evaluate, host="127.0.0.1",
                         port=0, round_timeout=30.0, linger=0.5, spawn=spawn)
    fed_server.state_to_bytes = to_bytes  # the server module's own name: patching the package's missed it
    t0 = time.monotonic()
    try:
        rc = server.run()
    finally:
        fed_server.state_to_bytes = real_to_bytes
        outs = []
        for p in server.procs:
            try:
                out, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            outs.append(out)
    wall = time.monotonic() - t0
    clients = {}
    for out in outs:
        for line in out.splitlines():
            if line.startswith("BENCH_CLIENT "):
                d = json.loads(line[len("BENCH_CLIENT "):])
                clients[d["rank"]] = {int(r): v for r, v in d["rounds"].items()}
    if rc != 0 or len(clients) != CLIENTS:
        print(f"bench: server rc={rc}, {len(clients)} of {CLIENTS} clients reported", file=sys.stderr)
        return 1

    rows = []
    print(f"\nmodel: {params:,} parameters, {size_mb:.2f} MB as torch.save bytes; {CLIENTS} clients, "
          f"{a.steps} SGD steps (batch {BATCH}) each per round, poll interval {a.poll_interval:g} s")
    print(f"{'round':>5} {'round_s':>8} {'max_comp':>8} {'overhead':>8} | critical path: {'ser':>5} {'poll':>5} "
          f"{'get+ld':>6} {'comp':>5} {'ser+post':>8} {'agg':>5}")
    for r in range(1, total_rounds + 1):
        ser0, open_t = opened[r]
        agg_t = aggregated[r]
        round_s = agg_t - ser0
        comp = {k: clients[k][r]["compute_s"] for k in clients}
        last = max(server.accepted[r], key=lambda k: server.accepted[r][k])
        c = clients[last][r]
        row = {
            "round": r, "warmup": r == 1, "round_s": round_s, "max_compute_s": max(comp.values()),
            "overhead_s": round_s - max(comp.values()),
            "compute_s": {str(k): v for k, v in comp.items()},
            "path": {"client": last, "serialize_global_s": open_t - ser0,
                     "poll_wait_s": c["get_start"] - open_t,
                     "download_load_s": c["train_start"] - c["get_start"],
                     "compute_s": c["compute_s"], "compute_wall_s": c["train_end"] - c["train_start"],
                     "serialize_post_s": server.accepted[r][last] - c["train_end"],
                     "aggregate_s": agg_t - server.accepted[r][last]},
            "poll_wait_by_client_s": {str(k): clients[k][r]["get_start"] - open_t for k in clients},
        }
        rows.append(row)
        p = row["path"]
        print(f"{r:>5} {round_s:8.3f} {row['max_compute_s']:8.3f} {row['overhead_s']:8.3f} | client {last}:    "
              f"{p['serialize_global_s']:5.3f} {p['poll_wait_s']:5.3f} {p['download_load_s']:6.3f} "
              f"{p['compute_wall_s']:5.3f} {p['serialize_post_s']:8.3f} {p['aggregate_s']:5.3f}"
              + ("   (warm-up: includes client start-up)" if r == 1 else ""))

    alone = aggregation_alone(model)
    meas = [row for row in rows if not row["warmup"]]
    ov = [row["overhead_s"] for row in meas]

    def med(key: str) -> float:
        return statistics.median(row["path"][key] for row in meas)

    polls = [v for row in meas for v in row["poll_wait_by_client_s"].values()]
    summary = {
        "bench": "fedavg_round", "params": params, "model_mb": round(size_mb, 3), "clients": CLIENTS,
        "rounds": a.rounds, "steps": a.steps, "poll_interval_s": a.poll_interval, "threads": 1,
        "round_s_median": statistics.median(row["round_s"] for row in meas),
        "max_compute_s_median": statistics.median(row["max_compute_s"] for row in meas),
        "overhead_s_median": statistics.median(ov), "overhead_s_max": max(ov),
        "critical_path_median_s": {k: med(k) for k in ("serialize_global_s", "poll_wait_s", "download_load_s",
                                                       "serialize_post_s", "aggregate_s")},
        "poll_wait_all_clients_s": {"median": statistics.median(polls), "max": max(polls)},
        "alone": alone, "wall_s": wall,
    }
    summary = json.loads(json.dumps(summary), parse_float=lambda s: round(float(s), 4))
    print(f"\noverhead per round (round - max client compute): median {summary['overhead_s_median']:.3f} s, "
          f"max {summary['overhead_s_max']:.3f} s over {a.rounds} rounds")
    print(f"aggregation alone: fedavg() of 3 state_dicts {alone['fedavg_3_s'] * 1e3:.1f} ms; "
          f"server side (3 x bytes->state + fedavg + load) {alone['server_aggregate_s'] * 1e3:.1f} ms; "
          f"state->bytes {alone['serialize_s'] * 1e3:.1f} ms, bytes->state {alone['deserialize_s'] * 1e3:.1f} ms")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
