#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (what CI runs).
# Two pytest-xdist workers by default, whole files per worker (tests/conftest.py shares the trained
# fixtures between them); ALIGN_TEST_WORKERS=0 runs everything in one process.
# --fast leaves out the tests marked slow (-m "not slow"): the pure-logic and small CLI checks, for
# iterating. Every other argument goes to pytest as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
for arg in "$@"; do
  if [[ "$arg" == --fast ]]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest -n "${ALIGN_TEST_WORKERS:-2}" --dist loadfile ${args[@]+"${args[@]}"}
