"""Which process this is in a multi-process run, and how rank 0 shares its decisions.

Every rank runs the same recipe: all calibrate (each on its data shard); rank 0 alone builds the
table, selects, prunes, evaluates and writes; the plan it selected is broadcast so every rank
holds the same one. Ranks are read from the launcher's environment (torchrun/accelerate ``RANK``,
slurm ``SLURM_PROCID``, Lightning's own launcher ``LOCAL_RANK``), so this works before the process
group exists.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue  # a single-task job step (e.g. salloc + python) is not a distributed run
            return int(value)
    return 0


def world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE`` / ``SLURM_NTASKS``), before any process group exists."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 1


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_zero(payload: Any) -> Any:
    """Rank 0's ``payload`` on every rank (unchanged in a single process)."""
    if not distributed():
        return payload
    box = [payload if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group, or ``(0, 1)`` without one."""
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
