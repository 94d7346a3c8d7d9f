"""Which Lightning strategy runs calibration, and on how many processes.

``strategy``: ``auto`` (one process, or DDP when several were launched), ``ddp`` (every rank holds
the whole model; gradients are averaged over ranks in backward), ``fsdp`` (FSDP2 ``fully_shard``
of every decoder layer through Lightning's ``ModelParallelStrategy``: parameters and gradients are
sharded along dim 0 and statistics are computed from each rank's shard), ``deepspeed`` (ZeRO-3).
On CPU the process group uses gloo. ``devices`` = processes per node; ``auto`` takes the launcher's
``LOCAL_WORLD_SIZE`` (torchrun, accelerate) or ``SLURM_NTASKS_PER_NODE`` (srun), else 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gp_lightning.runtime.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    strategy: Any  # a Lightning strategy object or name
    devices: int
    shards_parameters: bool


def launcher_warning() -> str | None:
    """A known launcher trap: ``accelerate launch --cpu --num_processes N`` starts ONE process."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in os.environ:
        return ("accelerate launch --cpu started a single process (it ignores --num_processes on CPU). For N CPU "
                "processes use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`.")
    return None


def launched_processes_per_node() -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.split("(")[0].isdigit():
            return int(value.split("(")[0])
    return 1


def _forward_only_ddp(backend: str | None) -> Any:
    """DDP's process group and launch, without the wrapper that synchronizes gradients.

    A forward-only method (Wanda) has no parameter that requires grad, which DDP refuses to wrap;
    its statistics are summed over ranks once at the end instead.
    """
    from lightning.pytorch.strategies import DDPStrategy

    class ForwardOnlyDDPStrategy(DDPStrategy):
        def configure_ddp(self) -> None:
            pass

    return ForwardOnlyDDPStrategy(process_group_backend=backend)


def resolve_launch(strategy: str, accelerator: str, devices: int | str, num_nodes: int,
                   forward_only: bool = False, full_checkpoints: bool = False) -> Launch:
    """The strategy to run. ``full_checkpoints``: FSDP checkpoints are gathered into one file on rank 0
    (small ones, such as LoRA adapters) instead of a sharded directory."""
    count = launched_processes_per_node() if devices == "auto" else int(devices)
    if count < 1 or num_nodes < 1:
        raise ConfigError(f"devices={devices} and num_nodes={num_nodes} must be at least 1.")
    world = count * num_nodes
    cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda())
    backend = "gloo" if cpu else None
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single":
        return Launch("auto", 1, False)
    if strategy == "ddp" and forward_only:
        return Launch(_forward_only_ddp(backend), count, False)
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return Launch(DDPStrategy(process_group_backend=backend), count, False)
    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return Launch(ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                            save_distributed_checkpoint=not full_checkpoints,
                                            process_group_backend=backend), count, True)
    raise ConfigError(f"Unknown strategy '{strategy}': use auto, ddp, fsdp or deepspeed.")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
