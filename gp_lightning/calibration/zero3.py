"""DeepSpeed ZeRO-3 calibration: statistics from each rank's partition of every flattened parameter.

Lightning's DeepSpeed strategy refuses CPU ranks, and DeepSpeed's gradients are not in ``.grad``
(ZeRO partitions them), so this path drives the DeepSpeed engine directly: forward and
``engine.backward`` over the rank's shard of windows, never ``step()``. With gradient accumulation
set to the number of batches, ZeRO-3 reduce-scatters every backward pass into float32 gradient
partitions that accumulate; at the end ``safe_get_local_grad`` returns this rank's partition of
the full-set gradient. ZeRO-3 partitions a parameter as a flat 1-D slice, so each element's unit is
found from its flat index (row = index // columns); the per-unit partial sums are all-reduced once.
As with DDP, DeepSpeed averages gradients over ranks, so the loss is multiplied by the world size.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.calibration.module import window_loss_sums
from gp_lightning.calibration.units import UnitImportance, UnitParameter, unit_parameters
from gp_lightning.data.windows import rank_shard
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import CalibrationError


def _flat_units(item: UnitParameter, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Unit index of each element of the flat slice ``[start, start + count)`` of ``item``'s parameter."""
    shape = tuple(item.param.ds_shape)
    flat = torch.arange(start, start + count, device=device)
    if len(shape) == 1:
        return flat // (shape[0] // item.units)
    rows, cols = shape
    if item.axis == 0:
        return (flat // cols) // (rows // item.units)
    return (flat % cols) // (cols // item.units)


def _local_sums(item: UnitParameter, values: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-unit partial sums of this rank's partition (padding at the end of the last partition dropped)."""
    partition = item.param.ds_tensor.numel()
    start = rank * partition
    count = max(0, min(partition, item.param.ds_numel - start))
    units = _flat_units(item, start, count, values.device)
    return torch.zeros(item.units, dtype=torch.float64, device=values.device).index_add_(
        0, units, values[:count].double())


def zero3_calibration(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int, method: str,
                      accelerator: str = "auto", progress: bool = True) -> UnitImportance:
    """Taylor or Wanda importance under DeepSpeed ZeRO-3; every rank returns the complete result."""
    if method not in ("taylor", "wanda"):
        raise CalibrationError(f"strategy: deepspeed supports importance_method taylor and wanda, not {method}.")
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import safe_get_local_grad

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    indices, weights = rank_shard(windows.shape[0], rank, world)
    steps = math.ceil(len(indices) / batch_size)
    items = list(unit_parameters(model, layout))
    projections = list(dict.fromkeys(item.module for item in items))  # model order: the same on every rank
    wanted = {id(item.param) for item in items} if method == "taylor" else set()
    for param in model.parameters():
        param.requires_grad_(id(param) in wanted)
        if param.dtype != torch.float32:
            raise CalibrationError("strategy: deepspeed needs float32 parameters here (precision 32-true or bf16-mixed).")
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": steps,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0) if wanted else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    device = next(iter(engine.parameters())).device
    norms: dict[nn.Module, torch.Tensor] = {}
    tokens = torch.zeros(1, dtype=torch.float64, device=device)
    hooks = []
    current: dict[str, torch.Tensor] = {}
    if method == "wanda":
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            squares = torch.einsum("b,btf->f", current["weights"].double(), x.square())
            norms[module] = norms[module] + squares if module in norms else squares

        hooks = [m.register_forward_pre_hook(hook) for m in projections]
    total = windows[:, 1:].numel()
    engine.eval()
    for step in tqdm(range(steps), desc=f"Calibration (ZeRO-3, rank {rank})", disable=not progress or rank != 0):
        batch = indices[step * batch_size : (step + 1) * batch_size]
        ids, w = windows[batch].to(device), weights[step * batch_size : (step + 1) * batch_size].to(device)
        current["weights"] = w
        if method == "wanda":
            with torch.no_grad():
                engine(input_ids=ids, use_cache=False)
            tokens += w.double().sum() * ids.shape[1]
        else:
            loss = (window_loss_sums(engine, ids) * w).sum() * world / total
            engine.backward(loss, scale_wrt_gas=False)
    for handle in hooks:
        handle.remove()
    feature_norms: dict[nn.Module, torch.Tensor] = {}
    if method == "wanda":  # one collective for the token count and every projection's input sums
        flat = torch.cat([tokens] + [norms[m] for m in projections])
        dist.all_reduce(flat)
        tokens, start = flat[:1], 1
        for m in projections:
            feature_norms[m] = flat[start : start + norms[m].numel()].sqrt()
            start += norms[m].numel()
    result = UnitImportance({}, {}, sharded=True)
    for item in items:
        weight = item.param.ds_tensor.detach().float().reshape(-1)
        if method == "taylor":
            grad = safe_get_local_grad(item.param)
            if grad is None:
                raise CalibrationError(f"DeepSpeed returned no gradient partition for {item.name}.")
            values = (weight * grad.float().reshape(-1)).abs()
        else:
            values = _wanda_values(item, weight, feature_norms[item.module], float(tokens.sqrt()), rank)
        result.add(item, _local_sums(item, values, rank))
    return result.all_reduce()


def _wanda_values(item: UnitParameter, weight: torch.Tensor, feature_norms: torch.Tensor, bias_norm: float,
                  rank: int) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` for this rank's flat slice (a bias: ``|b| * sqrt(tokens)``)."""
    shape = tuple(item.param.ds_shape)
    if len(shape) == 1:
        return weight.double().abs() * bias_norm
    partition = weight.numel()
    cols = torch.arange(rank * partition, (rank + 1) * partition, device=weight.device) % shape[1]
    return weight.double().abs() * feature_norms[cols]
