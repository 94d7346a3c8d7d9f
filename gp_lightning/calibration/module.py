"""The LightningModule that runs calibration passes through the model.

It computes the causal-LM loss and calls backward; it never steps an optimizer. Statistics are
collected by callbacks (see :mod:`gp_lightning.calibration.taylor`), so the same module serves every
importance method and every Lightning strategy.

Loss normalization: the loss of a batch is the SUM of its (weighted) token losses divided by the
number of target tokens of the WHOLE calibration set. Gradients accumulated over all batches are
then exactly the gradient of the mean token loss over the calibration set, whatever the batch size.
Data-parallel strategies (DDP, FSDP) AVERAGE gradients over ranks inside backward, so the loss is
also multiplied by the world size: the synchronized gradient is then the same full-set gradient a
single process computes, and no statistic needs a second reduction. Windows of weight 0 are padding
(see :func:`gp_lightning.data.rank_shard`).

A batch can be split into several backward passes of ``backward_windows`` windows each. The summed
gradient is the same; what changes is the number of separate gradient samples that second-order
Taylor squares (its Fisher estimate is per-sample when ``backward_windows`` is 1).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from gp_lightning.runtime.sharding import recompute_layers_in_backward, shard_layers


def window_loss_sums(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-window sums of next-token cross-entropies of ``input_ids`` (float32 logits)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    return losses.view(input_ids.shape[0], -1).sum(dim=1)


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of ``input_ids`` (float32 logits)."""
    return window_loss_sums(model, input_ids).sum()


class CalibrationModule(L.LightningModule):
    """Forward + backward over calibration windows, gradients left in place for the callbacks."""

    def __init__(self, model: nn.Module, total_target_tokens: int, compute_gradients: bool = True,
                 backward_windows: int | None = None, shard: bool = False,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.total_target_tokens = total_target_tokens
        self.compute_gradients = compute_gradients
        self.backward_windows = backward_windows
        self.shard = shard
        self.activation_checkpointing = activation_checkpointing
        #: Real (non-padding) target tokens of the backward pass in flight, for the Fisher hooks.
        self.backward_tokens = 0
        self.backward_passes = 0
        #: Weights of the windows in the forward pass in flight, for the input-norm hooks.
        self.window_weights: torch.Tensor | None = None
        self.automatic_optimization = False

    def configure_model(self) -> None:
        """Activation checkpointing per decoder layer (if asked), then FSDP2 sharding (if asked)."""
        from gp_lightning.model.layout import decoder_layers

        if self.activation_checkpointing and self.compute_gradients and not getattr(self, "_checkpointed", False):
            recompute_layers_in_backward(decoder_layers(self.model))
            self._checkpointed = True
        if not self.shard:
            return
        shard_layers(self.model, decoder_layers(self.model), self.device_mesh, str(self.trainer.precision))
        if getattr(self.model, "gp_weights_dir", None) and any(p.is_meta for p in self.model.parameters()):
            from gp_lightning.model.sharded import load_local_shards

            load_local_shards(self.model, self.trainer.strategy.root_device)

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # calibration measures the model as it is used: no dropout

    def _gradient_scale(self) -> float:
        """Data-parallel strategies average gradients over ranks; undo it (see the module docstring)."""
        return float(self.trainer.world_size) if self.trainer.world_size > 1 else 1.0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, weights = batch
        targets_per_window = input_ids.shape[1] - 1
        if not self.compute_gradients:
            with torch.no_grad():
                self.window_weights = weights
                loss_sum = (window_loss_sums(self.model, input_ids) * weights).sum()
        else:
            loss_sum = torch.zeros((), device=input_ids.device)
            scale = self._gradient_scale() / self.total_target_tokens
            for chunk, chunk_weights in zip(input_ids.split(self.backward_windows or input_ids.shape[0]),
                                            weights.split(self.backward_windows or input_ids.shape[0]), strict=True):
                chunk_sum = (window_loss_sums(self.model, chunk) * chunk_weights).sum()
                self.backward_tokens = int(chunk_weights.sum().item()) * targets_per_window
                self.manual_backward(chunk_sum * scale)
                self.backward_passes += int(self.backward_tokens > 0)
                loss_sum = loss_sum + chunk_sum.detach()
        real = max(float(weights.sum()), 1.0) * targets_per_window
        mean = loss_sum.detach() / real
        self.log("loss", mean, prog_bar=True, on_step=True, batch_size=input_ids.shape[0])
        return mean

    def configure_optimizers(self) -> None:
        return None
