"""What selection produced: the chosen units, the plan, the budget figures and a per-layer summary."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.selection.plan import PruningPlan


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


def layer_summary(layout: ModelLayout, plan: PruningPlan, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per layer: groups and channels before/after, parameters before/after, pruning rates, and (given
    the table) the layer's share of the model's total importance."""
    share = None
    if table is not None:
        per_layer = table.groupby("layer_idx")["importance"].sum()
        share = per_layer / per_layer.sum()
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
            "importance_share": float(share.get(layer.index, 0.0)) if share is not None else float("nan"),
            "status": "dropped" if plan.dropped(layer.index) else ("empty" if lp.empty else "kept"),
        })
    return pd.DataFrame(rows)


def with_plan(selection: Selection, plan: PruningPlan, table: pd.DataFrame) -> Selection:
    """The same budget with another choice of units inside the blocks (compensation-aware): the removed
    units of ``plan`` as rows of ``table``, in score order."""
    removed = {(lp.index, "attention", g) for lp in plan.layers for g in set(range(lp.num_groups)) - set(lp.keep_groups)}
    removed |= {(lp.index, "mlp", c) for lp in plan.layers for c in set(range(lp.num_channels)) - set(lp.keep_channels)}
    keys = zip(table["layer_idx"].tolist(), table["group_type"].tolist(), table["group_idx"].tolist(), strict=True)
    rows = [i for i, key in enumerate(keys) if key in removed]
    pruned = table.iloc[rows].reset_index(drop=True)
    return Selection(pruned, plan, selection.total_params, selection.prunable_params, selection.target_params,
                     int(pruned["cost"].sum()))
