# The one entry point for people: `make demo`, `make test`, `make bench`, `make lint` (`make test-all`: the slow tests too).
# Each target creates .venv and installs what is missing first, so a fresh clone needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all test-fast fuzz node-modules bench lint format soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on this project's machines the CPU wheel lies on disk; elsewhere bring your own
	# CUDA build beforehand (pyproject only asks for torch>=2.4, which an installed torch satisfies).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/agent-workers demo

test: $(STAMP) node-modules
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		echo "note: the browser test is skipped without Chromium: sudo apt-get install chromium chromium-driver"
	@command -v docker-compose >/dev/null 2>&1 || \
		echo "note: the compose check is skipped without docker-compose: sudo apt-get install docker-compose"
	$(PY) -m pytest

# The default run plus the tests of the slow marker (pyproject.toml), which `make test` leaves out: the RabbitMQ runs
# of the README and docs walk-throughs and of the cache and image benchmark parts, whose RabbitMQ paths other tests of
# the default run cover.
test-all: $(STAMP) node-modules
	$(PY) -m pytest -m "slow or not slow"

# The Node.js producer test needs examples/node's modules: installed here when Node is present and they are missing.
node-modules:
	@if command -v npm >/dev/null 2>&1 && [ ! -d examples/node/node_modules/celery-ts ]; then \
		(cd examples/node && npm ci --no-audit --no-fund --loglevel=error); \
	elif ! command -v npm >/dev/null 2>&1; then \
		echo "note: the Node.js producer test is skipped without Node.js (https://nodejs.org, or apt-get install nodejs npm)"; \
	fi

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/fuzz -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

bench: $(STAMP)
	$(VENV)/bin/agent-workers bench

lint: $(STAMP)
	$(VENV)/bin/ruff check agent_workers tasks tests scripts
	$(VENV)/bin/ruff format --check agent_workers tasks tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format agent_workers tasks tests scripts
	$(VENV)/bin/ruff check --fix agent_workers tasks tests scripts

soak: $(STAMP)
	$(VENV)/bin/agent-workers soak

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
