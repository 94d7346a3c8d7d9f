"""The raw global group table: one row per pruning unit of the whole model, in model order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gp_lightning.architecture import ModelLayout
from gp_lightning.calibration.units import UnitImportance

#: Identify a unit.
KEY = ["layer_idx", "group_type", "group_idx"]
#: Identify a block (the attention or the MLP of one layer).
BLOCK = ["layer_idx", "group_type"]


def build_table(layout: ModelLayout, importance: UnitImportance) -> pd.DataFrame:
    """Columns ``layer_idx, group_type, group_idx, cost, importance_raw`` and the working ``importance``/``score``."""
    parts = []
    for layer in layout.layers:
        for kind, values, cost in (
            ("attention", importance.attention.get(layer.index), layout.attention_group_cost(layer)),
            ("mlp", importance.mlp.get(layer.index), layout.mlp_channel_cost(layer)),
        ):
            if values is None or values.numel() == 0:
                continue
            n = values.numel()
            parts.append(pd.DataFrame({
                "layer_idx": np.full(n, layer.index, dtype=np.int64),
                "group_type": kind,
                "group_idx": np.arange(n, dtype=np.int64),
                "cost": np.full(n, cost, dtype=np.int64),
                "importance_raw": values.double().numpy(),
            }))
    table = pd.concat(parts, ignore_index=True)
    table["importance"] = table["importance_raw"]
    return rescore(table)


def rescore(table: pd.DataFrame) -> pd.DataFrame:
    """``score = importance / cost``: importance per parameter, comparable across unit kinds."""
    table["score"] = table["importance"] / table["cost"]
    return table


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by ascending score; ties broken by position in the model, so the order is reproducible."""
    return table.sort_values(["score", *KEY], kind="mergesort").reset_index(drop=True)
