"""The LightningModule that runs calibration passes through the model.

It computes the causal-LM loss and calls backward; it never steps an optimizer. Statistics are
collected by callbacks (see :mod:`gp_lightning.calibration.taylor`), so the same module serves every
importance method and every Lightning strategy.

Loss normalization: the loss of a batch is the SUM of token losses divided by the number of
target tokens of the WHOLE calibration set. Gradients accumulated over all batches are then exactly
the gradient of the mean token loss over the calibration set, whatever the batch size.

A batch can be split into several backward passes of ``backward_windows`` windows each. The summed
gradient is the same; what changes is the number of separate gradient samples that second-order
Taylor squares (its Fisher estimate is per-sample when ``backward_windows`` is 1).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of ``input_ids`` (float32 logits)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


class CalibrationModule(L.LightningModule):
    """Forward + backward over calibration windows, gradients left in place for the callbacks."""

    def __init__(self, model: nn.Module, total_target_tokens: int, compute_gradients: bool = True,
                 backward_windows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.total_target_tokens = total_target_tokens
        self.compute_gradients = compute_gradients
        self.backward_windows = backward_windows
        #: Target tokens of the backward pass in flight (read by second-order statistics hooks).
        self.backward_tokens = 0
        self.backward_passes = 0
        self.automatic_optimization = False

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # calibration measures the model as it is used: no dropout

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (input_ids,) = batch
        if not self.compute_gradients:
            with torch.no_grad():
                loss_sum = token_loss_sum(self.model, input_ids)
        else:
            loss_sum = torch.zeros((), device=input_ids.device)
            for chunk in input_ids.split(self.backward_windows or input_ids.shape[0]):
                chunk_sum = token_loss_sum(self.model, chunk)
                self.backward_tokens = chunk[:, 1:].numel()
                self.manual_backward(chunk_sum / self.total_target_tokens)
                self.backward_passes += 1
                loss_sum = loss_sum + chunk_sum.detach()
        mean = loss_sum.detach() / input_ids[:, 1:].numel()
        self.log("loss", mean, prog_bar=True, on_step=True, batch_size=input_ids.shape[0])
        return mean

    def configure_optimizers(self) -> None:
        return None
