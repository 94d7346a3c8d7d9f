"""Statistics checkpoints: save what calibration has accumulated every N batches, resume after a crash.

A calibration pass over a 70B model on a shared cluster can be preempted. Every ``every`` batches
each rank writes its accumulated state (atomically) to ``directory/rank{r}.pt``: the number of
batches done and its collector's statistics (Taylor: the accumulated gradients of its parameter
shards and the Fisher sums; Wanda: the input-norm sums). Resuming loads them and skips the
batches already done, so the sums continue in the same order and the result is bit-identical to
an uninterrupted pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch

from gp_lightning.runtime.errors import CalibrationError


class Checkpointable(Protocol):
    def statistics_state(self) -> dict[str, Any]: ...

    def load_statistics_state(self, state: dict[str, Any]) -> None: ...


class StatisticsCheckpoint(L.Callback):
    """Saves and restores a collector's statistics (it must run after the collector in the callback list)."""

    def __init__(self, directory: str | Path, every: int, collector: Checkpointable, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.every = every
        self.collector = collector
        self.resume = resume
        self.batches_done = 0
        self._state: dict[str, Any] | None = None

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.pt"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = self._path(trainer.global_rank)
        if not self.resume:
            return
        if not path.is_file():
            raise CalibrationError(f"resume: no statistics checkpoint at {path}. Run without --resume, or pass the "
                                   "--output of the interrupted run (it must have used --checkpoint_every).")
        self._state = torch.load(path, map_location="cpu", weights_only=False)
        if self._state["world_size"] != trainer.world_size:
            raise CalibrationError(f"resume: the checkpoint was written by {self._state['world_size']} ranks, this run "
                                   f"has {trainer.world_size}. Resume with the same number of processes.")
        self.batches_done = int(self._state["batches_done"])
        trainer.datamodule.skip_batches = self.batches_done

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            self.collector.load_statistics_state(self._state["collector"])
            pl_module.backward_passes = int(self._state["backward_passes"])
            self._state = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches_done += 1
        if self.every and self.batches_done % self.every == 0:
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {"batches_done": self.batches_done, "world_size": trainer.world_size,
                 "backward_passes": int(getattr(pl_module, "backward_passes", 0)),
                 "collector": self.collector.statistics_state()}
        path = self._path(trainer.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
