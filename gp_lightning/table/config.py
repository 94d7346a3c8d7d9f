"""The table group: the five importance transforms (in the order they apply), and the two-step operation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from gp_lightning.runtime.errors import ConfigError, check_config

Normalization = Literal["none", "minmax", "zscore", "log", "sqrt"]
NormalizationLevel = Literal["layer", "block"]

#: The keys of the five transforms (what table_transforms.json and the checkpoint's provenance record).
TRANSFORM_KEYS = ("clip_percentile_low", "clip_percentile_high", "normalization", "normalization_level",
                  "temperature", "tau", "layer_depth_weight")


@dataclass
class TableConfig:
    """Global table (the defaults switch every transform off)"""

    clip_percentile_low: float | None = None
    """Table step 1: raise importances below this percentile (0-100) of the whole table to it (null: off; the
    guides use 5, but see docs/how-it-works.md#caution-normalization-and-clipping-on-taylor-tables)."""
    clip_percentile_high: float | None = None
    """Lower importances above this percentile to it (null: off; e.g. 95)."""
    normalization: Normalization = "none"
    """Table step 2: ``none``, ``minmax`` ((x-min)/(max-min)), ``zscore`` ((x-mean)/std shifted to a minimum of
    0), ``log`` (log(x-min+1), then minmax) or ``sqrt``. Counters gradient-scale differences between layers
    or blocks."""
    normalization_level: NormalizationLevel = "block"
    """``layer`` (all units of a layer together) or ``block`` (attention groups and MLP channels of a layer
    separately)."""
    temperature: float = 0.0
    """Table step 3, block correction T (0 = off). Each block's total importance is rescaled to be
    proportional to B^(1/T), B = calibration loss increase when the block is skipped. T=1: totals
    proportional to measured impact; large T: equal totals."""
    tau: float = 0.0
    """Table step 4, layer correction (0 = off): importances of layer l are multiplied by (L[l] / mean(L))^tau,
    L = loss increase when the whole layer is skipped."""
    layer_depth_weight: float = 0.0
    """Table step 5 (0 = off): importances of layer l are multiplied by 1 + (1 - l/N) * alpha with this
    alpha, protecting early layers."""
    block_eval_samples: int = 8
    """Calibration windows used to measure the block/layer skip-ablation losses of T and tau."""
    table_only: bool = False
    """Calibrate and write the global group table, then stop (no pruning)."""
    from_table: str | None = None
    """Prune from a saved ``global_group_table.csv`` instead of calibrating. Its ``importance_raw`` (and
    measured B/L) are reused; this run's table settings apply."""
    allow_unfinished_table: bool = False
    """Take ``from_table`` from a run that failed or was killed (its run.json does not say complete), with a
    warning: the table is written whole once calibration ends, so a run that died later left a usable one. A
    run that is still running is refused all the same."""

    def __post_init__(self) -> None:
        for key in ("clip_percentile_low", "clip_percentile_high"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 100.0:
                raise ConfigError(f"Config key '{key}' = {value!r} is invalid: a percentile is in [0, 100] (or null).")
        low, high = self.clip_percentile_low, self.clip_percentile_high
        if low is not None and high is not None and low >= high:
            raise ConfigError(f"clip_percentile_low ({low}) must be below clip_percentile_high ({high}), e.g. 5 and 95.")
        for key in ("temperature", "tau", "layer_depth_weight"):
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(f"Config key '{key}' = {value!r} is invalid: it must be >= 0 (0 turns it off).")
        check_config(self.block_eval_samples >= 1, "block_eval_samples", self.block_eval_samples, "must be at least 1")
        check_config(not (self.table_only and self.from_table), "table_only", self.table_only,
                     "cannot be combined with from_table (first --table_only, then --from_table in another run)")

    def losses_needed(self) -> tuple[bool, bool]:
        """Which skip-ablation losses the corrections need: (B of every block for T, L of every layer for tau)."""
        return self.temperature > 0, self.tau > 0

    def transform_settings(self) -> dict[str, Any]:
        """The settings of the five transforms, by key."""
        values = dataclasses.asdict(self)
        return {key: values[key] for key in TRANSFORM_KEYS}
