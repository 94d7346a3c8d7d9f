"""Calibration windows as a LightningDataModule: each rank reads its own shard, padded to equal length."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from gp_lightning.data.windows import rank_shard


class CalibrationData(L.LightningDataModule):
    """Calibration windows as a LightningDataModule, yielding ``(input_ids, weights)`` batches.

    Each rank reads its own contiguous shard (:func:`rank_shard`); a single process reads all
    windows. ``skip_batches`` skips the first batches of the shard (resuming an interrupted pass).
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, skip_batches: int = 0) -> None:
        super().__init__()
        self.windows = windows
        self.batch_size = batch_size
        self.skip_batches = skip_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        indices, weights = rank_shard(self.windows.shape[0], rank, world)
        start = self.skip_batches * self.batch_size
        dataset = TensorDataset(self.windows[indices][start:], weights[start:])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
