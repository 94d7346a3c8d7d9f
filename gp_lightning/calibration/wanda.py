"""Structured Wanda importance: weight magnitude times input-feature norm, forward passes only.

``I_u = sum over the unit's weights of |W_ij| * ||X_j||_2`` where ``X_j`` is input feature j of the
weight's projection over every calibration token: the normed hidden state for q/k/v/gate/up, the
attention output (per head dimension) for o_proj, and ``act(gate) * up`` (per channel) for
down_proj. A bias is a weight on a constant input of 1, so its norm is ``sqrt(number of tokens)``.
Input norms are collected by forward pre-hooks on the projections, as float64 sums of squares: one
vector per projection, the size of its input.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from gp_lightning.architecture import ModelLayout
from gp_lightning.calibration.units import UnitImportance, unit_importance, unit_parameters


class _InputNorms:
    """Running sum of squares of each input feature of one projection, and the token count."""

    def __init__(self) -> None:
        self.sum_squares: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        squares = x.reshape(-1, x.shape[-1]).double().square().sum(dim=0)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.tokens += x.shape[:-1].numel()


class WandaImportance(L.Callback):
    """Registers the input-norm hooks for the calibration pass, then reduces to per-unit Wanda scores."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        self.importance: UnitImportance | None = None
        self._norms: dict[nn.Module, _InputNorms] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        for param in model.parameters():
            param.requires_grad_(False)
        for item in unit_parameters(model, self.layout):
            if item.module not in self._norms:
                self._norms[item.module] = _InputNorms()
                self._hooks.append(item.module.register_forward_pre_hook(self._norms[item.module]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        items = {id(item.param): item for item in unit_parameters(pl_module.model, self.layout)}

        def score(name: str, param: nn.Parameter) -> torch.Tensor:
            norms = self._norms[items[id(param)].module]
            assert norms.sum_squares is not None, "calibration ran no forward pass"
            if param.dim() == 1:  # bias: weight on a constant input of 1
                return param.detach().double().abs() * math.sqrt(norms.tokens)
            return param.detach().double().abs() * norms.sum_squares.sqrt()[None, :]

        self.importance = unit_importance(pl_module.model, self.layout, score)
        self.importance.check_finite("Wanda", "The activations overflowed: use precision: 32-true.")
        self._norms.clear()
