"""First-order Taylor importance, collected by a Lightning callback.

``I_u = sum over the unit's weights of |w * dL/dw|`` with ``dL/dw`` the gradient of the mean token
loss over the whole calibration set. Gradients accumulate in place across batches (the optimizer
never steps); when parameters are not float32 they accumulate in float32 buffers instead, so bf16
runs lose no precision. Only the projection weights of pruning units get gradients at all.
Per-unit sums are taken once, at the end.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from gp_lightning.architecture import ModelLayout
from gp_lightning.calibration.units import UnitImportance, projection_parameters, unit_importance
from gp_lightning.errors import CalibrationError


class TaylorImportance(L.Callback):
    """Accumulates gradients over calibration and reduces them to per-unit Taylor importance."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        self.importance: UnitImportance | None = None
        self._fp32_grads: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        unit_params = projection_parameters(model, self.layout)
        wanted = {id(p) for p in unit_params}
        for param in model.parameters():
            param.requires_grad_(id(param) in wanted)
            param.grad = None
        for param in unit_params:
            if param.dtype != torch.float32:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._accumulate_fp32))

    def _accumulate_fp32(self, param: nn.Parameter) -> None:
        buffer = self._fp32_grads.get(param)
        if buffer is None:
            self._fp32_grads[param] = param.grad.float()
        else:
            buffer.add_(param.grad)
        param.grad = None

    def gradient(self, param: nn.Parameter) -> torch.Tensor:
        grad = self._fp32_grads.get(param, param.grad)
        if grad is None:
            raise CalibrationError("A projection weight received no gradient: was calibration run with backward?")
        return grad.float()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        model = pl_module.model

        def score(name: str, param: nn.Parameter) -> torch.Tensor:
            return (param.detach().float() * self.gradient(param)).abs()

        self.importance = unit_importance(model, self.layout, score)
        for kind, values in (("attention", self.importance.attention), ("mlp", self.importance.mlp)):
            for layer, tensor in values.items():
                if not torch.isfinite(tensor).all():
                    raise CalibrationError(
                        f"Taylor importance of layer {layer} {kind} is NaN/inf: the calibration gradients "
                        "overflowed. Use precision: 32-true, a shorter seq_len, or check the model weights."
                    )
        total = sum(float(t.sum()) for t in self.importance.attention.values())
        total += sum(float(t.sum()) for t in self.importance.mlp.values())
        if total == 0.0 or math.isnan(total):
            raise CalibrationError("All Taylor importances are zero: the calibration produced no gradient.")
        self.release(model)

    def release(self, model: nn.Module) -> None:
        """Free the accumulated gradients (they are the size of the model)."""
        self._fp32_grads.clear()
        for param in model.parameters():
            param.grad = None
