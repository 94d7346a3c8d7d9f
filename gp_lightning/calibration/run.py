"""Run calibration: one entry for every importance method and strategy, returning per-unit importance."""


from __future__ import annotations

import lightning as L
import torch
from torch import nn

from gp_lightning.calibration.baselines import magnitude_importance, random_importance
from gp_lightning.calibration.methods import METHODS
from gp_lightning.calibration.module import CalibrationModule
from gp_lightning.calibration.statistics_checkpoint import StatisticsCheckpoint
from gp_lightning.calibration.taylor import TaylorImportance
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.calibration.wanda import WandaImportance
from gp_lightning.calibration.zero3 import zero3_calibration
from gp_lightning.data.datamodule import CalibrationData
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.console import calibration_warnings
from gp_lightning.runtime.launch import resolve_launch


def run_calibration(
    model: nn.Module,
    layout: ModelLayout,
    windows: torch.Tensor | None,
    batch_size: int,
    precision: str = "32-true",
    accelerator: str = "auto",
    default_root_dir: str | None = None,
    progress: bool = True,
    method: str = "taylor",
    fisher_batch_size: int | None = None,
    seed: int = 0,
    strategy: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    extra_callbacks: list[L.Callback] | None = None,
    activation_checkpointing: bool = False,
) -> UnitImportance:
    """Per-unit importance of ``model`` by ``method``; ``windows`` may be None for data-free methods.

    Under a distributed strategy every rank runs this with the same arguments (``torchrun``,
    ``srun``, ``accelerate launch``); each reads its own shard of ``windows`` and every rank returns
    the same, complete importance. With ``checkpoint_every`` the accumulated statistics are saved
    into ``checkpoint_dir`` every N batches; ``resume`` continues from them.
    """
    if method == "magnitude":
        return magnitude_importance(model, layout)
    if method == "random":
        return random_importance(layout, seed)
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; known: {', '.join(METHODS)}")
    assert windows is not None, f"{method} needs calibration windows"
    if strategy == "deepspeed":
        if checkpoint_every or resume:
            raise ValueError("statistics checkpoints are not available with strategy: deepspeed yet; use fsdp")
        return zero3_calibration(model, layout, windows, batch_size, method, accelerator, progress)
    collector: TaylorImportance | WandaImportance
    if method == "wanda":
        collector = WandaImportance(layout)
    else:
        collector = TaylorImportance(layout, second_order=method == "taylor_2nd")
    launch = resolve_launch(strategy, accelerator, devices, num_nodes, forward_only=method == "wanda")
    module = CalibrationModule(
        model, total_target_tokens=windows[:, 1:].numel(), compute_gradients=method != "wanda",
        backward_windows=fisher_batch_size if method == "taylor_2nd" else None, shard=launch.shards_parameters,
        activation_checkpointing=activation_checkpointing,
    )
    callbacks: list[L.Callback] = [collector]
    if checkpoint_every or resume:
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every/resume need a checkpoint_dir")
        callbacks.append(StatisticsCheckpoint(checkpoint_dir, checkpoint_every, collector, resume))
    callbacks += extra_callbacks or []
    trainer = L.Trainer(
        accelerator=accelerator, devices=launch.devices, num_nodes=num_nodes, strategy=launch.strategy,
        precision=precision, max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, callbacks=callbacks, default_root_dir=default_root_dir,
        use_distributed_sampler=False,  # CalibrationData shards without duplicating windows
    )
    with calibration_warnings():  # eval mode and no optimizer are what calibration means
        trainer.fit(module, datamodule=CalibrationData(windows, batch_size))
    assert collector.importance is not None
    return collector.importance
