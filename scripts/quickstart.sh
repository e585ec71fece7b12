#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the quickstart recipe, the demo task end to end on
# a tiny model (demo data -> tiny model -> sft -> eval -> rm -> rs -> sft -> eval -> rs pairs ->
# dpo -> eval -> rlhf -> eval), ending with the table of each stage's key metric. A rerun skips
# every stage that is up to date. Extra arguments go to `align run` (e.g. --workdir DIR, --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/align run configs/recipes/quickstart.yaml "$@"
