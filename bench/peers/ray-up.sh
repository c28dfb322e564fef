#!/usr/bin/env bash
# Ray (Jobs API) as a peer for bench/e2e_peers.py only (never a project dependency): installed from PyPI into
# its own venv outside the repo, and a head started on loopback. Idempotent.
#   bash bench/peers/ray-up.sh            # prints the venv's python on the last line
set -euo pipefail
VENV="${FEDML_BENCH_RAY_VENV:-$HOME/.cache/fedml-bench/ray-venv}"
if [ ! -x "$VENV/bin/ray" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet 'ray[default]'
fi
if ! "$VENV/bin/ray" status --address 127.0.0.1:6380 >/dev/null 2>&1; then
    # Port 6380: 6379 is the Redis the tests use. The dashboard (8265) serves the Jobs API.
    "$VENV/bin/ray" start --head --node-ip-address 127.0.0.1 --port 6380 --dashboard-host 127.0.0.1 \
        --dashboard-port 8265 --num-cpus 2 --include-dashboard true --disable-usage-stats >/dev/null
fi
echo "ray: head up at 127.0.0.1:6380, Jobs API at http://127.0.0.1:8265 ($("$VENV/bin/ray" --version))"
echo "$VENV/bin/python"
