"""Take the lowest-score units until the parameter budget is met (a fractional knapsack), under constraints.

The budget is ``pruning_ratio x total parameters`` (embeddings and lm_head count in the total but
are never candidates). Greedy by importance per parameter is the optimal solution of the relaxed
knapsack; the last unit taken may overshoot the budget by less than its own cost.

Constraints act per layer, so they are resolved per layer first: walking a layer's units in score
order, a unit is *admissible* if it fits under the layer's rate cap and unit-count floors given the
admissible units before it (a unit that does not fit is skipped, a cheaper one after it may still
fit). Units a layer needs to reach ``min_rate`` are *forced*: its lowest-score admissible units.
Global selection then takes the forced units, then admissible units in score order until the
budget is met. This equals scanning the whole table in score order and skipping units that break
a cap, because the caps of different layers do not interact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import BudgetError
from gp_lightning.selection.constraints import LayerLimits, SelectionConstraints
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.result import Selection
from gp_lightning.table.build import rank_order


def check_budget(layout: ModelLayout, pruning_ratio: float, constraints: SelectionConstraints | None = None) -> int:
    """Return the number of parameters to remove; fail early when the constraints cannot allow it."""
    constraints = constraints or SelectionConstraints()
    constraints.check_layout(layout)
    target = int(round(pruning_ratio * layout.total_params))
    available = need = 0
    for layer in layout.layers:
        limits = constraints.limits(layout, layer)
        available += limits.upper_bound(layout.attention_group_cost(layer), layout.mlp_channel_cost(layer))
        need += limits.need_params
    if available < target:
        raise BudgetError(
            f"pruning_ratio={pruning_ratio} asks for {target:,} parameters, but the candidate layers under "
            f"{constraints.describe()} allow at most {available:,} ({available / layout.total_params:.4f} of the "
            "model). Lower pruning_ratio or relax the constraints (layer_start/layer_end, max_rate, "
            "protected_layers, min_attention_groups/min_mlp_channels)."
        )
    if need > target:
        raise BudgetError(
            f"min_rate={constraints.min_rate} alone removes at least {need:,} parameters, more than "
            f"pruning_ratio={pruning_ratio} asks for ({target:,}). Lower min_rate or raise pruning_ratio."
        )
    return target


def _admissible(is_attention: np.ndarray, costs: np.ndarray, limits: LayerLimits) -> np.ndarray:
    """Mask of one layer's units (in score order) that fit under its caps, skipping those that do not."""
    admitted = np.zeros(len(costs), dtype=bool)
    if not limits.candidate or len(costs) == 0:
        return admitted
    room = limits.cap_params
    left = {True: limits.max_groups, False: limits.max_channels}
    # runs of consecutive units of one kind share one cost: take a prefix of each run
    changes = np.flatnonzero(np.diff(is_attention.astype(np.int8))) + 1
    for start, end in zip(np.r_[0, changes], np.r_[changes, len(costs)], strict=True):
        kind, cost = bool(is_attention[start]), int(costs[start])
        take = min(end - start, left[kind], room // cost)
        if take > 0:
            admitted[start : start + take] = True
            room -= take * cost
            left[kind] -= take
    return admitted


def select(
    table: pd.DataFrame,
    layout: ModelLayout,
    pruning_ratio: float,
    constraints: SelectionConstraints | None = None,
    remove_empty_layers: bool = False,
) -> Selection:
    constraints = constraints or SelectionConstraints()
    target = check_budget(layout, pruning_ratio, constraints)
    # the table in score order, as columns (only the chosen rows are gathered into a frame, at the end)
    order = rank_order(table)
    costs = table["cost"].to_numpy()[order]
    is_attention = (table["group_type"] == "attention").to_numpy()[order]
    layers = table["layer_idx"].to_numpy()[order]
    admitted = np.zeros(len(order), dtype=bool)
    forced = np.zeros(len(order), dtype=bool)
    for layer_idx, positions in pd.Series(layers).groupby(layers).indices.items():
        limits = constraints.limits(layout, layout.layers[int(layer_idx)])
        ok = positions[_admissible(is_attention[positions], costs[positions], limits)]
        admitted[ok] = True
        if limits.need_params > 0:
            reach = np.cumsum(costs[ok])
            if len(ok) == 0 or reach[-1] < limits.need_params:
                got = 0 if len(ok) == 0 else int(reach[-1])
                raise BudgetError(
                    f"Layer {layer_idx} must lose {limits.need_params:,} parameters (min_rate={constraints.min_rate}) "
                    f"but its caps allow only {got:,}. Lower min_rate or relax max_rate/early_layer_max_rate/"
                    "min_attention_groups/min_mlp_channels."
                )
            forced[ok[: int(np.searchsorted(reach, limits.need_params, side="left")) + 1]] = True
    forced_pos = np.flatnonzero(forced)
    rest = np.flatnonzero(admitted & ~forced)
    forced_cost = int(costs[forced_pos].sum())
    if forced_cost > target:
        raise BudgetError(
            f"min_rate={constraints.min_rate} forces {forced_cost:,} parameters out, more than pruning_ratio="
            f"{pruning_ratio} asks for ({target:,}). Lower min_rate or raise pruning_ratio."
        )
    cumulative = forced_cost + np.cumsum(costs[rest])
    count = 0
    if forced_cost < target:
        if len(rest) == 0 or cumulative[-1] < target:
            could = int(cumulative[-1]) if len(rest) else forced_cost
            raise BudgetError(
                f"pruning_ratio={pruning_ratio} asks for {target:,} parameters, but under {constraints.describe()} "
                f"only {could:,} ({could / layout.total_params:.4f} of the model) can be removed. Lower "
                "pruning_ratio or relax the constraints."
            )
        count = int(np.searchsorted(cumulative, target, side="left")) + 1
    taken = np.r_[forced_pos, rest[:count]]
    chosen = table.take(order[taken]).reset_index(drop=True)
    groups: dict[int, set[int]] = {}
    channels: dict[int, set[int]] = {}
    units = zip(layers[taken].tolist(), is_attention[taken].tolist(), chosen["group_idx"].tolist(), strict=True)
    for layer_idx, attention, idx in units:
        (groups if attention else channels).setdefault(int(layer_idx), set()).add(int(idx))
    plan = PruningPlan.from_removals(layout, groups, channels, remove_empty_layers)
    return Selection(chosen, plan, layout.total_params, layout.prunable_params, target, int(chosen["cost"].sum()))
