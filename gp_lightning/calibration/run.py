"""Run calibration: one entry for every importance method and strategy, returning per-unit importance.

Methods: ``taylor`` and ``taylor_2nd`` (forward+backward, :mod:`.taylor`), ``wanda`` (forward only,
:mod:`.wanda`), and the data-free baselines ``magnitude`` and ``random`` (:mod:`.baselines`).
Under a distributed strategy every rank runs this with the same arguments (``torchrun``, ``srun``,
``accelerate launch``); each reads its own shard of the windows and every rank returns the same,
complete importance.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from gp_lightning.calibration.baselines import magnitude_importance, random_importance
from gp_lightning.calibration.config import CalibrationConfig
from gp_lightning.calibration.methods import CAPABILITIES, check_capability
from gp_lightning.calibration.module import CalibrationModule
from gp_lightning.calibration.statistics_checkpoint import StatisticsCheckpoint, windows_hash
from gp_lightning.calibration.taylor import TaylorImportance
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.calibration.wanda import WandaImportance
from gp_lightning.calibration.zero3 import zero3_calibration
from gp_lightning.data.datamodule import CalibrationData
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.config import DistributedConfig
from gp_lightning.runtime.console import calibration_warnings
from gp_lightning.runtime.errors import CalibrationError
from gp_lightning.runtime.launch import resolve_launch

#: Where statistics checkpoints go inside a run directory.
STATE_DIR = "calibration_state"


def run_calibration(model: nn.Module, layout: ModelLayout, windows: torch.Tensor | None, batch_size: int,
                    calibration: CalibrationConfig | None = None, distributed: DistributedConfig | None = None, *,
                    precision: str = "32-true", seed: int = 0, run_dir: str | Path | None = None,
                    progress: bool = True, extra_callbacks: list[L.Callback] | None = None) -> UnitImportance:
    """Per-unit importance of ``model``; ``windows`` may be None for data-free methods.

    ``precision`` is a resolved Lightning precision; statistics checkpoints (``checkpoint_every``,
    ``resume``) live in ``run_dir/calibration_state``.
    """
    calibration = calibration or CalibrationConfig()
    distributed = distributed or DistributedConfig()
    method = calibration.importance_method
    check_capability(method, distributed.strategy, calibration.statistics_checkpoints)
    if method == "magnitude":
        return magnitude_importance(model, layout)
    if method == "random":
        return random_importance(layout, seed)
    if windows is None:
        raise ValueError(f"{method} needs calibration windows")
    if distributed.strategy == "deepspeed":
        return zero3_calibration(model, layout, windows, batch_size, method, distributed.accelerator, progress)
    return _lightning_calibration(model, layout, windows, batch_size, calibration, distributed, precision, seed,
                                  run_dir, progress, extra_callbacks or [])


def _lightning_calibration(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int,
                           calibration: CalibrationConfig, distributed: DistributedConfig, precision: str, seed: int,
                           run_dir: str | Path | None, progress: bool, extra_callbacks: list[L.Callback]
                           ) -> UnitImportance:
    method = calibration.importance_method
    backward = CAPABILITIES[method].backward
    collector = TaylorImportance(layout, second_order=method == "taylor_2nd") if backward else WandaImportance(layout)
    launch = resolve_launch(distributed.strategy, distributed.accelerator, distributed.devices, distributed.num_nodes,
                            forward_only=not backward)
    module = CalibrationModule(
        model, total_target_tokens=windows[:, 1:].numel(), compute_gradients=backward,
        backward_windows=calibration.fisher_batch_size if method == "taylor_2nd" else None,
        shard=launch.shards_parameters, activation_checkpointing=distributed.activation_checkpointing,
    )
    callbacks: list[L.Callback] = [collector]
    if calibration.statistics_checkpoints:
        if run_dir is None:
            raise ValueError("checkpoint_every/resume need a run directory for the statistics checkpoints")
        settings = {"model": str(getattr(model.config, "_name_or_path", "")), "units": layout_fingerprint(layout),
                    "method": method, "fisher_batch_size": calibration.fisher_batch_size, "windows": windows_hash(windows),
                    "batch_size": batch_size, "precision": precision, "seed": seed}
        callbacks.append(StatisticsCheckpoint(Path(run_dir) / STATE_DIR, calibration.checkpoint_every, collector,
                                              calibration.resume, settings))
    trainer = L.Trainer(
        accelerator=distributed.accelerator, devices=launch.devices, num_nodes=distributed.num_nodes,
        strategy=launch.strategy, precision=precision, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, callbacks=callbacks + extra_callbacks,
        default_root_dir=None if run_dir is None else str(run_dir),
        use_distributed_sampler=False,  # CalibrationData shards without duplicating windows
    )
    with calibration_warnings():  # eval mode and no optimizer are what calibration means
        trainer.fit(module, datamodule=CalibrationData(windows, batch_size))
    if collector.importance is None:  # no batch ran: a resumed pass whose checkpoint already covered all of them
        checkpoint = next((c for c in callbacks if isinstance(c, StatisticsCheckpoint)), None)
        if checkpoint is None or not checkpoint.finish_loaded(trainer, module):
            raise CalibrationError("calibration ran no batch: there are no calibration windows for this process")
    assert collector.importance is not None
    return collector.importance


def layout_fingerprint(layout: ModelLayout) -> str:
    """KV heads x queries per KV head / MLP channels of every layer: the units a statistics checkpoint must match."""
    return ",".join(f"{layer.num_kv_heads}x{layer.queries_per_kv}/{layer.intermediate_size}" for layer in layout.layers)
