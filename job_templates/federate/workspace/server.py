"""The federate template's server (rank 0): FedAvg over the clients' updates, scored on the held-out split.

Prints `round r global accuracy X.XXXX (K clients)` after every round and `final accuracy X.XXXX` at the end;
the final model goes to $FEDML_ARTIFACT_DIR/model_federate.pt (the run's artifact).

    python3 server.py [--round-timeout 60]
By hand: FEDML_NODE_0_ADDR=127.0.0.1 FEDML_NODE_0_PORT=29600 FEDML_ENV_FEDERATE_CLIENTS=3 \
         FEDML_ENV_FEDERATE_ROUNDS=5 python3 server.py
"""

from __future__ import annotations

import argparse
import sys

import common

from runtime.workloads.federate import FedAvgServer, FederateError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--round-timeout", type=float, default=common.env_float("FEDERATE_ROUND_TIMEOUT", 60.0),
                   help="seconds to wait for the clients' updates each round (default 60)")
    args = p.parse_args()
    model = common.make_model()
    x, y = common.test_data()
    try:
        server = FedAvgServer.from_env(model, evaluate=lambda m: common.accuracy(m, x, y),
                                       round_timeout=args.round_timeout)
    except FederateError as e:
        print(f"federate server: {e}", file=sys.stderr)
        return 2
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
