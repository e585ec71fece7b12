#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (what CI runs).
# Two pytest-xdist workers by default, whole files per worker (tests/conftest.py shares the trained
# fixtures between them); ALIGN_TEST_WORKERS=0 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${ALIGN_TEST_WORKERS:-2}" --dist loadfile "$@"
