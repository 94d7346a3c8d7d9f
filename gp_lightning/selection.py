"""Selection: take the lowest-score units until the parameter budget is met (fractional knapsack).

The budget is ``pruning_ratio x total parameters`` (embeddings and lm_head count in the total but
are never candidates). Greedy by importance per parameter is the optimal solution of the relaxed
knapsack; the last unit taken may overshoot the budget by less than its own cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gp_lightning.architecture import ModelLayout
from gp_lightning.errors import BudgetError
from gp_lightning.plan import PruningPlan
from gp_lightning.table import ranked


@dataclass
class Selection:
    """The chosen units and how the budget came out."""

    pruned: pd.DataFrame  # rows of the table, in the order they were taken
    plan: PruningPlan
    total_params: int
    prunable_params: int
    target_params: int
    removed_params: int

    @property
    def ratio(self) -> float:
        """Achieved fraction of ALL parameters removed."""
        return self.removed_params / self.total_params

    @property
    def ratio_of_prunable(self) -> float:
        return self.removed_params / self.prunable_params

    def summary(self) -> dict[str, float | int]:
        return {
            "total_params": self.total_params,
            "prunable_params": self.prunable_params,
            "target_removed_params": self.target_params,
            "removed_params": self.removed_params,
            "achieved_ratio": self.ratio,
            "achieved_ratio_of_prunable": self.ratio_of_prunable,
        }


def check_budget(
    layout: ModelLayout, pruning_ratio: float, layer_start: int = 0, layer_end: int | None = None
) -> tuple[int, int]:
    """Return ``(layer_end, target_params)``; fail early when the candidate layers cannot hold the budget."""
    end = layout.num_layers if layer_end is None else min(layer_end, layout.num_layers)
    if layer_start >= end:
        raise BudgetError(f"layer_start={layer_start} leaves no candidate layer (the model has {layout.num_layers}).")
    target = int(round(pruning_ratio * layout.total_params))
    available = sum(layout.layer_params(layer) for layer in layout.layers[layer_start:end])
    if available < target:
        raise BudgetError(
            f"pruning_ratio={pruning_ratio} asks for {target:,} parameters, but layers "
            f"[{layer_start}, {end}) hold only {available:,} prunable parameters "
            f"(at most {available / layout.total_params:.4f} of the model). Lower pruning_ratio or "
            "widen layer_start/layer_end."
        )
    return end, target


def select(
    table: pd.DataFrame,
    layout: ModelLayout,
    pruning_ratio: float,
    layer_start: int = 0,
    layer_end: int | None = None,
    remove_empty_layers: bool = False,
) -> Selection:
    end, target = check_budget(layout, pruning_ratio, layer_start, layer_end)
    candidates = ranked(table[(table["layer_idx"] >= layer_start) & (table["layer_idx"] < end)])
    cumulative = candidates["cost"].to_numpy().cumsum()
    count = int(np.searchsorted(cumulative, target, side="left")) + 1
    chosen = candidates.iloc[:count]
    groups: dict[int, set[int]] = {}
    channels: dict[int, set[int]] = {}
    for layer_idx, kind, idx in zip(chosen["layer_idx"], chosen["group_type"], chosen["group_idx"], strict=True):
        (groups if kind == "attention" else channels).setdefault(int(layer_idx), set()).add(int(idx))
    plan = PruningPlan.from_removals(layout, groups, channels, remove_empty_layers)
    return Selection(chosen.reset_index(drop=True), plan, layout.total_params, layout.prunable_params, target,
                     int(cumulative[count - 1]))


def layer_summary(layout: ModelLayout, plan: PruningPlan) -> pd.DataFrame:
    """Per layer: groups and channels before/after, parameters before/after, pruning rates."""
    rows = []
    for layer, lp in zip(layout.layers, plan.layers, strict=True):
        before = layout.layer_params(layer)
        after = layout.layer_params(layer, len(lp.keep_groups), len(lp.keep_channels))
        rows.append({
            "layer_idx": layer.index,
            "attention_groups_before": layer.num_kv_heads,
            "attention_groups_after": len(lp.keep_groups),
            "mlp_channels_before": layer.intermediate_size,
            "mlp_channels_after": len(lp.keep_channels),
            "params_before": before,
            "params_after": after,
            "attention_rate": 1 - len(lp.keep_groups) / layer.num_kv_heads if layer.num_kv_heads else 0.0,
            "mlp_rate": 1 - len(lp.keep_channels) / layer.intermediate_size if layer.intermediate_size else 0.0,
            "layer_rate": 1 - after / before if before else 0.0,
            "status": "dropped" if plan.dropped(layer.index) else ("empty" if lp.empty else "kept"),
        })
    return pd.DataFrame(rows)
