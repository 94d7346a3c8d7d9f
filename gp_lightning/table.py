"""The global group table: one row per pruning unit of the whole model, ranked by score.

``score = importance / cost`` (importance per parameter), so units of different kinds and sizes
compete for one global budget. Block (temperature ``T``) and layer (``tau``) corrections rescale
importance from measured skip-ablation losses; each step is kept as a column for auditing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gp_lightning.architecture import ModelLayout
from gp_lightning.calibration.units import UnitImportance

COLUMNS = ["layer_idx", "group_type", "group_idx", "importance", "cost", "score"]
#: Floor for ablation losses that are <= 0 (skipping the block did not hurt, or even helped).
ABLATION_FLOOR = 1e-6


def build_table(layout: ModelLayout, importance: UnitImportance) -> pd.DataFrame:
    """Rows in model order; ``importance_raw`` keeps the untransformed value."""
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
                "importance_raw": values.double().numpy(),
                "cost": np.full(n, cost, dtype=np.int64),
            }))
    table = pd.concat(parts, ignore_index=True)
    table["importance"] = table["importance_raw"]
    return rescore(table)


def rescore(table: pd.DataFrame) -> pd.DataFrame:
    table["score"] = table["importance"] / table["cost"]
    return table


def apply_block_temperature(table: pd.DataFrame, block_loss: pd.DataFrame, temperature: float) -> pd.DataFrame:
    """Rescale each block so its total importance is proportional to ``B^(1/T)`` (T = 0: no-op).

    ``block_loss`` has columns ``layer_idx, group_type, B`` (loss increase when the block is
    skipped). Within a block the ranking is unchanged: ``I'_g = I_g / sum(I_block) * B^(1/T)``.
    """
    if temperature <= 0:
        return table
    merged = table.merge(block_loss[["layer_idx", "group_type", "B"]], on=["layer_idx", "group_type"], how="left")
    b = merged["B"].clip(lower=ABLATION_FLOOR)
    block_sum = merged.groupby(["layer_idx", "group_type"])["importance"].transform("sum")
    share = np.where(block_sum > 0, merged["importance"] / block_sum.where(block_sum > 0, 1.0), 0.0)
    table = table.copy()
    table["B"] = merged["B"].to_numpy()
    table["importance_before_T"] = table["importance"]
    table["importance"] = share * np.power(b.to_numpy(), 1.0 / temperature)
    return rescore(table)


def apply_layer_tau(table: pd.DataFrame, layer_loss: pd.DataFrame, tau: float) -> pd.DataFrame:
    """Multiply layer l's importances by ``(L[l] / mean(L))^tau`` (tau = 0: no-op)."""
    if tau <= 0:
        return table
    losses = layer_loss.set_index("layer_idx")["L"].clip(lower=ABLATION_FLOOR)
    factor = (losses / losses.mean()) ** tau
    table = table.copy()
    table["L"] = table["layer_idx"].map(layer_loss.set_index("layer_idx")["L"]).to_numpy()
    table["tau_factor"] = table["layer_idx"].map(factor).to_numpy()
    table["importance_before_tau"] = table["importance"]
    table["importance"] = table["importance"] * table["tau_factor"]
    return rescore(table)


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by ascending score; ties broken by position in the model, so the order is reproducible."""
    return table.sort_values(["score", "layer_idx", "group_type", "group_idx"], kind="mergesort").reset_index(drop=True)
