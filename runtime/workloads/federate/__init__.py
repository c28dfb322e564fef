"""Federated averaging (FedAvg) for `job_type: federate` runs: a server and N clients that job code imports.

    from runtime.workloads.federate import FedAvgServer, FedAvgClient, FederateConfig

Where it runs. A federate run is one gang of 1+N nodes: rank 0 runs the YAML's `server_job`, ranks 1..N its
`job`. Every rank gets FEDML_CLIENT_RANK (0 = server, 1..N = clients), FEDML_NUM_NODES (1+N), the server's
address FEDML_NODE_0_ADDR (= FEDML_SERVER_ADDR) and a port chosen by the scheduler, FEDML_NODE_0_PORT; the
YAML's `federate: {clients, rounds, min_clients}` arrive as FEDML_ENV_FEDERATE_CLIENTS / _ROUNDS / _MIN_CLIENTS
(`FederateConfig.from_env()` reads them all).

Transport: direct HTTP, no relay. The clients talk straight to the server (not through the scheduler): the
server runs a stdlib `ThreadingHTTPServer` on FEDML_NODE_0_ADDR:FEDML_NODE_0_PORT, the clients use `urllib`.
Model weights travel as `torch.save(state_dict)` bytes (loaded back with `weights_only=True`). No extra
dependencies, and the scheduler never sees model bytes. The price: the client nodes must be able to reach the
server node's address and port (true on one LAN / one machine; across NAT use a VPN or an SSH tunnel).

Protocol (all JSON except the weights):
    GET  /round[?client=k][&after=r&wait=s]
                                     -> {"round": r, "done": bool, "failed": str|null, "clients": N, "rounds": R}
                                        (with `after`, held until a round after r opens or `wait` s pass)
    GET  /weights?round=r            -> the global weights of round r (bytes); 409 when r is not the open round
    POST /update?round=r&client=k&samples=n   body: the client's trained state_dict (bytes)
                                     -> 200 {"accepted": true}; 409 when round r is closed (a late update,
                                        dropped), 400 for a bad client id / body
Server, for r = 1..R: open round r with the current global weights; wait until all N clients posted an update
for r, or `round_timeout` seconds (default 60) passed, or at least min_clients reported and every other
client is known dead (it polled before, then fell silent for `silence_timeout`, default 10 s: clients poll
GET /round?client=k every second from a heartbeat thread, also while they train); with fewer than `min_clients` updates it prints
`round r: only K of N clients reported, fewer than min_clients M`, tells the clients (`failed`) and exits
non-zero; else the new global weights are the average of the updates weighted by their sample counts
(FedAvg), `evaluate(model)` scores them and it prints `round r global accuracy X.XXXX (K clients)`.
After round R: `final accuracy X.XXXX`, the model is saved to $FEDML_ARTIFACT_DIR (kept as the run's
artifact), and the server keeps answering `done` for `linger` seconds (default 3) so clients see it, then
returns 0. A client that dies only makes its rounds proceed with the rest (if they are at least min_clients).

Client: polls GET /round (retrying while the server starts, up to `connect_timeout`, default 60 s); for each
newly opened round it downloads the weights, runs `train(model, round)` on its own data and posts the update;
it stops (returns 0) when the server says done. If the server stops answering for `lost_timeout` seconds
(default 30) or a round does not advance within `round_wait` seconds, it prints why and returns non-zero.
Every wait is bounded.

Run by hand on one machine (one shell for the server, one per client):
    FEDML_NODE_0_ADDR=127.0.0.1 FEDML_NODE_0_PORT=29600 FEDML_ENV_FEDERATE_CLIENTS=3 FEDML_CLIENT_RANK=0 ...

The package: `common` (configuration, weights as bytes, the weighted mean), `server`, `client`.
"""

from .client import FedAvgClient
from .common import FederateConfig, FederateError, bytes_to_state, fedavg, state_to_bytes
from .server import FedAvgServer

__all__ = ["FedAvgClient", "FedAvgServer", "FederateConfig", "FederateError", "bytes_to_state", "fedavg",
           "state_to_bytes"]
