# The single entry point: `make install`, `make test`, `make bench`, `make lint`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test bench lint clean podman k8s

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0  # the CPU build on disk; a plain `torch` would download GBs
	$(BIN)/pip install --quiet -e '.[test,workloads]'
	@echo "installed: activate with 'source $(VENV)/bin/activate' (or run $(BIN)/fedml)"

test: k8s
	$(BIN)/pytest -q

bench:
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/launch_latency.py
	$(BIN)/python bench/log_throughput.py
	$(BIN)/python bench/placement.py
	$(BIN)/python bench/heartbeat.py
	$(BIN)/python bench/fedavg_round.py
	$(BIN)/python bench/gateway.py
	bash scripts/podman-up.sh >/dev/null && $(BIN)/python bench/container_start.py

# The engine the container tests and bench use: podman serving the Docker Engine API (installs it as root).
podman:
	bash scripts/podman-up.sh

# The Kubernetes control plane the pool tests start: built once from Debian's source package (~7 min on 2 cores,
# as root: apt) and reused from ~/.cache/fedml-k8s. If it cannot be built the tests say why (and fail in CI).
k8s:
	bash scripts/k8s-control-plane.sh build || echo "make k8s: not built; tests/test_kubernetes.py will skip (fail in CI)"

lint:
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
