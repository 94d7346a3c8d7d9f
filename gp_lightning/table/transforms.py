"""The table transforms, applied in a fixed order, each kept as a column of the table.

1. clip (``importance_clipped``), 2. normalize (``importance_normalized``), 3. block temperature T
(``B``, ``importance_block``), 4. layer tau (``L``, ``tau_factor``, ``importance_layer``),
5. depth weight (``depth_factor``) -> ``importance`` and ``score = importance / cost``.
A step that is off copies its input, so the columns are the same in every run and each step can
be audited by comparing two neighbouring columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gp_lightning.runtime.errors import ConfigError
from gp_lightning.table.ablation import AblationLosses
from gp_lightning.table.build import BLOCK, by_score, rescore
from gp_lightning.table.config import TableConfig
from gp_lightning.table.corrections import block_temperature, depth_factor, layer_tau
from gp_lightning.table.normalize import clip_percentiles, normalize

STAGE_COLUMNS = [
    "importance_raw", "importance_clipped", "importance_normalized", "B", "importance_block",
    "L", "tau_factor", "importance_layer", "depth_factor", "importance", "score",
]


def _aligned(table: pd.DataFrame, losses: pd.DataFrame | None, keys: list[str], column: str) -> pd.Series:
    if losses is None or losses.empty:
        return pd.Series(np.nan, index=table.index)
    merged = table[keys].merge(losses[[*keys, column]], on=keys, how="left")
    return pd.Series(merged[column].to_numpy(), index=table.index)


def transform_table(table: pd.DataFrame, transforms: TableConfig, num_layers: int,
                    block_loss: pd.DataFrame | None = None,
                    layer_loss: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Apply the transforms to ``importance_raw``; return the table with every stage column and a report.

    ``block_loss`` has columns ``layer_idx, group_type, B``; ``layer_loss`` ``layer_idx, L``.
    """
    t = transforms
    table = table.copy()
    report: dict[str, Any] = {"settings": t.transform_settings()}
    values = table["importance_raw"].astype(np.float64)
    if t.clip_percentile_low is not None or t.clip_percentile_high is not None:
        values, report["clip"] = clip_percentiles(values, t.clip_percentile_low, t.clip_percentile_high)
    table["importance_clipped"] = values
    values, report["normalization"] = normalize(table, values, t.normalization, t.normalization_level)
    table["importance_normalized"] = values

    table["B"] = _aligned(table, block_loss, BLOCK, "B")
    if t.losses_needed()[0]:
        if table["B"].isna().any():
            raise ConfigError("temperature > 0 needs the block ablation losses B for every block, and some are missing.")
        values, report["temperature"] = block_temperature(table, values, table["B"], t.temperature)
    table["importance_block"] = values

    table["L"] = _aligned(table, layer_loss, ["layer_idx"], "L")
    table["tau_factor"] = 1.0
    if t.losses_needed()[1]:
        if table["L"].isna().any():
            raise ConfigError("tau > 0 needs the layer ablation losses L for every layer, and some are missing.")
        values, table["tau_factor"], report["tau"] = layer_tau(table, values, table["L"], t.tau)
    table["importance_layer"] = values

    table["depth_factor"] = depth_factor(table, num_layers, t.layer_depth_weight)
    table["importance"] = values * table["depth_factor"]
    rescore(table)
    if not np.isfinite(table["score"]).all():
        raise ConfigError("The table transforms produced NaN/inf scores; check the importance values and settings.")
    identity = ["layer_idx", "group_type", "group_idx", "cost"]
    return table[identity + STAGE_COLUMNS], report


@dataclass
class OrderedTable:
    """The table step's artefact: every unit with every stage column, by ascending score, and its report."""

    table: pd.DataFrame
    report: dict[str, Any]


def order_units(raw: pd.DataFrame, transforms: TableConfig, num_layers: int,
               losses: AblationLosses | None = None) -> OrderedTable:
    """Apply the transforms to the raw table and order it by score (ties in model order)."""
    losses = losses or AblationLosses()
    table, report = transform_table(raw, transforms, num_layers, losses.blocks, losses.layers)
    if losses.base_loss is not None:
        report["ablation_base_loss"] = losses.base_loss
    return OrderedTable(by_score(table), report)
