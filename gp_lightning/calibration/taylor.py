"""Taylor importance (first and second order), collected by a Lightning callback.

First order: ``I_u = sum over the unit's weights of |w * g|`` with ``g`` the gradient of the mean
token loss over the whole calibration set. Gradients accumulate in place across batches (the
optimizer never steps); when parameters are not float32 they accumulate in float32 buffers instead,
so bf16 runs lose no precision. Only the projection weights of pruning units get gradients at all.

Second order adds ``0.5 * sum |w^2 * H_diag|`` with the Hessian diagonal approximated by the
empirical Fisher diagonal: the mean over backward passes of the squared gradient ``g_b`` of each
pass's own mean token loss. ``w^2 * g_b^2`` is reduced to per-unit sums inside a gradient hook as
each pass's gradient arrives, so no second per-parameter buffer exists. The estimate depends on
how many windows share a backward pass (``fisher_batch_size``): with 1 it is the per-sample Fisher;
larger passes average samples before squaring and give a smaller, smoother term.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

from gp_lightning.calibration.gradient_stats import gradient_statistics
from gp_lightning.calibration.module import CalibrationModule
from gp_lightning.calibration.units import UnitImportance, UnitParameter, per_unit, unit_importance, unit_parameters
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import CalibrationError
from gp_lightning.runtime.sharding import is_sharded, local_part

_NAN_FIX = ("The calibration gradients overflowed: use precision: 32-true, a shorter seq_len, or check the "
            "model weights.")


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|w * g|`` per element (float32), for any matching pieces of a weight and its gradient."""
    return (weight.float() * grad.float()).abs()


class TaylorImportance(L.Callback):
    """Accumulates gradients over calibration and reduces them to per-unit Taylor importance."""

    def __init__(self, layout: ModelLayout, second_order: bool = False) -> None:
        self.layout = layout
        self.second_order = second_order
        self.importance: UnitImportance | None = None
        #: First-order term alone, and the Fisher term alone (second order only), for auditing.
        self.first_order: UnitImportance | None = None
        self.fisher: UnitImportance | None = None
        self.gradient_statistics: dict | None = None
        self._fp32_grads: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._module: CalibrationModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        assert isinstance(pl_module, CalibrationModule)
        self._module = pl_module
        model = pl_module.model
        items = list(unit_parameters(model, self.layout))
        wanted = {id(item.param) for item in items}
        for param in model.parameters():
            param.requires_grad_(id(param) in wanted)
            param.grad = None
        self.fisher = UnitImportance({}, {})
        distributed = trainer.world_size > 1
        if distributed and any(item.param.dtype != torch.float32 for item in items):
            raise CalibrationError("Distributed calibration needs float32 parameters: use precision: bf16-mixed "
                                   "(bf16 compute over float32 weights) or 32-true, not bf16-true.")
        for item in items:
            if item.param.dtype != torch.float32:
                self._hooks.append(item.param.register_post_accumulate_grad_hook(self._accumulate_fp32))
            if self.second_order:
                self._hooks.append(item.param.register_hook(self._fisher_hook(item)))

    def _accumulate_fp32(self, param: nn.Parameter) -> None:
        buffer = self._fp32_grads.get(param)
        if buffer is None:
            self._fp32_grads[param] = param.grad.float()
        else:
            buffer.add_(param.grad)
        param.grad = None

    def _fisher_hook(self, item: UnitParameter):  # noqa: ANN202 - a tensor hook
        def hook(grad: torch.Tensor) -> None:
            module = self._module
            assert module is not None
            if module.backward_tokens == 0:  # a pass of padding windows only
                return
            # this pass's gradient of its OWN mean loss (the module scaled it by the whole set's tokens
            # and by the world size; the hook sees the rank-local gradient, before synchronization)
            scale = module.total_target_tokens / (module.backward_tokens * module._gradient_scale())
            squared = (item.param.detach().float() * grad.float() * scale).square()
            assert self.fisher is not None
            self.fisher.add(item, per_unit(squared, item.units, item.axis))

        return hook

    def statistics_state(self) -> dict:
        """This rank's accumulated gradients (local shards) and Fisher sums, for a statistics checkpoint."""
        assert self._module is not None and self.fisher is not None
        grads = []
        for item in unit_parameters(self._module.model, self.layout):
            grad = self._fp32_grads.get(item.param, item.param.grad)
            grads.append(None if grad is None else local_part(grad.detach())[0].clone())
        return {"grads": grads, "fisher": (dict(self.fisher.attention), dict(self.fisher.mlp))}

    def load_statistics_state(self, state: dict) -> None:
        assert self._module is not None and self.fisher is not None
        items = list(unit_parameters(self._module.model, self.layout))
        if len(items) != len(state["grads"]):
            raise CalibrationError("resume: the statistics checkpoint was written for another model.")
        for item, saved in zip(items, state["grads"], strict=True):
            if saved is None:
                continue
            param = item.param
            if param.dtype != torch.float32:
                self._fp32_grads[param] = saved.float()
            elif is_sharded(param):
                from torch.distributed.tensor import DTensor

                param.grad = DTensor.from_local(saved.to(param.device), param.device_mesh, param.placements,
                                                run_check=False, shape=param.shape, stride=param.stride())
            else:
                param.grad = saved.to(device=param.device, dtype=param.dtype)
        self.fisher.attention.update(state["fisher"][0])
        self.fisher.mlp.update(state["fisher"][1])

    def gradient(self, param: nn.Parameter) -> torch.Tensor:
        grad = self._fp32_grads.get(param, param.grad)
        if grad is None:
            raise CalibrationError("A projection weight received no gradient: was calibration run with backward?")
        return grad.float()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        model = pl_module.model

        def score(name: str, param: nn.Parameter) -> torch.Tensor:
            return taylor_score(local_part(param.detach())[0], local_part(self.gradient(param))[0])

        self.first_order = unit_importance(model, self.layout, score)
        start = time.perf_counter()
        self.gradient_statistics = gradient_statistics(unit_parameters(model, self.layout), self.gradient)
        self.gradient_statistics["seconds"] = time.perf_counter() - start
        if self.first_order.sharded:  # FSDP: each rank scored its own rows of every weight
            self.first_order.all_reduce()
        if self.second_order:  # every rank squared its own passes' gradients
            self.fisher.all_reduce()
            pl_module.backward_passes = _all_reduce_count(pl_module.backward_passes)
        self.importance = self.first_order
        if self.second_order:
            assert self.fisher is not None and isinstance(pl_module, CalibrationModule)
            passes = max(pl_module.backward_passes, 1)
            # 0.5 * w^2 * H_diag with H_diag = mean over passes of g_b^2
            self.importance = self.first_order.combined(self.fisher, weight=0.5 / passes)
            first, second = self.first_order.total(), 0.5 / passes * self.fisher.total()
            self.importance.details = {"backward_passes": passes, "first_order_total": first,
                                       "second_order_total": second, "second_order_share": second / (first + second)}
        self.importance.check_finite("Taylor", _NAN_FIX)
        self.importance.gradient_statistics = self.gradient_statistics
        self.release(model)

    def release(self, model: nn.Module) -> None:
        """Free the accumulated gradients (they are the size of the model)."""
        self._fp32_grads.clear()
        for param in model.parameters():
            param.grad = None


def _all_reduce_count(count: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return count
    tensor = torch.tensor([count], dtype=torch.float64)
    dist.all_reduce(tensor)
    return int(tensor.item())
