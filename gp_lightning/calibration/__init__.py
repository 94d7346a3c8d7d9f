"""Calibration: run real text through the model under Lightning and collect per-unit statistics."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from gp_lightning.architecture import ModelLayout
from gp_lightning.calibration.module import CalibrationModule
from gp_lightning.calibration.taylor import TaylorImportance
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.data import CalibrationData


def run_calibration(
    model: nn.Module,
    layout: ModelLayout,
    windows: torch.Tensor,
    batch_size: int,
    precision: str = "32-true",
    accelerator: str = "auto",
    default_root_dir: str | None = None,
    progress: bool = True,
) -> UnitImportance:
    """One pass of forward+backward over ``windows`` with a Lightning Trainer; Taylor importance."""
    module = CalibrationModule(model, total_target_tokens=windows[:, 1:].numel())
    taylor = TaylorImportance(layout)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, callbacks=[taylor], default_root_dir=default_root_dir,
    )
    trainer.fit(module, datamodule=CalibrationData(windows, batch_size))
    assert taylor.importance is not None
    return taylor.importance
