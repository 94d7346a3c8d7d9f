"""Uniform allocation: every layer keeps the same number of GQA groups and MLP channels (a stock-shaped model).

The global selection still decides how the budget splits between attention and MLP (its share of GQA
groups, spread evenly over the layers); the MLP channel count then meets the budget, and each layer
loses its own lowest-score units of the table. Minitron prunes to such homogeneous shapes because the
serving stacks (vLLM, TGI, TensorRT-LLM, llama.cpp's ``llama``) need one width for every layer.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import BudgetError
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.result import Selection, with_plan
from gp_lightning.table.build import score_order


def uniform_counts(layout: ModelLayout, config: SelectionConfig, global_groups: int, target: int) -> tuple[int, int]:
    """(GQA groups, MLP channels) every layer loses: the global selection's share of groups, then channels to
    meet ``target`` parameters; more groups if the channels alone cannot."""
    first = layout.layers[0]
    if not layout.uniform_widths:
        raise BudgetError("allocation: uniform_per_layer needs a model whose layers all have the same widths")
    max_groups = first.num_kv_heads - max(config.min_attention_groups, 1)
    max_channels = first.intermediate_size - max(config.min_mlp_channels, 1)
    group_cost = sum(layout.attention_group_cost(x) for x in layout.layers)
    channel_cost = sum(layout.mlp_channel_cost(x) for x in layout.layers)
    for groups in range(min(round(global_groups / layout.num_layers), max_groups), max_groups + 1):
        channels = math.ceil(max(target - groups * group_cost, 0) / channel_cost)
        if channels <= max_channels:
            return groups, channels
    raise BudgetError(f"pruning_ratio={config.pruning_ratio} cannot be met with every layer keeping at least "
                      f"{max(config.min_attention_groups, 1)} GQA group(s) and {max(config.min_mlp_channels, 1)} MLP "
                      "channel(s): lower pruning_ratio")


def lowest_units(table: pd.DataFrame, layout: ModelLayout, groups: list[int], channels: list[int],
                 remove_empty_layers: bool = False) -> PruningPlan:
    """The plan in which layer ``l`` loses its ``groups[l]`` GQA groups and ``channels[l]`` MLP channels of lowest
    score in the table."""
    ordered = table.iloc[score_order(table)]
    remove_groups: dict[int, set[int]] = {}
    remove_channels: dict[int, set[int]] = {}
    for (layer_idx, kind), rows in ordered.groupby(["layer_idx", "group_type"], sort=False):
        count = (groups if kind == "attention" else channels)[int(layer_idx)]
        target = remove_groups if kind == "attention" else remove_channels
        target[int(layer_idx)] = set(np.asarray(rows["group_idx"][:count], dtype=int).tolist())
    return PruningPlan.from_removals(layout, remove_groups, remove_channels, remove_empty_layers)


def uniform_plan(table: pd.DataFrame, layout: ModelLayout, config: SelectionConfig, global_plan: PruningPlan,
                 target: int) -> PruningPlan:
    """The uniform plan of ``target`` parameters, its share of GQA groups the global plan's."""
    removed_groups = sum(lp.num_groups - len(lp.keep_groups) for lp in global_plan.layers)
    groups, channels = uniform_counts(layout, config, removed_groups, target)
    plan = lowest_units(table, layout, [groups] * layout.num_layers, [channels] * layout.num_layers)
    plan.meta["allocation"] = "uniform_per_layer"
    return plan


def select_uniform(table: pd.DataFrame, layout: ModelLayout, config: SelectionConfig, global_choice: Selection
                   ) -> Selection:
    """The uniform selection, from the table and the global selection of the same budget."""
    plan = uniform_plan(table, layout, config, global_choice.plan, global_choice.target_params)
    return with_plan(dataclasses.replace(global_choice, plan=plan), plan, table)
