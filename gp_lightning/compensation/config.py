"""The compensation group: how the weights that remain are refit after selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gp_lightning.runtime.errors import check_config

CompensationMethod = Literal["none", "bias", "least_squares"]
WithinLayer = Literal["score", "obs"]


@dataclass
class CompensationConfig:
    """Compensation (refit after selection)"""

    compensation: CompensationMethod = "least_squares"
    """After selection, refit what remains of each o_proj and down_proj on the calibration windows so that the
    block's output stays as close as possible to the dense one. ``least_squares``: the kept columns and an
    output bias, fit to the dense output (float64, damped). ``bias``: only an output bias carrying the removed
    inputs' mean contribution (FLAP's). ``none``: the kept weights stay the dense ones."""
    sequential: bool = True
    """Refit layer by layer in order, each layer seeing the already pruned and compensated layers' outputs
    (SparseGPT/SlimGPT style), so errors do not accumulate; false: every layer sees the dense model's inputs."""
    within_layer: WithinLayer = "obs"
    """Which units a block loses (the global selection decides how many). ``score``: the lowest scores of the
    table. ``obs``: those whose removal the refit absorbs best (structured OBS error of the o_proj/down_proj
    columns, a GQA group's query heads as one block); it assumes the least-squares refit, so with ``bias`` or
    ``none`` the table's scores decide."""
    compensation_damping: float = 0.01
    """Ridge damping of the least-squares systems, as a fraction of the mean diagonal of the kept inputs' Gram
    matrix (with ``within_layer: obs``, of all inputs' Gram matrix: the OBS walk's updates are the refit, float32);
    the ridge pulls the refit toward the dense weights (more damping if a system is singular; a
    projection whose refit would not lower the error keeps FLAP's bias or nothing, as
    ``analysis/compensation.json`` records)."""
    compensation_bias: bool = True
    """Let the refit add an output bias to o_proj / down_proj (a constant input of the least squares). Stock
    Mistral and Qwen2 have no such bias, so ``allocation: uniform_per_layer`` turns it off for them."""
    compensation_samples: int | None = None
    """Calibration windows the refit sees (null: the ``num_samples`` windows calibration used). More windows
    than ``num_samples`` are drawn from ``dataset`` with ``seed`` (the calibration windows first): a refit of
    down_proj has as many unknowns per output as the MLP has channels, and it fits better with more tokens."""

    compensation_holdout: float = 0.25
    """Fraction of the refit windows held out to choose each projection's refit (every ``round(1 / x)``-th
    window): plain slicing, FLAP's bias, or the least-squares refit at ``compensation_damping`` times 1, 3, 10, 30 or
    100, fit on the other windows; the one with the lowest output error on the held-out windows is then fit on all
    windows. 0: no windows held out, the least squares at ``compensation_damping`` (with the fallbacks above)."""

    compensation_offload: bool = False
    """Read the decoder layers from the checkpoint one at a time during compensation instead of holding the
    dense model in memory (for models whose weights do not fit: the walk needs one layer at a time). Needs
    ``streamed_surgery: true`` (surgery then streams the rest from the same files); the dense perplexity
    (``test_before_prune``) still loads the whole model."""

    def __post_init__(self) -> None:
        check_config(self.compensation_damping >= 0, "compensation_damping", self.compensation_damping, "must be >= 0")
        check_config(0 <= self.compensation_holdout <= 0.5, "compensation_holdout", self.compensation_holdout,
                     "must be in [0, 0.5] (0: no windows held out)")
        if self.compensation_samples is not None:
            check_config(self.compensation_samples >= 1, "compensation_samples", self.compensation_samples,
                         "must be at least 1, or null for all calibration windows")

    def held_out(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Which of the windows ``indices`` (positions among all refit windows) are held out: every
        ``round(1 / compensation_holdout)``-th, the same whatever the number of ranks; None when none are."""
        if self.compensation_holdout <= 0 or not self.enabled:
            return None
        every = max(2, round(1 / self.compensation_holdout))
        return indices % every == every - 1

    @property
    def enabled(self) -> bool:
        return self.compensation != "none"

    @property
    def obs_selection(self) -> bool:
        """Whether the refit, not the table, picks each block's units."""
        return self.within_layer == "obs" and self.compensation == "least_squares"
