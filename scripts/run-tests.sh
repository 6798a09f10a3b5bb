#!/usr/bin/env bash
# Runs the whole test suite. pytest's "no tests collected" (exit 5) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1
.venv/bin/python -m pytest tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi
exit "$rc"
