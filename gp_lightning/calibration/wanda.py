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
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from gp_lightning.calibration.units import UnitImportance, unit_importance, unit_parameters
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.sharding import local_part


class InputNorms:
    """Running sum of squares of each input feature of one projection, and the token count.

    A forward pre-hook. ``window_weights(batch, device)`` gives the weight of each window of the pass
    in flight: windows of weight 0 (padding of uneven rank shards) are left out.
    """

    def __init__(self, window_weights: Callable[[int, torch.device], torch.Tensor]) -> None:
        self.window_weights = window_weights
        self.sum_squares: torch.Tensor | None = None
        self.tokens = 0.0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        weights = self.window_weights(x.shape[0], x.device).to(dtype=torch.float64)
        squares = torch.einsum("b,btf->f", weights, x.double().square())
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.tokens += float(weights.sum()) * x.shape[1]


def wanda_score(weight: torch.Tensor, norms: InputNorms, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` per element; a bias (1-D, no ``columns``) is a weight on a constant input of 1.

    ``weight`` is a 2-D block of rows (or a whole weight), or a flat slice of one with the input
    column of each element in ``columns`` (ZeRO-3 partitions).
    """
    assert norms.sum_squares is not None, "calibration ran no forward pass"
    magnitude = weight.double().abs()
    if columns is None and weight.dim() == 1:
        return magnitude * math.sqrt(norms.tokens)
    feature = norms.sum_squares.sqrt()
    return magnitude * (feature[columns] if columns is not None else feature[None, :])


def all_reduce_norms(norms: list[InputNorms]) -> None:
    """Every rank saw its own windows: sum the input statistics over ranks (one collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = norms[0].sum_squares.device
    flat = torch.cat([torch.cat([n.sum_squares.reshape(-1), torch.tensor([n.tokens], dtype=torch.float64,
                                                                         device=device)]) for n in norms])
    dist.all_reduce(flat)
    start = 0
    for n in norms:
        size = n.sum_squares.numel()
        n.sum_squares = flat[start : start + size]
        n.tokens = float(flat[start + size])
        start += size + 1


class WandaImportance(L.Callback):
    """Registers the input-norm hooks for the calibration pass, then reduces to per-unit Wanda scores."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        self.importance: UnitImportance | None = None
        self._norms: dict[nn.Module, InputNorms] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._module: L.LightningModule | None = None

    def window_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        weights = getattr(self._module, "window_weights", None)
        if weights is None:
            return torch.ones(batch, dtype=torch.float64, device=device)
        return weights.to(device=device, dtype=torch.float64)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._module = pl_module
        model = pl_module.model
        for param in model.parameters():
            param.requires_grad_(False)
        for item in unit_parameters(model, self.layout):
            if item.module not in self._norms:
                self._norms[item.module] = InputNorms(self.window_weights)
                self._hooks.append(item.module.register_forward_pre_hook(self._norms[item.module]))

    def statistics_state(self) -> dict:
        """This rank's input-norm sums, in projection order, for a statistics checkpoint."""
        return {"norms": [(n.sum_squares, n.tokens) for n in self._norms.values()]}

    def load_statistics_state(self, state: dict) -> None:
        norms = list(self._norms.values())
        if len(norms) != len(state["norms"]):
            raise ValueError("resume: the statistics checkpoint was written for another model.")
        for target, (sum_squares, tokens) in zip(norms, state["norms"], strict=True):
            target.sum_squares, target.tokens = sum_squares, tokens

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        items = {id(item.param): item for item in unit_parameters(pl_module.model, self.layout)}
        all_reduce_norms(list(self._norms.values()))

        def score(name: str, param: nn.Parameter) -> torch.Tensor:
            return wanda_score(local_part(param.detach())[0], self._norms[items[id(param)].module])

        self.importance = unit_importance(pl_module.model, self.layout, score)
        if self.importance.sharded:  # FSDP: each rank scored its own rows of every weight
            self.importance.all_reduce()
        self.importance.check_finite("Wanda", "The activations overflowed: use precision: 32-true.")
        self._norms.clear()
