#!/bin/bash
# Mistral-7B, one node x 8 GPUs, FSDP calibration: one srun task per GPU.
#
#   mkdir -p logs && sbatch slurm/prune_mistral.sh        (Slurm opens the --output log before this script runs)
#
# Lightning's SLURMEnvironment reads rank and world size from srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS),
# so --ntasks-per-node must equal --devices. Every task sees all 8 GPUs and Lightning picks cuda:<SLURM_LOCALID>:
# do not add --gpus-per-task=1 / --gpu-bind=single, which would leave each task only "cuda:0".
#
# Requeue / resume: with --requeue, Slurm puts the job back in the queue after a preemption or a node failure and
# re-runs this script under the SAME job id, with SLURM_RESTART_COUNT incremented. The output directory is named
# after the job id, so the restarted job finds its own run directory; --checkpoint_every N made the first attempt
# save the accumulated statistics every N batches, and --resume (passed below whenever SLURM_RESTART_COUNT > 0)
# continues from the last saved batch instead of refusing the existing directory. A job that hit its --time limit
# is NOT requeued by Slurm; continue it (or any old job) by hand in a new job:
#   OUTPUT=runs/mistral-7b-<old job id> RESUME=1 sbatch slurm/prune_mistral.sh
# Do not add --signal=SIGUSR1@...: Lightning's SLURM auto-requeue would then save a whole Trainer checkpoint
# (model included) and requeue by itself, next to this script's own resume logic.
#SBATCH --job-name=gp-prune-mistral-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=480G
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
# --mem: every rank may load the whole model on the host before it is sharded (7.2B x 4 bytes float32 = 29 GB x 8).
# --open-mode=append: a requeued attempt appends to the same log instead of truncating it.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs runs

# --- environment (adapt to the cluster) -----------------------------------------------------------------------------
# module purge
# module load cuda/12.4 nccl/2.21
# shellcheck disable=SC1091
source "${VENV:-.venv}/bin/activate"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"   # on a shared filesystem: download once, read from every node
# export HF_HUB_OFFLINE=1                               # after a first download: no hub calls from 8 ranks at once
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
export TOKENIZERS_PARALLELISM=false
export PYTHONFAULTHANDLER=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1                # a failed collective kills the job instead of hanging it
# export NCCL_DEBUG=INFO                                # NCCL topology / transport in the log
# export NCCL_P2P_DISABLE=1                             # only if peer-to-peer between GPUs of the node misbehaves

# --- run ------------------------------------------------------------------------------------------------------------
OUTPUT="${OUTPUT:-runs/mistral-7b-${SLURM_JOB_ID:-local}}"
RESUME_ARGS=()   # expanded as ${RESUME_ARGS[@]+...}: an empty array is 'unbound' under set -u in bash < 4.4
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 || "${RESUME:-0}" == 1 ]]; then
    RESUME_ARGS=(--resume)
    echo "Resuming ${OUTPUT} (restart ${SLURM_RESTART_COUNT:-0})"
fi
# configs/mistral-7b.yaml: 64 windows, batch 4 = 2 batches per rank on 8 GPUs, so checkpoint after every batch.
# Taylor's resumable state is the float32 gradient sum itself (|w * sum g| is taken at the end), ~29 GB in all.
srun python prune.py --config configs/mistral-7b.yaml --strategy fsdp --devices 8 --num_nodes 1 \
    --output "${OUTPUT}" --checkpoint_every 1 ${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"}
