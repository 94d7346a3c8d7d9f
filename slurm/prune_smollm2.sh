#!/bin/bash
# Single-node pruning job (one process). Multi-GPU / multi-node scripts come with distributed calibration.
#SBATCH --job-name=gp-prune-smollm2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs
# shellcheck disable=SC1091
source .venv/bin/activate
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
srun python prune.py --config configs/smollm2-135m.yaml --output "runs/smollm2-${SLURM_JOB_ID:-local}"
