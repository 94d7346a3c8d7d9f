"""Corrections from measured skip-ablation losses (block temperature T, layer tau) and a depth prior.

``B[l, b]``: calibration loss increase when block b of layer l is skipped; ``L[l]``: the same for
the whole layer (see :mod:`gp_lightning.table.ablation`). Gradients see only a local
linearization; these losses see what removing a whole block really costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gp_lightning.table.build import BLOCK

#: Floor for ablation losses that are <= 0 (skipping the block did not hurt, or even helped).
ABLATION_FLOOR = 1e-6


def block_temperature(table: pd.DataFrame, values: pd.Series, block_loss: pd.Series,
                      temperature: float) -> tuple[pd.Series, dict[str, Any]]:
    """Rescale each block so its total is proportional to ``B^(1/T)``, keeping the within-block ranking.

    ``I'_g = I_g / sum(I_block) * B^(1/T)`` with ``block_loss`` = B aligned with ``table``.
    """
    floored = table.loc[block_loss <= 0, BLOCK].drop_duplicates()
    report: dict[str, Any] = {"temperature": temperature, "floor": ABLATION_FLOOR,
                              "floored_blocks": floored.to_dict("records")}
    b = block_loss.clip(lower=ABLATION_FLOOR).to_numpy()
    block_sum = values.groupby([table[k] for k in BLOCK]).transform("sum")
    share = np.where(block_sum > 0, values / block_sum.where(block_sum > 0, 1.0), 0.0)
    return pd.Series(share * np.power(b, 1.0 / temperature), index=values.index), report


def layer_tau(table: pd.DataFrame, values: pd.Series, layer_loss: pd.Series,
              tau: float) -> tuple[pd.Series, pd.Series, dict[str, Any]]:
    """Multiply layer l's importances by ``(L[l] / mean(L))^tau``; returns (values, factor, report)."""
    per_layer = pd.Series(layer_loss.to_numpy(), index=table["layer_idx"].to_numpy()).groupby(level=0).first()
    clipped = per_layer.clip(lower=ABLATION_FLOOR)
    factors = (clipped / clipped.mean()) ** tau
    factor = table["layer_idx"].map(factors)
    report = {"tau": tau, "floor": ABLATION_FLOOR, "mean_L": float(clipped.mean()),
              "floored_layers": [int(i) for i in per_layer.index[per_layer <= 0]]}
    return values * factor, factor, report


def depth_factor(table: pd.DataFrame, num_layers: int, alpha: float) -> pd.Series:
    """``1 + (1 - l/N) * alpha``: a prior that protects early layers (alpha = 0: all 1)."""
    return 1.0 + (1.0 - table["layer_idx"] / num_layers) * alpha
