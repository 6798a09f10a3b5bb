#!/usr/bin/env bash
# Lint, format check and type check, from the venv (make install puts the dev extra there).
# Runs all three and exits non-zero if any of them failed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
rc=0
echo "== ruff check"
"$VENV/bin/ruff" check --output-format concise . || rc=1
echo "== ruff format --check"
"$VENV/bin/ruff" format --check --output-format concise . || rc=1
echo "== mypy node models"
"$VENV/bin/mypy" node models || rc=1
exit "$rc"
