"""Skip-ablation losses for the block (temperature) and layer (tau) corrections.

``B[l, b]`` is the increase of the mean calibration loss when block b (attention or MLP) of layer l
is skipped (its output replaced by zero, leaving the residual); ``L[l]`` the increase when the
whole layer is skipped. Measured on a bounded subset of calibration windows, forward only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.calibration.module import token_loss_sum
from gp_lightning.model.layout import ModelLayout, decoder_layers


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        total += float(token_loss_sum(model, windows[start : start + batch_size]))
    return total / windows[:, 1:].numel()


def _zero_output(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _pass_through(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def skipped(module: nn.Module, whole_layer: bool = False) -> Iterator[None]:
    """Within the context, ``module`` contributes nothing to the residual stream."""
    if whole_layer:
        handle = module.register_forward_hook(_pass_through, with_kwargs=True)
    else:
        handle = module.register_forward_hook(_zero_output)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class AblationLosses:
    """Skip-ablation losses: ``blocks`` has columns ``layer_idx, group_type, B``, ``layers`` ``layer_idx, L``.

    ``base_loss`` is the unablated loss they were measured against (None when they come from a saved table).
    """

    blocks: pd.DataFrame | None = None
    layers: pd.DataFrame | None = None
    base_loss: float | None = None


def ablation_losses(
    model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int, blocks: bool, layers: bool
) -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """Return ``(base_loss, B table, L table)``; tables are empty when not requested."""
    model.eval()
    base = mean_loss(model, windows, batch_size)
    modules = decoder_layers(model)
    jobs: list[tuple[int, str, nn.Module, bool]] = []
    for layer, module in zip(layout.layers, modules, strict=True):
        if blocks:
            if layer.has_attention:
                jobs.append((layer.index, "attention", module.self_attn, False))
            if layer.has_mlp:
                jobs.append((layer.index, "mlp", module.mlp, False))
        if layers:
            jobs.append((layer.index, "layer", module, True))
    block_rows, layer_rows = [], []
    for layer_idx, kind, module, whole in tqdm(jobs, desc="Skip-ablation", unit="block"):
        with skipped(module, whole_layer=whole):
            increase = mean_loss(model, windows, batch_size) - base
        if whole:
            layer_rows.append({"layer_idx": layer_idx, "L": increase})
        else:
            block_rows.append({"layer_idx": layer_idx, "group_type": kind, "B": increase})
    return (
        base,
        pd.DataFrame(block_rows, columns=["layer_idx", "group_type", "B"]),
        pd.DataFrame(layer_rows, columns=["layer_idx", "L"]),
    )
