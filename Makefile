# The single entry point: `make install`, `make test` (`make test-unit`: the fast part), `make bench`, `make lint` (ruff and the import contracts).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-unit test-load bench lint clean podman k8s redis browser

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0  # the CPU build on disk; a plain `torch` would download GBs
	$(BIN)/pip install --quiet -e '.[test,workloads]'
	$(BIN)/python -m compileall -q fedml_cli scheduler agents runtime  # where PYTHONDONTWRITEBYTECODE is set, no .pyc would ever be written: ~10 % of `fedml launch --dry-run`
	$(BIN)/python -m fedml_cli.entry --write-help-cache  # `fedml --help` prints it: 0.03 s instead of 0.11 s (fedml_cli/entry.py)
	@echo "installed: activate with 'source $(VENV)/bin/activate' (or run $(BIN)/fedml)"

test: k8s redis browser
	$(BIN)/pytest -q -m "not load and not fault" --durations=25

# The fast layer of the pyramid: pure logic, routes in process, the stores (Redis for its half).
test-unit: redis
	$(BIN)/pytest -q -m unit

# Load and fault tests (Redis replicas, SIGKILL loops, a network namespace cut), at a size CI can afford;
# plain `pytest` runs them at full size (1,000 launches).
test-load: redis
	FEDML_LOAD_RUNS=300 $(BIN)/pytest -q -m "load or fault"

# Redis for the Redis store's tests and the replica tests (127.0.0.1:6379, nothing kept on disk, as root: apt),
# iproute2 for the network-namespace test.
redis:
	@command -v redis-server >/dev/null && command -v ip >/dev/null || \
		(apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq redis-server iproute2 >/dev/null)
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || \
		redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null

# Headless Chromium and Firefox for the dashboard's browser tests (Debian's packages, as root: apt; Playwright
# drives Chromium, Mozilla's marionette-driver drives Firefox).
browser:
	@(command -v chromium && command -v firefox-esr) >/dev/null || \
		(apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium firefox-esr fonts-dejavu-core >/dev/null)

# Each script timed (bench/_timed.py), then a table of where the time went and the total (goal: 15 minutes).
TIMED := $(BIN)/python bench/_timed.py --file $(VENV)/bench-times.tsv --
bench: redis
	@rm -f $(VENV)/bench-times.tsv
	$(TIMED) $(BIN)/python bench/cli_startup.py
	$(TIMED) $(BIN)/python bench/launch_latency.py
	$(TIMED) $(BIN)/python bench/log_throughput.py
	$(TIMED) $(BIN)/python bench/placement.py --store sqlite,redis --sizes 1000,10000,100000
	$(TIMED) $(BIN)/python bench/queue_drain.py --nodes 1000 --queued 100,1000 --drain 20 --teams 0,50
	$(TIMED) $(BIN)/python bench/preemption.py --rounds 10 --days 1
	$(TIMED) $(BIN)/python bench/idle_cpu.py --queued 10000 --seconds 10 --rounds 1
	@# Slurm before memory.py: its slurmctld figure needs the packages (e2e_peers and vs_slurm would set it up later)
	$(TIMED) bash bench/peers/slurm-up.sh >/dev/null || echo "Slurm could not be set up: its figures are reported as not measured"
	$(TIMED) $(BIN)/python bench/memory.py --nodes 100000 --queued 100000 --store sqlite --slurm-jobs 5000
	$(TIMED) $(BIN)/python bench/submit_rate.py --nodes 1000 --queued 10000 --seconds 10
	$(TIMED) $(BIN)/python bench/heartbeat.py --nodes 10000 --seconds 10 --paced-seconds 20 --gpus 0,8  # then GPU telemetry on
	$(TIMED) $(BIN)/python bench/heartbeat.py --nodes 10000 --seconds 10 --paced-seconds 20 --store redis
	$(TIMED) $(BIN)/python bench/job_metrics.py --lines 200000
	$(TIMED) $(BIN)/python bench/gpu_series.py --nodes 10000
	$(TIMED) $(BIN)/python bench/e2e_peers.py --jobs 60
	$(TIMED) $(BIN)/python bench/vs_slurm.py --runs 10
	$(TIMED) $(BIN)/python bench/fedavg_round.py
	$(TIMED) $(BIN)/python bench/gateway.py
	$(TIMED) bash scripts/podman-up.sh >/dev/null
	$(TIMED) $(BIN)/python bench/container_start.py
	$(TIMED) $(MAKE) browser
	$(TIMED) $(BIN)/python bench/dashboard.py --seconds 5
	@$(BIN)/python bench/_timed.py --file $(VENV)/bench-times.tsv --summary

# The engine the container tests and bench use: podman serving the Docker Engine API (installs it as root).
podman:
	bash scripts/podman-up.sh

# The Kubernetes control plane the pool tests start: built once from Debian's source package (~7 min on 2 cores,
# as root: apt) and reused from ~/.cache/fedml-k8s. If it cannot be built the tests say why (and fail in CI).
k8s:
	bash scripts/k8s-control-plane.sh build || echo "make k8s: not built; tests/test_kubernetes.py will skip (fail in CI)"

lint:
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache  # the import contracts in pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
