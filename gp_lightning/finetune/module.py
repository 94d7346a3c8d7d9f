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

from gp_lightning.finetune.config import DistillationConfig, TrainingConfig
from gp_lightning.finetune.data import IGNORE
from gp_lightning.finetune.distill import kd_loss_sum, mixed_loss
from gp_lightning.model.layout import decoder_layers
from gp_lightning.runtime.precision import autocast
from gp_lightning.runtime.sharding import recompute_layers_in_backward, shard_layers


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def batch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the batch (the attention mask only where there is padding)."""
    mask = batch.get("attention_mask")
    return model(input_ids=batch["input_ids"], attention_mask=None if mask is None or bool(mask.all()) else mask,
                 use_cache=False).logits


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labels that are not -100, and how many there are."""
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labels that are not -100, and how many there are."""
    return lm_loss_sum(batch_logits(model, batch), batch["labels"])


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
                 activation_checkpointing: bool = False, adapter_checkpoints: bool = False,
                 distillation: DistillationConfig | None = None, teacher: nn.Module | None = None,
                 teacher_precision: str = "32-true") -> None:
        super().__init__()
        self.model = model
        self.training_config = training or TrainingConfig()
        self.distillation = distillation or DistillationConfig()
        # kept out of the module tree: no optimizer, checkpoint or gradient synchronization sees the teacher
        self._teacher = [teacher] if teacher is not None else []
        self.teacher_precision = teacher_precision
        self.shard = shard
        self.activation_checkpointing = activation_checkpointing
        self.adapter_checkpoints = adapter_checkpoints
        self.val_loss = MeanMetric()

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

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
            if self.teacher is not None:  # sharded like the student, computed in its own precision
                shard_layers(self.teacher, decoder_layers(self.teacher), self.device_mesh, self.teacher_precision)
            self._sharded = True

    def on_fit_start(self) -> None:
        """Train mode (adapter dropout on); models come from ``from_pretrained`` in eval mode. The teacher
        follows the student to its device and stays in eval mode."""
        self.model.train()
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = batch_logits(self.model, batch)
        total, count = lm_loss_sum(logits, batch["labels"])
        lm = total / count.clamp(min=1)
        kd = None
        size = batch["input_ids"].shape[0]
        if self.distillation.finetune_loss != "lm":
            kd_total, kd_count = kd_loss_sum(logits, self.teacher_logits(batch), batch["labels"],
                                             self.distillation.kd_temperature)
            kd = kd_total / kd_count.clamp(min=1)
            self.log("train_kd_loss", kd, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
            self.log("train_lm_loss", lm, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        loss = mixed_loss(lm, kd, self.distillation.finetune_loss, self.distillation.kd_alpha)
        # averaged over ranks: for equal-length examples, the curve of one process running the whole batch
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense model's logits of the batch, on the fly, in the evaluation precision."""
        if self.teacher is None:
            raise RuntimeError("finetune_loss needs a teacher, and none was given")
        with autocast(self.teacher_precision, self.device):
            return batch_logits(self.teacher, batch)

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
