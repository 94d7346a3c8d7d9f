"""``allocation: search``: the budget holds, variants are what surgery makes, the search never ends worse than its
seeds, a killed search resumes to the same result, and the pipeline writes and re-applies what it chose.

(Two ranks choosing exactly what one process chooses is in tests/test_distributed.py, in its shared launch.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calibrate, selection, tiny_model

from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.compensation.run import Compensation
from gp_lightning.model.layout import describe
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.search import run as search_run
from gp_lightning.search import variants
from gp_lightning.search.config import SearchConfig
from gp_lightning.search.evolution import Space, mutate
from gp_lightning.search.fitness import Candidates
from gp_lightning.search.step import plan_of, seeds
from gp_lightning.selection.greedy import check_budget, select
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan
from gp_lightning.table.build import build_table


def _setup(ratio: float = 0.3, layers: int = 4, **limits: object):
    model = tiny_model("llama", layers=layers, intermediate_size=64, attention_bias=False, mlp_bias=False)
    layout = describe(model)
    windows = torch.randint(0, 101, (18, 24), generator=torch.Generator().manual_seed(0))
    table = build_table(layout, calibrate(model, windows, 4))
    config = selection(ratio, **limits)
    target = check_budget(layout, config)
    return model, layout, windows, table, config, target


def _inputs(state: Path | None = None, resume: bool = False, generations: int = 5, **search: object):
    model, layout, windows, table, config, target = _setup()
    knapsack = select(table, layout, config).plan
    return search_run.SearchInputs(model, layout, table, seeds(table, layout, config, knapsack, target), windows[:12],
                                   windows[12:], target, config, CompensationConfig(),
                                   SearchConfig(search_generations=generations, search_stage_windows=[1], **search),
                                   4, 7, state, resume)


@pytest.mark.parametrize("limits", [{}, {"min_rate": 0.1, "max_rate": 0.6, "protected_layers": [1]}])
def test_mutations_keep_the_budget_and_every_limit(limits: dict) -> None:
    _, layout, _, table, config, target = _setup(0.35, layers=6, min_mlp_channels=4, **limits)
    space = Space.of(layout, config, target)
    kept = space.of_plan(select(table, layout, config).plan)
    assert space.feasible(kept)
    rng = np.random.default_rng(0)
    layers = space.layers
    changed = 0
    for step in (1, 8, 16) * 100:
        child = mutate(space, kept, rng, step)
        assert space.feasible(child)  # at least the target, every floor, cap and min_rate
        if space.removed(child) - target >= space.cost[layers:].min():  # slack left: no MLP block could take it
            for block in range(layers, 2 * layers):
                wider = child.copy()
                wider[block] += 1
                assert not space.feasible(wider), (block, child)
        changed += not np.array_equal(child, kept)
        kept = child
    assert changed > 150
    assert (kept[1::6] == space.dense[1::6]).all() if limits else True  # the protected layer is untouched


def _database(model, layout, windows, table, floors, config=None):
    from gp_lightning.compensation.layerwise import first_layer_inputs

    def batches():  # noqa: ANN202
        return first_layer_inputs(model, windows, torch.ones(len(windows)), 4)

    return variants.build(model, layout, batches, floors, config or CompensationConfig(), table, 2**30,
                          variants.GramStore(layout.num_layers))


def test_full_width_is_the_dense_model_bit_for_bit_and_variants_are_what_surgery_makes() -> None:
    model, layout, windows, table, config, target = _setup()
    space = Space.of(layout, config, target)
    dense_logits = model(windows[:2]).logits
    database = _database(model, layout, windows, table, space.floor.tolist())
    candidates = Candidates(database)
    kept = space.of_plan(select(table, layout, config).plan)
    candidates.apply(kept)
    masked = model(windows[:2]).logits
    # the pruned model surgery writes from the same kept units and refits
    layers = layout.num_layers
    weights, biases = {}, {}
    removed_groups, removed_channels = {}, {}
    for block in range(2 * layers):
        variant = database.variant(block, int(kept[block]))
        name = "self_attn" if block < layers else "mlp"
        units = set(database.orders[block][: database.units(block) - int(kept[block])])
        (removed_groups if block < layers else removed_channels)[block % layers] = units
        if units:
            weights[(block % layers, name)], biases[(block % layers, name)] = variant.weight, variant.bias
    plan = PruningPlan.from_removals(layout, removed_groups, removed_channels)
    candidates.apply(space.dense.copy())
    assert torch.equal(model(windows[:2]).logits, dense_logits)  # the full width: the dense weights, bit for bit
    candidates.restore()
    pruned = apply_plan(model, layout, plan, {}, Compensation(plan, weights, biases))
    torch.testing.assert_close(pruned(windows[:2]).logits, masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(masked, dense_logits, atol=1e-3)


def test_search_is_never_worse_than_its_seeds_and_reports_what_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(generations=6)
    result = search_run.search_allocation(inputs)
    # the parent's kept hidden states (mutants run from their first changed layer) change no figure and no choice
    original = search_run.Fitness.__init__

    def without_states(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        original(self, *args, **kwargs)
        self.keep = False

    monkeypatch.setattr(search_run.Fitness, "__init__", without_states)
    uncached = search_run.search_allocation(_inputs(generations=6))
    assert np.array_equal(uncached.kept, result.kept)
    assert uncached.report["history"] == [{**h, "seconds": u["seconds"]} for h, u in
                                          zip(result.report["history"], uncached.report["history"], strict=True)]
    report = result.report
    space = Space.of(inputs.layout, inputs.selection, inputs.target)
    assert space.feasible(result.kept)
    history = [entry["fitness"] for entry in report["history"]]
    assert history == sorted(history, reverse=True) and len(history) == 6
    assert all(report["chosen"]["fitness"] <= seed["fitness"] for seed in report["seeds"].values())
    assert report["chosen"]["held_out"] == min(report["held_out"].values())
    # measured again from scratch: the dense model was restored, and the figures are the chosen allocation's
    database = _database(inputs.model, inputs.layout, inputs.windows, inputs.table, space.floor.tolist())
    candidates = Candidates(database)
    fitness = search_run.Fitness(inputs.model, inputs.search_windows)
    candidates.apply(result.kept)
    assert fitness(report["windows"]["fitness"]) == pytest.approx(report["chosen"]["fitness"], rel=1e-6)
    candidates.restore()


def test_a_killed_search_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = search_run.search_allocation(_inputs(tmp_path / "whole.safetensors"))
    original = search_run._Search.generation
    calls = {"n": 0}

    def killed(self):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(search_run._Search, "generation", killed)
    inputs = _inputs(tmp_path / "state.safetensors")
    dense = {k: v.clone() for k, v in inputs.model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        search_run.search_allocation(inputs)
    assert all(torch.equal(v, dense[k]) for k, v in inputs.model.state_dict().items())  # left dense
    monkeypatch.setattr(search_run._Search, "generation", original)
    assert len(list((tmp_path / "search_variants").glob("*.safetensors"))) == 4  # the Grams, kept for the resume
    monkeypatch.setattr(variants, "dense_pass", None)  # the resume reads them: no pass over the windows
    resumed = search_run.search_allocation(_inputs(tmp_path / "state.safetensors", resume=True))
    assert not (tmp_path / "search_variants").exists()  # removed once the search is done
    assert np.array_equal(resumed.kept, whole.kept)
    assert [h["fitness"] for h in resumed.report["history"]] == [h["fitness"] for h in whole.report["history"]]
    with pytest.raises(ConfigError, match="other settings"):
        search_run.search_allocation(_inputs(tmp_path / "state.safetensors", resume=True, search_offspring=3))


def test_pipeline_writes_the_search_and_reapplies_its_widths(tmp_path: Path, tiny_checkpoint: Path,
                                                             wikitext: Path) -> None:
    from gp_lightning.pipeline import oneshot

    common = dict(model=str(tiny_checkpoint), dataset=str(wikitext / "valid.txt"), num_samples=8, seq_len=32,
                  batch_size=4, pruning_ratio=0.002, allocation="search", test_before_prune=False,
                  test_after_prune=False, save_model=False, search_generations=3)
    first = oneshot(**common, output=str(tmp_path / "a"))
    report = json.loads((tmp_path / "a" / "analysis" / "search.json").read_text())
    assert (tmp_path / "a" / "visualization" / "search.png").stat().st_size > 10_000
    plan = first.selection.plan
    assert [len(lp.keep_groups) for lp in plan.layers] == report["chosen"]["attention_groups"]
    assert [len(lp.keep_channels) for lp in plan.layers] == report["chosen"]["mlp_channels"]
    assert first.selection.removed_params >= first.selection.target_params
    again = oneshot(**common, output=str(tmp_path / "b"), search_widths=str(tmp_path / "a" / "analysis" / "search.json"))
    assert again.selection.plan.to_json() == plan.to_json()
    assert not (tmp_path / "b" / "search_state.safetensors").exists()
    with pytest.raises(ConfigError, match="search_widths"):
        oneshot(**{**common, "pruning_ratio": 0.003}, output=str(tmp_path / "c"),
                search_widths=str(tmp_path / "a" / "analysis" / "search.json"))


def test_plan_of_widths_keeps_each_blocks_lowest_score_units() -> None:
    _, layout, _, table, config, target = _setup()
    knapsack = select(table, layout, config).plan  # no caps: each layer's lowest-score units
    plan = plan_of(table, layout, config, Space.of(layout, config, target).of_plan(knapsack))
    assert [(lp.keep_groups, lp.keep_channels) for lp in plan.layers] == \
        [(lp.keep_groups, lp.keep_channels) for lp in knapsack.layers]
    assert plan.meta["allocation"] == "search"


def test_search_in_bfloat16_restores_the_model_and_beats_no_seed() -> None:
    """``precision: auto`` runs in bf16 on CPUs with AVX512-BF16 or AMX: the search's variants, fitness and restore
    must hold in the model's dtype there too (forced here, whatever this CPU is)."""
    inputs = _inputs(generations=3)
    inputs.model.to(torch.bfloat16)
    dense = {k: v.clone() for k, v in inputs.model.state_dict().items()}
    result = search_run.search_allocation(inputs)
    assert all(torch.equal(v, dense[k]) for k, v in inputs.model.state_dict().items())
    assert Space.of(inputs.layout, inputs.selection, inputs.target).feasible(result.kept)
    assert all(result.report["chosen"]["fitness"] <= s["fitness"] for s in result.report["seeds"].values())
