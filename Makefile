# The README's two commands: `make demo` and `make test`; `make test-fast` is the quick loop (CONTRIBUTING.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install system-deps venv migration bench clean

demo: install
	$(VENV)/bin/msknode demo

test: install
	bash scripts/run-tests.sh

# the unit tests only (markers in pyproject.toml): no servers, no subprocesses, no training
test-fast: install
	TCP_NODELAY=1 $(PY) -m pytest tests -q -m "not integration and not slow"

install: system-deps $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# make migration MESSAGE="what changed": the next Alembic revision in node/db/migrations/versions;
# without MESSAGE: rewrites 0001 (only while no later revision exists)
migration: install
	$(PY) -m node.db.revisions $(if $(MESSAGE),new "$(MESSAGE)",regenerate-initial)

clean:
	rm -rf $(VENV) data .bench
