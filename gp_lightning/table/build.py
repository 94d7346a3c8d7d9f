"""The raw global group table: one row per pruning unit of the whole model, in model order.

Words, once: a *unit* is what pruning removes, either an attention GQA group (one KV head, its
query heads, their o_proj columns) or an MLP channel. The table's columns keep the names the
pruning guides use: ``group_type`` is the unit's kind (``attention`` or ``mlp``) and ``group_idx``
its index within its layer's block, so an MLP channel is a "group" of the table too. A *block* is
the attention or the MLP of one layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.model.layout import ModelLayout

#: Identify a unit (layer, unit kind, unit index).
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


def score_order(table: pd.DataFrame) -> np.ndarray:
    """Row positions of ``table`` by ascending score, ties broken by ``KEY`` (what :func:`by_score` sorts by).

    numpy instead of ``sort_values`` on four columns (4x faster on a 70B table of 2.3M units), and an
    already ordered table is recognized in one linear pass (selection orders the ordered table again).
    """
    score = table["score"].to_numpy(dtype=np.float64)
    layer, idx = table["layer_idx"].to_numpy(), table["group_idx"].to_numpy()
    kind = pd.factorize(table["group_type"], sort=True)[0]  # codes in the order sort_values would use
    if _in_score_order(score, layer, kind, idx):
        return np.arange(len(table))
    by_key = np.lexsort((idx, kind, layer))
    score = score[by_key]
    if np.isnan(score).any():
        return by_key[np.argsort(score, kind="stable")]  # NaN last, in KEY order
    # a stable sort is 3x slower than the default one; sort the runs of equal scores afterwards instead
    order = np.argsort(score)
    ordered = score[order]
    same = ordered[1:] == ordered[:-1]
    if same.any():
        tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])  # every unit of a run of equal scores
        order[tied] = order[tied][np.lexsort((order[tied], ordered[tied]))]  # each run in KEY order
    return by_key[order]


def _in_score_order(score: np.ndarray, layer: np.ndarray, kind: np.ndarray, idx: np.ndarray) -> bool:
    step = np.diff(score)
    if not (step >= 0).all():  # also False with NaN
        return False
    a = np.flatnonzero(step == 0)
    b = a + 1
    key_ok = (layer[a] < layer[b]) | ((layer[a] == layer[b]) & (
        (kind[a] < kind[b]) | ((kind[a] == kind[b]) & (idx[a] <= idx[b]))))
    return bool(key_ok.all())


def by_score(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by ascending score; ties broken by position in the model, so the order is reproducible."""
    order = score_order(table)
    if np.array_equal(order, np.arange(len(table))):
        return table.reset_index(drop=True)
    return table.take(order).reset_index(drop=True)
