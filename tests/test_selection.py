"""Budget and costs: the global table, the fractional-knapsack selection and its limits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from gp_lightning.architecture import describe
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.errors import BudgetError
from gp_lightning.selection import SelectionConstraints, select
from gp_lightning.table import build_table


def _random_importance(layout, seed: int = 0) -> UnitImportance:
    g = torch.Generator().manual_seed(seed)
    return UnitImportance(
        {layer.index: torch.rand(layer.num_kv_heads, generator=g, dtype=torch.float64) for layer in layout.layers},
        {layer.index: torch.rand(layer.intermediate_size, generator=g, dtype=torch.float64) for layer in layout.layers},
    )


def test_unit_costs_sum_to_projection_parameters() -> None:
    model = tiny_model("llama", gqa=2, num_kv=2, layers=3)  # no biases
    layout = describe(model)
    table = build_table(layout, _random_importance(layout))
    fixed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "norm" in n or "lm_head" in n)
    assert int(table["cost"].sum()) == layout.prunable_params == layout.total_params - fixed


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_met_within_one_unit(ratio: float, seed: int) -> None:
    model = tiny_model("qwen2", gqa=2, num_kv=3, layers=3)
    layout = describe(model)
    table = build_table(layout, _random_importance(layout, seed))
    selection = select(table, layout, ratio)
    target = ratio * layout.total_params
    largest_unit = int(table["cost"].max())
    assert target <= selection.removed_params < target + largest_unit
    assert selection.removed_params == int(selection.pruned["cost"].sum())
    # every selected unit scores no higher than every unit left in place
    kept = table.merge(selection.pruned[["layer_idx", "group_type", "group_idx"]], how="left", indicator=True)
    kept = kept[kept["_merge"] == "left_only"]
    assert selection.pruned["score"].max() <= kept["score"].min()


def test_layer_range_limits_candidates_and_infeasible_budget_errors() -> None:
    model = tiny_model("llama", layers=4)
    layout = describe(model)
    table = build_table(layout, _random_importance(layout))
    selection = select(table, layout, 0.1, SelectionConstraints(layer_start=1, layer_end=3))
    assert set(selection.pruned["layer_idx"]) <= {1, 2}
    with pytest.raises(BudgetError, match="at most"):
        select(table, layout, 0.9, SelectionConstraints(layer_start=3))
