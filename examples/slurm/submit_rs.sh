#!/bin/bash
# Sharded rejection sampling on Slurm: N array tasks (at most M at once), then the merge.
#   examples/slurm/submit_rs.sh 16 4        (from the root of your clone)
# MODEL, PROMPTS, PARTS and OUT pass through to both jobs (see rs_array.sbatch, rs_merge.sbatch).
# Rerunning this script after a failure resubmits everything; finished parts are no-ops.
set -euo pipefail
N=${1:?usage: submit_rs.sh N_PARTS [MAX_AT_ONCE]}
M=${2:-$N}
here=$(dirname "$0")
array=$(sbatch --parsable --array="0-$((N - 1))%$M" "$here/rs_array.sbatch")
merge=$(sbatch --parsable --dependency="afterok:$array" --export="ALL,N=$N" "$here/rs_merge.sbatch")
echo "submitted array job $array ($N parts) and merge job $merge"
