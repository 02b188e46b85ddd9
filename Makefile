# The two commands of the README: `make dev` runs Conveyor, `make test` runs the suite.
# Both work on a fresh clone: they create .venv and install the project first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test cluster cluster-preflight soak lint format bench-dispatch bench-concurrency bench-events bench-provider-limits bench-fairness bench-retention bench-cpu bench-work bench-reads bench-latency migrate clean

$(STAMP): pyproject.toml app/web/package-lock.json tests/node_reader/package-lock.json
	tools/require npm
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The dashboard's socket.io-client, from the npm registry (not committed).
	cd app/web && npm ci --no-audit --no-fund --loglevel=error
	# The tests' independent reader of card PNGs: the chunk packages SillyTavern uses.
	cd tests/node_reader && npm ci --no-audit --no-fund --loglevel=error
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/python -m devtools.dev

# The browser tests drive a real Chromium: Debian's, installed here where it is missing and the
# user may install packages, else Playwright's own download (tools/require says which).
test: $(STAMP)
	tools/require chromium rabbitmq-server compose-schema prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# No cache: a cached graph has kept a deleted import alive and failed a clean tree.
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest
	# The job lifecycle again with RabbitMQ as the broker (a private node; docs/brokers.md).
	CONVEYOR_TEST_BROKER=rabbitmq $(BIN)/python -m pytest -q \
		tests/integration/test_lifecycle.py tests/integration/test_brokers.py

# Several hosts on this machine: network namespaces on a private bridge, two web replicas
# behind HAProxy, three worker hosts (docs/cluster.md). Needs root and iproute2's `ip`; not part
# of `make test`, whose collection leaves tests/cluster out unless CONVEYOR_CLUSTER_TESTS=1.
cluster: cluster-preflight $(STAMP)
	tools/require haproxy
	CONVEYOR_CLUSTER_TESTS=1 $(BIN)/python -m pytest -q -s tests/cluster

# One line that says why it cannot run here, before anything is installed.
cluster-preflight:
	@[ "$$(id -u)" = 0 ] || { echo "make cluster: needs root (it creates network namespaces and a bridge); run it as root"; exit 1; }
	@command -v ip >/dev/null 2>&1 || { echo "make cluster: needs iproute2's ip: run 'sudo apt-get install iproute2'"; exit 1; }
	@command -v unshare >/dev/null 2>&1 || { echo "make cluster: needs util-linux's unshare: run 'sudo apt-get install util-linux'"; exit 1; }

# Thousands of jobs with random faults and worker kills; not part of `make test`.
soak: $(STAMP)
	$(BIN)/python -m tests.chaos.soak

lint: $(STAMP)
	$(BIN)/ruff check .
	# No cache: a cached graph has kept a deleted import alive and failed a clean tree.
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: $(STAMP)
	$(BIN)/python -m app.migrate

bench-dispatch: $(STAMP)
	$(BIN)/python -m bench.dispatch

bench-concurrency: $(STAMP)
	$(BIN)/python -m bench.concurrency

bench-events: $(STAMP)
	$(BIN)/python -m bench.events

bench-provider-limits: $(STAMP)
	$(BIN)/python -m bench.provider_limits

bench-fairness: $(STAMP)
	$(BIN)/python -m bench.fairness

bench-retention: $(STAMP)
	$(BIN)/python -m bench.retention

bench-cpu: $(STAMP)
	$(BIN)/python -m bench.cpu

bench-work: $(STAMP)
	$(BIN)/python -m bench.work

bench-reads: $(STAMP)
	$(BIN)/python -m bench.reads

bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
