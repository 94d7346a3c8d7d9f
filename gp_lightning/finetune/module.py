"""The LightningModule that fine-tunes: masked causal-LM loss, AdamW, warm-up + decay, validation loss.

Lightning owns the loop, so the strategies of calibration (DDP, FSDP2, DeepSpeed) and its progress
bars, loggers, gradient accumulation and clipping apply unchanged. In LoRA mode the checkpoints of
the best epoch hold only the trainable (adapter) tensors, a few MB instead of the whole model.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from gp_lightning.finetune.config import TrainingConfig
from gp_lightning.finetune.data import IGNORE
from gp_lightning.model.layout import decoder_layers
from gp_lightning.runtime.sharding import recompute_layers_in_backward, shard_layers


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labels that are not -100, and how many there are."""
    mask = batch.get("attention_mask")
    logits = model(input_ids=batch["input_ids"], attention_mask=None if mask is None or bool(mask.all()) else mask,
                   use_cache=False).logits
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Any:
    """Multiplier of the peak learning rate at optimizer step ``step`` (linear warm-up, then decay)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class FinetuneModule(L.LightningModule):
    """Trains whatever in ``model`` requires grad (the adapters in LoRA mode, everything in full mode)."""

    def __init__(self, model: nn.Module, training: TrainingConfig | None = None, shard: bool = False,
                 activation_checkpointing: bool = False, adapter_checkpoints: bool = False) -> None:
        super().__init__()
        self.model = model
        self.training_config = training or TrainingConfig()
        self.shard = shard
        self.activation_checkpointing = activation_checkpointing
        self.adapter_checkpoints = adapter_checkpoints
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        """Activation checkpointing per decoder layer (if asked), then FSDP2 sharding (if asked).

        ``validate()`` and ``fit()`` both call this; each is applied once.
        """
        layers = decoder_layers(base_causal_lm(self.model))
        if self.activation_checkpointing and not getattr(self, "_checkpointed", False):
            recompute_layers_in_backward(layers)
            self._checkpointed = True
        if self.shard and not getattr(self, "_sharded", False):
            shard_layers(self.model, layers, self.device_mesh, str(self.trainer.precision))
            self._sharded = True

    def on_fit_start(self) -> None:
        """Train mode (adapter dropout on); models come from ``from_pretrained`` in eval mode."""
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, count = masked_lm_loss(self.model, batch)
        loss = total / count.clamp(min=1)
        # averaged over ranks: for equal-length examples, the curve of one process running the whole batch
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, count = masked_lm_loss(self.model, batch)
        if count > 0:
            self.val_loss.update(total / count, weight=count)

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()  # token-weighted mean, synchronized over ranks
        self.val_loss.reset()
        self.log("val_loss", value, prog_bar=True, sync_dist=False)
        self.log("val_ppl", torch.exp(value), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.training_config
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total, t.lr_scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_keys(self) -> set[str]:
        return {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapter_checkpoints:  # the frozen base is already on disk: keep only the adapters
            keys = self.trainable_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}

    def load_trained(self, path: str) -> None:
        """Restore the trained tensors of a checkpoint (the best epoch's) into this module."""
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        missing, unexpected = self.load_state_dict(state, strict=False)
        absent = self.trainable_keys() & set(missing)
        if unexpected or absent:
            raise RuntimeError(f"checkpoint {path} does not match the model: unexpected {unexpected[:3]}, "
                               f"missing trained tensors {sorted(absent)[:3]}")
