"""The federate template's client (ranks 1..N): local SGD on this client's non-IID shard each round.

    python3 client.py [--epochs 3] [--lr 0.1] [--round-delay 0]
By hand: FEDML_NODE_0_ADDR=127.0.0.1 FEDML_NODE_0_PORT=29600 FEDML_ENV_FEDERATE_CLIENTS=3 \
         FEDML_CLIENT_RANK=1 python3 client.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import common

from runtime.workloads.federate import FedAvgClient, FederateConfig, FederateError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=int(common.env_float("FEDERATE_LOCAL_EPOCHS", 3)),
                   help="local epochs per round (default 3)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--round-delay", type=float, default=common.env_float("FEDERATE_ROUND_DELAY", 0.0),
                   help="seconds to sleep before each round's training (simulates a slower client; default 0)")
    args = p.parse_args()
    try:
        cfg = FederateConfig.from_env()
        if not 1 <= cfg.rank <= cfg.clients:
            raise FederateError(f"FEDML_CLIENT_RANK={cfg.rank}: a client's rank is 1..{cfg.clients}")
    except FederateError as e:
        print(f"federate client: {e}", file=sys.stderr)
        return 2
    x, y = common.client_data(cfg.rank, cfg.clients)
    counts = Counter(int(v) for v in y)
    print(f"client {cfg.rank}: {len(y)} samples, per class {dict(sorted(counts.items()))}", flush=True)

    def train(model: object, r: int) -> str:
        if args.round_delay > 0:
            time.sleep(args.round_delay)
        loss = common.train(model, x, y, epochs=args.epochs, lr=args.lr, seed=1000 * cfg.rank + r)  # type: ignore[arg-type]
        return f"local loss {loss:.4f}"

    client = FedAvgClient(common.make_model(), train, rank=cfg.rank, num_samples=len(y), server_url=cfg.url)
    return client.run()


if __name__ == "__main__":
    sys.exit(main())
