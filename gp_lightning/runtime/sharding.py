"""Per-decoder-layer activation checkpointing and FSDP2 sharding, shared by calibration and fine-tuning.

Both use the composable APIs, which leave module names, ``state_dict`` keys and eval mode alone, so
statistics, adapters and checkpoints address parameters by the same names as in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def recompute_layers_in_backward(layers: nn.ModuleList) -> None:
    """Keep only each layer's input for backward and recompute the rest: activation memory of about
    one layer instead of all, for roughly a third more compute."""
    from torch.distributed._composable import checkpoint

    for layer in layers:
        checkpoint(layer)


def shard_layers(model: nn.Module, layers: nn.ModuleList, device_mesh: Any, precision: str) -> None:
    """FSDP2 ``fully_shard`` of every decoder layer, then of the root, over the data-parallel mesh.

    bf16 precisions gather and compute layers in bf16 (half the traffic and memory of the float32
    shards); gradients are reduced and accumulated in float32 shards.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.ndim > 1 else device_mesh
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if str(precision).startswith("bf16") else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(local values, global offset of the first local row, global number of rows)``.

    FSDP2 shards parameters (and their gradients) along dim 0 as DTensors; each rank holds a
    contiguous block of rows. Statistics are computed from that local block only, never from an
    all-gathered copy of the weight. A plain tensor is its own local part.
    """
    if is_sharded(tensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), int(offset[0]) if offset else 0, int(tensor.shape[0])
    return tensor, 0, int(tensor.shape[0])


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2-sharded parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)
