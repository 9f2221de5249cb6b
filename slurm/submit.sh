#!/usr/bin/env bash
# sbatch wrapper: creates slurm-logs/ (sbatch cannot: a missing --output
# directory makes the job fail without a log), then submits.
#   slurm/submit.sh [sbatch options] slurm/train-multi-node.sbatch RECIPE [overrides]
set -euo pipefail
mkdir -p slurm-logs
exec sbatch "$@"
