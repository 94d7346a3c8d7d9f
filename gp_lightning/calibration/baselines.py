"""Data-free baselines: weight magnitude and random importance (for benchmarks and sanity checks)."""

from __future__ import annotations

import torch
from torch import nn

from gp_lightning.calibration.units import UnitImportance, unit_importance
from gp_lightning.model.layout import ModelLayout


def magnitude_importance(model: nn.Module, layout: ModelLayout) -> UnitImportance:
    """``sum |w|`` over the unit's weights (the L1 "weight" criterion of LLM-Pruner)."""
    return unit_importance(model, layout, lambda name, param: param.detach().double().abs())


def random_importance(layout: ModelLayout, seed: int) -> UnitImportance:
    """Uniform random importance scaled by the unit's cost.

    The score (importance / cost) is then uniform, so units are taken in a random order whatever
    their kind and size, instead of favouring the expensive attention groups.
    """
    generator = torch.Generator().manual_seed(seed)
    result = UnitImportance({}, {})
    for layer in layout.layers:
        if layer.has_attention:
            draw = torch.rand(layer.num_kv_heads, generator=generator, dtype=torch.float64)
            result.attention[layer.index] = draw * layout.attention_group_cost(layer)
        if layer.has_mlp:
            draw = torch.rand(layer.intermediate_size, generator=generator, dtype=torch.float64)
            result.mlp[layer.index] = draw * layout.mlp_channel_cost(layer)
    return result
