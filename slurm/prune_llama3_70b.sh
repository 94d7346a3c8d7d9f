#!/bin/bash
# Llama-3-70B, 4 nodes x 8 GPUs = 32 ranks, FSDP calibration: one srun task per GPU.
#
#   mkdir -p logs && sbatch slurm/prune_llama3_70b.sh       (Slurm opens the --output log before this script runs)
#
# Before the first submission, download the gated checkpoint (~141 GB) once into the shared HF_HOME from a login
# node: huggingface-cli login && huggingface-cli download meta-llama/Meta-Llama-3-70B
#
# Lightning's SLURMEnvironment takes global rank, local rank and world size from srun (SLURM_PROCID, SLURM_LOCALID,
# SLURM_NTASKS); --ntasks-per-node must equal --devices (Lightning checks) and --nodes must equal --num_nodes (not
# checked: a mismatch gives ranks a wrong world size and the rendezvous hangs). MASTER_ADDR / MASTER_PORT below
# are the rendezvous of torch.distributed (Lightning's SLURMEnvironment uses them when set, else derives the same
# host from SLURM_NODELIST; exporting them makes the choice explicit and visible in the log).
#
# Per-GPU memory of the calibration step: bench/results/memory_table.md (python bench/memory_table.py).
# Requeue / resume: as in slurm/prune_mistral.sh (same job id after a requeue -> same output directory -> --resume).
#SBATCH --job-name=gp-prune-llama3-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=06:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
# --mem=0: all of each node's memory. If every rank materializes the whole model on the host before sharding,
# 8 ranks x 70.6B x 4 bytes (float32 under bf16-mixed) = 2.3 TB per node: the loader must not do that for 70B.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs runs

# --- environment (adapt to the cluster) -----------------------------------------------------------------------------
# module purge
# module load cuda/12.4 nccl/2.21
# shellcheck disable=SC1091
source "${VENV:-.venv}/bin/activate"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"   # must be on a filesystem every node reads
# export HF_HUB_OFFLINE=1                               # after the download: no hub calls from 32 ranks at once
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
export TOKENIZERS_PARALLELISM=false
export PYTHONFAULTHANDLER=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1                # a failed collective kills the job instead of hanging it
# export NCCL_DEBUG=INFO                                # NCCL topology / transport in the log
# export NCCL_SOCKET_IFNAME=ib0                         # the inter-node interface, if NCCL picks the wrong one
# export NCCL_IB_HCA=mlx5                               # InfiniBand adapters to use

# --- rendezvous -----------------------------------------------------------------------------------------------------
# pipefail off inside: head exits after one line, and scontrol may then die of SIGPIPE (status 141), killing the job
MASTER_ADDR="$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
if [[ -z "${MASTER_ADDR}" ]]; then
    echo "error: no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'" >&2
    exit 1
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"   # per job, so two jobs on one node do not collide
export MASTER_ADDR MASTER_PORT
echo "nodes=${SLURM_JOB_NODELIST} master=${MASTER_ADDR}:${MASTER_PORT} tasks=${SLURM_NTASKS:-?}" \
    "restart=${SLURM_RESTART_COUNT:-0}"

# --- run ------------------------------------------------------------------------------------------------------------
OUTPUT="${OUTPUT:-runs/llama3-70b-${SLURM_JOB_ID}}"
RESUME_ARGS=()   # expanded as ${RESUME_ARGS[@]+...}: an empty array is 'unbound' under set -u in bash < 4.4
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 || "${RESUME:-0}" == 1 ]]; then
    RESUME_ARGS=(--resume)
    echo "Resuming ${OUTPUT}"
fi
# One task per GPU on every node (the #SBATCH geometry); --kill-on-bad-exit ends all ranks when one fails.
# checkpoint_every comes from the config (4 batches; 256 windows / 32 ranks = 8 batches per rank).
srun --ntasks-per-node=8 --kill-on-bad-exit=1 \
    python prune.py --config configs/llama3-70b.yaml --strategy fsdp --devices 8 --num_nodes 4 \
    --output "${OUTPUT}" ${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"}
