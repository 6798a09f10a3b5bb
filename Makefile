# The README's two commands: `make demo` and `make test`; `make test-fast` is the quick loop (CONTRIBUTING.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install system-deps venv migration bench clean lock

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

# every package of the environment, pinned with its sha256, from requirements.lock (`make lock` writes it
# from pyproject.toml); the project itself is then installed without dependencies
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# rewrites requirements.lock from pyproject.toml (after a dependency changed there): exact versions and hashes
lock: $(STAMP)
	$(VENV)/bin/pip-compile -q --generate-hashes --extra dev --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

# make migration MESSAGE="what changed": the next Alembic revision in node/db/migrations/versions;
# without MESSAGE: rewrites 0001 (only while no later revision exists)
migration: install
	$(PY) -m node.db.revisions $(if $(MESSAGE),new "$(MESSAGE)",regenerate-initial)

clean:
	rm -rf $(VENV) data .bench
