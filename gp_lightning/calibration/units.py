"""Reduce per-weight scores to per-unit sums (one number per GQA group and per MLP channel).

Importance methods differ only in the per-weight score (``|w * g|`` for Taylor, ``|w|`` for
magnitude, ...); the grouping of weights into units is the same for all, and lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gp_lightning.architecture import ModelLayout, attention_of, decoder_layers, mlp_of

#: ``score(module_name, parameter) -> per-element non-negative tensor`` (float32).
ElementScore = Callable[[str, nn.Parameter], torch.Tensor]


@dataclass
class UnitImportance:
    """Importance per unit: ``attention[l]`` has one entry per KV group, ``mlp[l]`` per channel."""

    attention: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]


def _rows(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a (rows, cols) score over columns, then rows into ``groups`` consecutive blocks."""
    per_row = values.sum(dim=1, dtype=torch.float64) if values.dim() == 2 else values.double()
    return per_row.view(groups, -1).sum(dim=1)


def _cols(values: torch.Tensor, groups: int) -> torch.Tensor:
    return values.sum(dim=0, dtype=torch.float64).view(groups, -1).sum(dim=1)


def unit_importance(model: nn.Module, layout: ModelLayout, score: ElementScore) -> UnitImportance:
    """Apply ``score`` to every projection parameter and sum the result per unit (float64)."""
    attention: dict[int, torch.Tensor] = {}
    mlp_scores: dict[int, torch.Tensor] = {}
    for layer, module in zip(layout.layers, decoder_layers(model), strict=True):
        prefix = f"layers.{layer.index}"
        attn = attention_of(module)
        if layer.has_attention and attn is not None:
            groups = layer.num_kv_heads
            total = torch.zeros(groups, dtype=torch.float64)
            for name in ("q_proj", "k_proj", "v_proj"):
                proj = getattr(attn, name)
                total += _rows(score(f"{prefix}.self_attn.{name}.weight", proj.weight), groups)
                if proj.bias is not None:
                    total += _rows(score(f"{prefix}.self_attn.{name}.bias", proj.bias), groups)
            total += _cols(score(f"{prefix}.self_attn.o_proj.weight", attn.o_proj.weight), groups)
            attention[layer.index] = total
        mlp = mlp_of(module)
        if layer.has_mlp and mlp is not None:
            channels = layer.intermediate_size
            total = torch.zeros(channels, dtype=torch.float64)
            for name in ("gate_proj", "up_proj"):
                proj = getattr(mlp, name)
                total += _rows(score(f"{prefix}.mlp.{name}.weight", proj.weight), channels)
                if proj.bias is not None:
                    total += _rows(score(f"{prefix}.mlp.{name}.bias", proj.bias), channels)
            total += _cols(score(f"{prefix}.mlp.down_proj.weight", mlp.down_proj.weight), channels)
            mlp_scores[layer.index] = total
    return UnitImportance(attention, mlp_scores)


def projection_parameters(model: nn.Module, layout: ModelLayout) -> list[nn.Parameter]:
    """Every parameter that belongs to some pruning unit (the only ones that need gradients)."""
    params: list[nn.Parameter] = []
    for layer, module in zip(layout.layers, decoder_layers(model), strict=True):
        attn, mlp = attention_of(module), mlp_of(module)
        if layer.has_attention and attn is not None:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(attn, name)
                params.append(proj.weight)
                if proj.bias is not None and name != "o_proj":
                    params.append(proj.bias)
        if layer.has_mlp and mlp is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                proj = getattr(mlp, name)
                params.append(proj.weight)
                if proj.bias is not None and name != "down_proj":
                    params.append(proj.bias)
    return params
