#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (what CI runs).
# Two pytest-xdist workers by default, whole files per worker (tests/conftest.py shares the trained
# fixtures between them); ALIGN_TEST_WORKERS=0 runs everything in one process.
# --fast leaves out the tests marked slow (-m "not slow"): the pure-logic and small CLI checks, for
# iterating. Every other argument goes to pytest as it is.
# The lint comes first (ruff, settings in pyproject.toml): a finding stops the run before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! { .venv/bin/ruff format --check . && .venv/bin/ruff check .; }; then
  echo "align: ruff found the problems above; .venv/bin/ruff format . && .venv/bin/ruff check --fix . fixes most" >&2
  exit 1
fi
args=()
for arg in "$@"; do
  if [[ "$arg" == --fast ]]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest -n "${ALIGN_TEST_WORKERS:-2}" --dist loadfile ${args[@]+"${args[@]}"}
