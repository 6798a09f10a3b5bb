#!/usr/bin/env bash
# Runs the whole test suite. pytest's "no tests collected" (exit 5) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1
# lint (ruff), format check and types (mypy) first; the tests run either way
bash scripts/lint.sh
lint=$?
.venv/bin/python -m pytest tests --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi
if [ "$rc" -eq 0 ] && [ "$lint" -ne 0 ]; then echo "error: scripts/lint.sh failed (see above)"; exit 1; fi
exit "$rc"
