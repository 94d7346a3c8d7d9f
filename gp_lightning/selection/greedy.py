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

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import BudgetError
from gp_lightning.selection.config import LayerLimits, SelectionConfig
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.result import Selection
from gp_lightning.table.build import score_order


def check_budget(layout: ModelLayout, config: SelectionConfig) -> int:
    """Return the number of parameters to remove; fail early when the constraints cannot allow it."""
    config.check_layout(layout)
    target = int(round(config.pruning_ratio * layout.total_params))
    available = need = 0
    for layer in layout.layers:
        limits = config.limits(layout, layer)
        available += limits.upper_bound(layout.attention_group_cost(layer), layout.mlp_channel_cost(layer))
        need += limits.need_params
    if available < target:
        raise BudgetError(
            f"pruning_ratio={config.pruning_ratio} asks for {target:,} parameters, but the candidate layers under "
            f"{config.describe()} allow at most {available:,} ({available / layout.total_params:.4f} of the "
            "model). Lower pruning_ratio or relax the constraints (layer_start/layer_end, max_rate, "
            "protected_layers, min_attention_groups/min_mlp_channels)."
        )
    if need > target:
        raise BudgetError(
            f"min_rate={config.min_rate} alone removes at least {need:,} parameters, more than "
            f"pruning_ratio={config.pruning_ratio} asks for ({target:,}). Lower min_rate or raise pruning_ratio."
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


@dataclass(frozen=True)
class _ScoreOrder:
    """The table's columns in ascending score order (only the chosen rows become a frame, at the end)."""

    order: np.ndarray
    costs: np.ndarray
    is_attention: np.ndarray
    layers: np.ndarray

    @classmethod
    def of(cls, table: pd.DataFrame) -> _ScoreOrder:
        order = score_order(table)
        return cls(order, table["cost"].to_numpy()[order], (table["group_type"] == "attention").to_numpy()[order],
                   table["layer_idx"].to_numpy()[order])


def _admitted_and_forced(units: _ScoreOrder, layout: ModelLayout, config: SelectionConfig
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the units that fit under its caps, and the lowest of them that min_rate forces out."""
    admitted = np.zeros(len(units.order), dtype=bool)
    forced = np.zeros(len(units.order), dtype=bool)
    for layer_idx, positions in pd.Series(units.layers).groupby(units.layers).indices.items():
        limits = config.limits(layout, layout.layers[int(layer_idx)])
        ok = positions[_admissible(units.is_attention[positions], units.costs[positions], limits)]
        admitted[ok] = True
        if limits.need_params > 0:
            reach = np.cumsum(units.costs[ok])
            if len(ok) == 0 or reach[-1] < limits.need_params:
                got = 0 if len(ok) == 0 else int(reach[-1])
                raise BudgetError(
                    f"Layer {layer_idx} must lose {limits.need_params:,} parameters (min_rate={config.min_rate}) "
                    f"but its caps allow only {got:,}. Lower min_rate or relax max_rate/early_layer_max_rate/"
                    "min_attention_groups/min_mlp_channels."
                )
            forced[ok[: int(np.searchsorted(reach, limits.need_params, side="left")) + 1]] = True
    return admitted, forced


def _taken(units: _ScoreOrder, admitted: np.ndarray, forced: np.ndarray, target: int, layout: ModelLayout,
           config: SelectionConfig) -> np.ndarray:
    """Positions taken: the forced units, then admitted ones by ascending score until the budget is met."""
    forced_pos = np.flatnonzero(forced)
    rest = np.flatnonzero(admitted & ~forced)
    forced_cost = int(units.costs[forced_pos].sum())
    if forced_cost > target:
        raise BudgetError(
            f"min_rate={config.min_rate} forces {forced_cost:,} parameters out, more than pruning_ratio="
            f"{config.pruning_ratio} asks for ({target:,}). Lower min_rate or raise pruning_ratio."
        )
    cumulative = forced_cost + np.cumsum(units.costs[rest])
    count = 0
    if forced_cost < target:
        if len(rest) == 0 or cumulative[-1] < target:
            could = int(cumulative[-1]) if len(rest) else forced_cost
            raise BudgetError(
                f"pruning_ratio={config.pruning_ratio} asks for {target:,} parameters, but under {config.describe()} "
                f"only {could:,} ({could / layout.total_params:.4f} of the model) can be removed. Lower "
                "pruning_ratio or relax the constraints."
            )
        count = int(np.searchsorted(cumulative, target, side="left")) + 1
    return np.r_[forced_pos, rest[:count]]


def select(table: pd.DataFrame, layout: ModelLayout, config: SelectionConfig) -> Selection:
    """The units to remove (lowest score per parameter first, under the constraints) and their plan."""
    target = check_budget(layout, config)
    units = _ScoreOrder.of(table)
    admitted, forced = _admitted_and_forced(units, layout, config)
    taken = _taken(units, admitted, forced, target, layout, config)
    chosen = table.take(units.order[taken]).reset_index(drop=True)
    groups: dict[int, set[int]] = {}
    channels: dict[int, set[int]] = {}
    kinds = zip(units.layers[taken].tolist(), units.is_attention[taken].tolist(), chosen["group_idx"].tolist(),
                strict=True)
    for layer_idx, attention, idx in kinds:
        (groups if attention else channels).setdefault(int(layer_idx), set()).add(int(idx))
    plan = PruningPlan.from_removals(layout, groups, channels, config.remove_empty_layers)
    result = Selection(chosen, plan, layout.total_params, layout.prunable_params, target, int(chosen["cost"].sum()))
    if config.allocation == "uniform_per_layer":
        from gp_lightning.selection.uniform import select_uniform

        return select_uniform(table, layout, config, result)
    return result
