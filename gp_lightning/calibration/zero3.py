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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.calibration.module import window_loss_sums
from gp_lightning.calibration.taylor import taylor_score
from gp_lightning.calibration.units import UnitImportance, UnitParameter, unit_parameters
from gp_lightning.calibration.wanda import InputNorms, all_reduce_norms, wanda_score
from gp_lightning.data.windows import rank_shard
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import CalibrationError
from gp_lightning.runtime.machine import detect


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


def _engine(model: nn.Module, items: list[UnitParameter], batch_size: int, steps: int, taylor: bool) -> Any:
    """A ZeRO-3 engine over ``model`` whose gradients of the unit weights (Taylor) accumulate over ``steps``."""
    import deepspeed

    wanted = {id(item.param) for item in items} if taylor else set()
    for param in model.parameters():
        param.requires_grad_(id(param) in wanted)
        if param.dtype != torch.float32:
            raise CalibrationError("strategy: deepspeed needs float32 parameters here (precision 32-true or bf16-mixed).")
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": steps,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0) if wanted else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero3_calibration(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int, method: str,
                      accelerator: str = "auto", progress: bool = True) -> UnitImportance:
    """Taylor or Wanda importance under DeepSpeed ZeRO-3; every rank returns the complete result.

    The scoring is the collectors' own (:func:`taylor_score`, :class:`InputNorms` + :func:`wanda_score`),
    applied to each rank's flat partition of every weight.
    """
    cpu = not detect().uses_gpu(accelerator)
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    indices, weights = rank_shard(windows.shape[0], rank, world)
    steps = math.ceil(len(indices) / batch_size)
    items = list(unit_parameters(model, layout))
    engine = _engine(model, items, batch_size, steps, taylor=method == "taylor")
    device = next(iter(engine.parameters())).device
    current: dict[str, torch.Tensor] = {}
    projections = list(dict.fromkeys(item.module for item in items))  # model order: the same on every rank
    norms = {module: InputNorms(lambda batch, dev: current["weights"]) for module in projections}
    hooks = [m.register_forward_pre_hook(norms[m]) for m in projections] if method == "wanda" else []
    total = windows[:, 1:].numel()
    engine.eval()
    for step in tqdm(range(steps), desc=f"Calibration (ZeRO-3, rank {rank})", disable=not progress or rank != 0):
        batch = indices[step * batch_size : (step + 1) * batch_size]
        ids, current["weights"] = windows[batch].to(device), weights[step * batch_size : (step + 1) * batch_size].to(device)
        if method == "wanda":
            with torch.no_grad():
                engine(input_ids=ids, use_cache=False)
        else:
            loss = (window_loss_sums(engine, ids) * current["weights"]).sum() * world / total
            engine.backward(loss, scale_wrt_gas=False)
    for handle in hooks:
        handle.remove()
    if method == "wanda":
        all_reduce_norms([norms[m] for m in projections])
    return _partition_importance(items, method, norms, rank).all_reduce()


def _partition_importance(items: list[UnitParameter], method: str, norms: dict[nn.Module, InputNorms],
                          rank: int) -> UnitImportance:
    """This rank's per-unit partial sums over its flat partition of every unit weight."""
    from deepspeed.utils import safe_get_local_grad

    result = UnitImportance({}, {}, sharded=True)
    for item in items:
        weight = item.param.ds_tensor.detach().reshape(-1)
        if method == "taylor":
            grad = safe_get_local_grad(item.param)
            if grad is None:
                raise CalibrationError(f"DeepSpeed returned no gradient partition for {item.name}.")
            values = taylor_score(weight, grad.reshape(-1))
        else:
            shape = tuple(item.param.ds_shape)
            columns = None
            if len(shape) == 2:
                columns = torch.arange(rank * weight.numel(), (rank + 1) * weight.numel(), device=weight.device) % shape[1]
            values = wanda_score(weight, norms[item.module], columns)
        result.add(item, _local_sums(item, values, rank))
    return result


def build_cpu_ops() -> list[str]:
    """JIT-compile, once, the DeepSpeed ops a CPU job of this machine would compile on first use (``make
    deepspeed-ops``; the machine's ``deepspeed_cpu_ops``): the names built. A GPU machine has none to build."""
    ops = detect().deepspeed_cpu_ops()
    if ops:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in ops:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()
            built.append(name)
    return built
