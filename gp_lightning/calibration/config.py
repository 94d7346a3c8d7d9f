"""The calibration group: how units are scored, and how the statistics survive an interruption."""

from __future__ import annotations

from dataclasses import dataclass

from gp_lightning.calibration.methods import ImportanceMethod
from gp_lightning.runtime.errors import check_config


@dataclass
class CalibrationConfig:
    """Calibration"""

    importance_method: ImportanceMethod = "taylor"
    """How units are scored. ``taylor``: sum over the unit's weights of abs(w * dL/dw), gradient accumulated
    over the calibration set. ``taylor_2nd``: adds 0.5 * w^2 * H_diag, H_diag = Fisher diagonal (mean squared
    gradient of backward passes). ``wanda``: abs(W_ij) * ||X_j||_2 with input-feature norms from forward
    passes only. ``magnitude``: sum of abs(w), no data. ``random``: a seeded random order (baseline)."""
    fisher_batch_size: int | None = None
    """taylor_2nd only: windows per backward pass whose squared gradient is one Fisher sample (null:
    batch_size; 1: per-sample Fisher, most faithful and slowest). The second-order term shrinks as this
    grows, because gradients average before squaring."""
    checkpoint_every: int = 0
    """Save the accumulated statistics every N calibration batches into ``output/calibration_state`` (0:
    never), so an interrupted run can ``resume``."""
    resume: bool = False
    """Continue the interrupted run in ``output``: its saved statistics are loaded and the batches they
    cover are skipped. The result equals an uninterrupted run."""

    def __post_init__(self) -> None:
        if self.fisher_batch_size is not None:
            check_config(self.fisher_batch_size >= 1, "fisher_batch_size", self.fisher_batch_size,
                         "must be at least 1, or null for batch_size")
        check_config(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0 (0: never)")

    @property
    def statistics_checkpoints(self) -> bool:
        return bool(self.checkpoint_every or self.resume)
