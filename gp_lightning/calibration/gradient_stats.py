"""Gradient statistics per layer and block, from the gradients Taylor calibration accumulated anyway.

Global Taylor importance inherits the gradient scale of each layer; when that scale differs by
orders of magnitude, whole layers get emptied. These figures (per block: mean |g|, std, L2 norm,
max, min over every weight of the block's pruning units) show it at a glance. They are reduced
from sufficient statistics (count, sum, sum |g|, sum g^2, extremes), so sharded ranks combine
exactly with one all-reduce, and a layer's figures are exact combinations of its blocks'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from gp_lightning.calibration.units import UnitParameter
from gp_lightning.runtime.sharding import is_sharded, local_part

#: Sufficient statistics, in this order: count, sum, sum |g|, sum g^2, max g, min g, max |g|, min |g|.
_SUMS, _EXTREMES = 4, 4


def _sufficient(grad: torch.Tensor) -> torch.Tensor:
    g = grad.double().reshape(-1)
    if g.numel() == 0:
        return torch.tensor([0, 0, 0, 0, -math.inf, math.inf, -math.inf, math.inf], dtype=torch.float64)
    a = g.abs()
    return torch.stack([torch.tensor(float(g.numel()), dtype=torch.float64), g.sum(), a.sum(), g.square().sum(),
                        g.max(), g.min(), a.max(), a.min()]).cpu()


def _figures(s: torch.Tensor) -> dict[str, float]:
    count, total, total_abs, total_sq = (float(x) for x in s[:_SUMS])
    mean = total / count
    return {"count": int(count), "mean_abs": total_abs / count, "mean": mean,
            "std": math.sqrt(max(total_sq / count - mean * mean, 0.0)), "l2_norm": math.sqrt(total_sq),
            "max": float(s[4]), "min": float(s[5]), "max_abs": float(s[6]), "min_abs": float(s[7])}


def gradient_statistics(items: Iterable[UnitParameter],
                        gradient: Callable[[torch.nn.Parameter], torch.Tensor]) -> dict[str, Any]:
    """Per block and per layer figures of the accumulated gradients, plus spread ratios across layers."""
    per_block: dict[tuple[int, str], torch.Tensor] = {}
    sharded = False
    for item in items:
        sharded = sharded or is_sharded(item.param)
        s = _sufficient(local_part(gradient(item.param))[0])
        key = (item.layer_idx, item.kind)
        if key in per_block:
            prev = per_block[key]
            per_block[key] = torch.cat([prev[:_SUMS] + s[:_SUMS], torch.maximum(prev[4:5], s[4:5]),
                                        torch.minimum(prev[5:6], s[5:6]), torch.maximum(prev[6:7], s[6:7]),
                                        torch.minimum(prev[7:8], s[7:8])])
        else:
            per_block[key] = s
    keys = sorted(per_block)
    # sharded (FSDP) ranks each hold part of every gradient; replicated (DDP) ranks hold all of it
    if sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and keys:
        stacked = torch.stack([per_block[k] for k in keys])
        sums, maxes, mins = stacked[:, :_SUMS].clone(), stacked[:, [4, 6]].clone(), stacked[:, [5, 7]].clone()
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN)
        for i, k in enumerate(keys):
            per_block[k] = torch.stack([*sums[i], maxes[i, 0], mins[i, 0], maxes[i, 1], mins[i, 1]])
    blocks = [{"layer_idx": layer, "block": kind, **_figures(per_block[(layer, kind)])} for layer, kind in keys]
    layers = []
    for layer in sorted({layer for layer, _ in keys}):
        parts = [per_block[k] for k in keys if k[0] == layer]
        combined = torch.stack([sum(p[i] for p in parts) for i in range(_SUMS)]
                               + [max(p[4] for p in parts), min(p[5] for p in parts),
                                  max(p[6] for p in parts), min(p[7] for p in parts)])
        layers.append({"layer_idx": layer, **_figures(combined)})

    def ratio(key: str) -> float:
        values = [row[key] for row in layers if row[key] > 0]
        return max(values) / min(values) if values else float("nan")

    summary = {"mean_ratio": ratio("mean_abs"), "std_ratio": ratio("std"), "norm_ratio": ratio("l2_norm"),
               "max_ratio": ratio("max_abs")}
    return {"layers": layers, "blocks": blocks, "ratios": summary}
