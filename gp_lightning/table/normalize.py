"""Clipping and normalization of importance, so that blocks with very different gradient scales compete fairly.

Global Taylor importance can differ by orders of magnitude between layers (early layers, or the
attention vs the MLP of one layer); then the low-scale blocks are emptied first. Clipping bounds
outliers across the whole table; normalization rescales each layer (``level="layer"``) or each
block (``level="block"``: attention and MLP of a layer separately) onto a common range.

A group whose units all have the same importance has no ranking inside it. Its units all get 1
(the value of a group's top unit under minmax and log), not 0, so such a group is not emptied
first just because it is flat.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gp_lightning.table.build import BLOCK
from gp_lightning.table.config import Normalization, NormalizationLevel

#: Value given to every unit of a constant group.
CONSTANT_GROUP_VALUE = 1.0


def clip_percentiles(values: pd.Series, low: float | None, high: float | None) -> tuple[pd.Series, dict[str, Any]]:
    """Clip to the ``low``/``high`` percentiles (0-100) of all values; None leaves that side open."""
    lo = float(np.percentile(values, low)) if low is not None else None
    hi = float(np.percentile(values, high)) if high is not None else None
    report = {
        "low_percentile": low, "high_percentile": high, "low_value": lo, "high_value": hi,
        "units_raised": int((values < lo).sum()) if lo is not None else 0,
        "units_lowered": int((values > hi).sum()) if hi is not None else 0,
    }
    return values.clip(lower=lo, upper=hi), report


def normalize(table: pd.DataFrame, values: pd.Series, method: Normalization,
              level: NormalizationLevel) -> tuple[pd.Series, dict[str, Any]]:
    """Normalize ``values`` (aligned with ``table``) within each layer or block."""
    report: dict[str, Any] = {"method": method, "level": level, "constant_groups": 0}
    if method == "none":
        return values, report
    if method == "sqrt":
        return np.sqrt(values.clip(lower=0.0)), report
    keys = [table[k] for k in (["layer_idx"] if level == "layer" else BLOCK)]
    grouped = values.groupby(keys)
    low, high = grouped.transform("min"), grouped.transform("max")
    spread = high - low
    constant = spread <= 0
    report["constant_groups"] = int(grouped.ngroup()[constant].nunique())
    safe = spread.where(~constant, 1.0)
    if method == "minmax":
        out = (values - low) / safe
    elif method == "zscore":
        # (x - mean) / std, then shifted so the group's minimum is 0: (x - min) / std
        std = grouped.transform(lambda v: v.std(ddof=0))
        out = (values - low) / std.where(~constant, 1.0)
    elif method == "log":
        out = np.log1p(values - low) / np.log1p(safe)
    else:
        raise ValueError(f"unknown normalization {method!r}")
    return out.where(~constant, CONSTANT_GROUP_VALUE), report
