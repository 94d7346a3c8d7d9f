"""Budget and costs: the global table, the fractional-knapsack selection and its limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import selection as selection_config
from conftest import tiny_model

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.model.layout import describe
from gp_lightning.runtime.errors import BudgetError, ConfigError
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.greedy import select
from gp_lightning.selection.result import layer_summary
from gp_lightning.table.build import build_table, by_score


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
    selection = select(table, layout, selection_config(ratio))
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
    selection = select(table, layout, selection_config(0.1, layer_start=1, layer_end=3))
    assert set(selection.pruned["layer_idx"]) <= {1, 2}
    with pytest.raises(BudgetError, match="at most"):
        select(table, layout, selection_config(0.9, layer_start=3))


def _reference_select(table, layout, ratio: float, c: SelectionConfig) -> tuple[list[tuple], int]:
    """The constraints' meaning, unit by unit: scan each layer in score order skipping what breaks a cap,
    force each layer's first admissible units up to min_rate, then take admissible units globally."""
    rows = list(by_score(table).itertuples(index=False))
    state: dict[int, dict[str, int]] = {}
    admissible = []
    for row in rows:
        limits = c.limits(layout, layout.layers[row.layer_idx])
        s = state.setdefault(row.layer_idx, {"params": 0, "attention": 0, "mlp": 0})
        allowed = limits.max_groups if row.group_type == "attention" else limits.max_channels
        if limits.candidate and s["params"] + row.cost <= limits.cap_params and s[row.group_type] < allowed:
            s["params"] += row.cost
            s[row.group_type] += 1
            admissible.append(row)
    forced, reached = [], {}
    for row in admissible:
        need = c.limits(layout, layout.layers[row.layer_idx]).need_params
        if reached.get(row.layer_idx, 0) < need:
            reached[row.layer_idx] = reached.get(row.layer_idx, 0) + row.cost
            forced.append(row)
    target = int(round(ratio * layout.total_params))
    taken = list(forced)
    removed = sum(r.cost for r in forced)
    for row in admissible:
        if removed >= target:
            break
        if row not in forced:
            taken.append(row)
            removed += row.cost
    return [(r.layer_idx, r.group_type, r.group_idx) for r in taken], removed


@pytest.mark.parametrize("seed", range(40))
def test_constraints_hold_on_every_layer(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model("qwen2" if seed % 2 else "llama", gqa=2, num_kv=3, layers=6)
    layout = describe(model)
    table = build_table(layout, _random_importance(layout, seed))
    max_rate = float(rng.uniform(0.3, 1.0))
    limits = dict(
        layer_start=int(rng.integers(0, 2)), layer_end=int(rng.integers(4, 7)),
        min_rate=float(rng.uniform(0, 0.15)) if seed % 3 == 0 else 0.0, max_rate=max_rate,
        early_layers=int(rng.integers(0, 3)), early_layer_max_rate=float(rng.uniform(0.15, 0.5)),
        protected_layers=[int(i) for i in rng.choice(6, size=int(rng.integers(0, 3)), replace=False)],
        min_attention_groups=int(rng.integers(0, 3)), min_mlp_channels=int(rng.integers(0, 6)),
    )
    ratio = float(rng.uniform(0.02, 0.35))
    c = selection_config(ratio, **limits)
    expected, expected_removed = _reference_select(table, layout, ratio, c)
    target = int(round(ratio * layout.total_params))
    try:
        selection = select(table, layout, c)
    except BudgetError as exc:
        assert expected_removed < target or "min_rate" in str(exc)  # the reference could not meet it either
        return
    assert [tuple(x) for x in selection.pruned[["layer_idx", "group_type", "group_idx"]].to_numpy()] == expected
    assert selection.removed_params == expected_removed >= target
    summary = layer_summary(layout, selection.plan)
    for layer, row in zip(layout.layers, summary.itertuples(), strict=True):
        removed = row.params_before - row.params_after
        candidate = c.layer_start <= layer.index < c.layer_end and layer.index not in c.protected_layers
        if not candidate:
            assert removed == 0
            continue
        assert removed <= c.cap_rate(layer.index) * row.params_before + 1e-6
        assert removed >= c.min_rate * row.params_before - 1e-6
        assert row.attention_groups_after >= min(c.min_attention_groups, layer.num_kv_heads)
        assert row.mlp_channels_after >= min(c.min_mlp_channels, layer.intermediate_size)


def test_infeasible_constraints_say_how_much_could_be_met() -> None:
    model = tiny_model("llama", layers=4)
    layout = describe(model)
    table = build_table(layout, _random_importance(layout))
    with pytest.raises(BudgetError, match=r"at most [\d,]+ \(0\.\d+ of the model\)"):
        select(table, layout, selection_config(0.5, max_rate=0.2))
    with pytest.raises(BudgetError, match="min_rate=0.5 alone removes"):
        select(table, layout, selection_config(0.05, min_rate=0.5))
    with pytest.raises(ConfigError, match="protected_layers"):
        select(table, layout, selection_config(0.05, protected_layers=[7]))
    with pytest.raises(ConfigError, match="min_rate"):
        selection_config(0.1, min_rate=0.5, max_rate=0.4)
    # caps that forbid whole attention groups can leave less than the bound computed up front
    with pytest.raises(BudgetError, match="can be removed"):
        select(table, layout, selection_config(0.3, max_rate=0.45, min_mlp_channels=24))
