"""Compensation: the refit is the least-squares solution, never worse than slicing, and surgery writes it exactly."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.compensation.refit import (
    DAMPING_LADDER,
    held_out_choice,
    obs_refit,
    obs_removals,
    ranking_rows,
    refit,
)
from gp_lightning.compensation.run import BLOCKS, Compensation, compensate
from gp_lightning.export.checkpoint import load_pruned, save_pruned
from gp_lightning.model.layout import decoder_layers, describe
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan

WINDOWS = torch.randint(0, 101, (12, 16), generator=torch.Generator().manual_seed(0))


def _projection_data(seed: int = 0, tokens: int = 300, features: int = 24, out: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g, dtype=torch.float64) @ torch.randn(
        features, features, generator=g, dtype=torch.float64) + 0.5
    weight = torch.randn(out, features, generator=g, dtype=torch.float64)
    bias = torch.randn(out, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], dim=1)
    return x, weight, bias, xa.T @ xa


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.3])
def test_refit_is_the_closed_form_least_squares_solution(damping: float) -> None:
    x, weight, bias, gram = _projection_data()
    kept = torch.tensor([0, 2, 3, 5, 8, 9, 13, 14, 17, 20, 23])
    fit = refit(weight, bias, gram, kept, "least_squares", damping)
    assert fit.method == "least_squares" and fit.fallback is None
    # reference: numpy least squares on the stacked system [X_K 1; sqrt(lam) I 0] V^T = [Y; sqrt(lam) W_K^T]
    y = (x @ weight.T + bias).numpy()
    xk = np.concatenate([x[:, kept].numpy(), np.ones((x.shape[0], 1))], axis=1)
    lam = damping * float(gram[kept][:, kept].diagonal().mean())
    ridge = np.sqrt(lam) * np.eye(len(kept), len(kept) + 1)
    a = np.concatenate([xk, ridge], axis=0)
    b = np.concatenate([y, np.sqrt(lam) * weight[:, kept].numpy().T], axis=0)
    reference = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(fit.weight.numpy(), reference[:, :-1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.bias.numpy(), reference[:, -1], rtol=1e-7, atol=1e-9)
    # the reported errors are the measured ones
    sliced = x[:, kept] @ weight[:, kept].T + bias
    refit_out = x[:, kept] @ fit.weight.T + fit.bias
    norm = np.linalg.norm(y)
    assert fit.error_before == pytest.approx(np.linalg.norm(y - sliced.numpy()) / norm, rel=1e-5)
    assert fit.error_after == pytest.approx(np.linalg.norm(y - refit_out.numpy()) / norm, rel=1e-5)
    assert fit.error_after < fit.error_before


def test_bias_only_keeps_the_output_mean_and_no_method_is_worse_than_slicing() -> None:
    x, weight, bias, gram = _projection_data(seed=1)
    kept = torch.arange(0, 24, 2)
    flap = refit(weight, bias, gram, kept, "bias")
    removed = torch.arange(1, 24, 2)
    expected = bias + weight[:, removed] @ x[:, removed].mean(dim=0)
    torch.testing.assert_close(flap.bias, expected)
    torch.testing.assert_close(flap.weight, weight[:, kept])
    none = refit(weight, bias, gram, kept, "none")
    assert none.error_after == none.error_before and torch.equal(none.weight, weight[:, kept])
    ls = refit(weight, bias, gram, kept, "least_squares")
    assert ls.error_after <= flap.error_after <= none.error_after


def test_an_indefinite_system_falls_back_and_says_why() -> None:
    _, weight, bias, gram = _projection_data(seed=2)
    broken = gram.clone()
    broken[:-1, :-1] = -torch.eye(24, dtype=torch.float64)  # no Gram matrix of data looks like this
    fit = refit(weight, bias, broken, torch.arange(12), "least_squares", 0.0)
    assert fit.method in ("bias", "none") and "not positive definite" in fit.fallback


def test_obs_picks_the_units_whose_removal_costs_least() -> None:
    from itertools import combinations

    _, weight, bias, gram = _projection_data(seed=3, features=32)
    best = min(combinations(range(8), 2), key=lambda gone: refit(
        weight, bias, gram, torch.tensor([c for u in range(8) if u not in gone for c in range(u * 4, u * 4 + 4)]),
        "least_squares", 0.0).error_after)
    assert obs_removals(weight, gram, 4, 2, 0.0) == sorted(best)


@pytest.mark.parametrize("width,count", [(1, 9), (4, 2)])
def test_the_obs_walk_leaves_the_least_squares_refit_of_its_choice(width: int, count: int) -> None:
    """No second system is solved after OBS: its updated weights are the ridge refit of the units it kept."""
    x, weight, bias, gram = _projection_data(seed=4, features=32)
    gone, fit = obs_refit(weight, bias, gram, width, count, 0.01)
    assert gone == obs_removals(weight, gram, width, count, 0.01) and len(gone) == count
    kept = torch.tensor([u * width + i for u in range(32 // width) if u not in gone for i in range(width)])
    # the walk damps with the mean diagonal of all inputs, refit with that of the kept ones: the same ridge
    same_ridge = 0.01 * float(gram.diagonal()[:-1].mean()) / float(gram[kept, kept].mean())
    reference = refit(weight, bias, gram, kept, "least_squares", same_ridge)
    assert fit.method == "least_squares" and fit.fallback is None
    torch.testing.assert_close(fit.weight, reference.weight, rtol=2e-3, atol=2e-3 * float(reference.weight.abs().max()))
    torch.testing.assert_close(fit.bias, reference.bias, rtol=2e-3, atol=2e-3 * float(reference.bias.abs().max()))
    assert fit.error_after == pytest.approx(reference.error_after, rel=1e-2)
    assert fit.error_before == pytest.approx(reference.error_before, rel=1e-9)
    assert fit.error_after < fit.error_before


def _plan(dense: torch.nn.Module, last_only: bool = False) -> PruningPlan:
    layout = describe(dense)
    if last_only:  # the last block only: what enters it is the same whether earlier layers were refit or not
        return PruningPlan.from_removals(layout, {}, {3: set(range(0, 24, 3))})
    return PruningPlan.from_removals(layout, {0: {1}, 2: {0, 1, 2}}, {1: set(range(0, 24, 3)), 3: set(range(10))})


CASES = [("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}), ("mistral", {})]


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("arch,extra", CASES)
def test_compensation_lowers_every_error_and_surgery_writes_it(arch: str, extra: dict, sequential: bool,
                                                               tmp_path: Path) -> None:
    dense = tiny_model(arch, layers=4, gqa=2, num_kv=3, **extra)
    layout = describe(dense)
    work = copy.deepcopy(dense)
    result = compensate(work, layout, _plan(dense), WINDOWS, CompensationConfig(sequential=sequential), 4)
    assert len(result.report) == 4  # every block that lost units: 2 o_proj (one emptied), 2 down_proj
    for entry in result.report:
        assert entry["relative_error_after"] <= entry["relative_error_before"] + 1e-12
    assert any(e["relative_error_after"] < 0.8 * e["relative_error_before"] for e in result.report)
    pruned = apply_plan(work, layout, result.plan, {}, result)
    reference = _compensated_reference(dense, layout, result)
    with torch.no_grad():
        expected, got = reference(input_ids=WINDOWS).logits, pruned(input_ids=WINDOWS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # surgery writes exactly the refit
    # the checkpoint carries it: output biases in the config, both loaders give the same logits
    save_pruned(pruned, None, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    own = set(result.own_bias)
    added = {(layer, block) for layer, block in result.biases if (layer, block) not in own}
    listed = {(new, block) for block, layers in config["output_bias"].items() for new in layers}
    kept = result.plan.kept_layers
    assert {(kept.index(layer), block) for layer, block in added} <= listed
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "model")(input_ids=WINDOWS).logits, got)


def _compensated_reference(dense: torch.nn.Module, layout: object, result: Compensation) -> torch.nn.Module:
    """The dense model with the removed columns zeroed and the refit written in by hand (biases as hooks)."""
    model = copy.deepcopy(dense)
    for (index, block), lp in ((key, result.plan.layers[key[0]]) for key in itertools.product(
            range(len(result.plan.layers)), dict(BLOCKS))):
        projection = getattr(getattr(decoder_layers(model)[index], block), dict(BLOCKS)[block])
        layer = layout.layers[index]
        width = layer.queries_per_kv * layer.head_dim if block == "self_attn" else 1
        units = lp.keep_groups if block == "self_attn" else lp.keep_channels
        kept = torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)
        weight = result.weights.get((index, block), projection.weight[:, kept])  # a block kept as it was: sliced
        with torch.no_grad():
            full = torch.zeros_like(projection.weight)
            full[:, kept] = weight
            projection.weight.copy_(full)
            if (index, block) not in result.weights:
                continue
            bias = result.biases[(index, block)]
            if projection.bias is not None:
                projection.bias.copy_(bias)
            else:
                projection.register_forward_hook(lambda module, args, out, b=bias: out + b)
    return model


def test_sequential_equals_non_sequential_when_only_the_last_block_is_pruned() -> None:
    dense = tiny_model("qwen2", layers=4, gqa=2, num_kv=3)
    layout = describe(dense)
    runs = [compensate(copy.deepcopy(dense), layout, _plan(dense, last_only=True), WINDOWS,
                       CompensationConfig(sequential=sequential), 4) for sequential in (False, True)]
    assert runs[0].weights.keys() == runs[1].weights.keys() == {(3, "mlp")}
    for key in runs[0].weights:
        torch.testing.assert_close(runs[1].weights[key], runs[0].weights[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[1].biases[key], runs[0].biases[key], rtol=1e-5, atol=1e-6)
    nothing = compensate(copy.deepcopy(dense), layout, PruningPlan.from_removals(layout, {}, {}), WINDOWS,
                         CompensationConfig(), 4)
    assert not nothing.weights and not nothing.report


@pytest.mark.parametrize("arch,extra", [CASES[0], CASES[1]])
def test_offloaded_layers_and_streamed_surgery_write_the_in_memory_refit(arch: str, extra: dict,
                                                                        tmp_path: Path) -> None:
    """The dense model in memory vs read from disk one layer at a time, then streamed surgery: the same bytes."""
    from safetensors.torch import load_file

    from gp_lightning.model.sharded import meta_model
    from gp_lightning.surgery.streamed import stream_prune

    dense = tiny_model(arch, layers=4, gqa=2, num_kv=3, **extra)
    dense.save_pretrained(tmp_path / "dense")
    layout = describe(dense)
    result = compensate(copy.deepcopy(dense), layout, _plan(dense), WINDOWS, CompensationConfig(), 4)
    offloaded_model = meta_model(tmp_path / "dense", torch.float32)
    offloaded = compensate(offloaded_model, layout, _plan(dense), WINDOWS, CompensationConfig(), 4)
    assert offloaded.plan.to_json() == result.plan.to_json() and offloaded.weights.keys() == result.weights.keys()
    assert all(torch.equal(offloaded.weights[k], w) and torch.equal(offloaded.biases[k], result.biases[k])
               for k, w in result.weights.items())
    assert all(p.is_meta for p in offloaded_model.model.layers.parameters())  # no layer stayed in memory
    save_pruned(apply_plan(copy.deepcopy(dense), layout, result.plan, {}, result), None, tmp_path / "memory")
    stream_prune(tmp_path / "dense", layout, offloaded.plan, {}, tmp_path / "streamed", compensation=offloaded)
    a, b = (load_file(tmp_path / kind / "model.safetensors") for kind in ("memory", "streamed"))
    assert a.keys() == b.keys() and any(k.endswith("_output_bias") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / kind / "config.json").read_text()) for kind in ("memory", "streamed")]
    assert configs[0]["output_bias"] == configs[1]["output_bias"]


def test_obs_scores_of_three_192_wide_groups_are_the_formula() -> None:
    """SmolLM2's GQA groups (three blocks of 3 x 64 columns) on 2 threads: MKL's batched LU inverse failed there
    ("Pivots given to lu_solve must all be greater or equal to 1"); the Cholesky scores equal the formula."""
    from gp_lightning.compensation.refit import _obs_scores

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 576, generator=g)
    inverse = torch.linalg.inv((x.T @ x + 5 * torch.eye(576)).double()).float()
    blocks = torch.stack([inverse[u * 192 : (u + 1) * 192, u * 192 : (u + 1) * 192] for u in range(3)])
    weight = torch.randn(64, 576, generator=g)
    alive = torch.tensor([True, False, True])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scores = _obs_scores(weight.T.contiguous(), blocks, alive)
    finally:
        torch.set_num_threads(threads)
    for u in (0, 2):
        w = weight[:, u * 192 : (u + 1) * 192].double()
        expected = float(torch.trace(w @ torch.linalg.inv(blocks[u].double()) @ w.T))
        assert float(scores[u]) == pytest.approx(expected, rel=1e-4)
    assert scores[1] == float("inf")


def test_the_output_energy_by_halves_is_the_trace() -> None:
    """``tr(T G T^T)`` from the halves of G (one split at 300 columns, two at 500) is the full product's."""
    from gp_lightning.compensation.refit import _energy

    g = torch.Generator().manual_seed(5)
    for columns in (300, 500):
        x = torch.randn(1000, columns, generator=g, dtype=torch.float64)
        target = torch.randn(20, columns, generator=g, dtype=torch.float64)
        expected = float(torch.trace(target @ x.T @ x @ target.T))
        assert _energy(target, x.T @ x) == pytest.approx(expected, rel=1e-12)


def test_the_gram_from_upper_blocks_is_the_full_gram() -> None:
    """The Gram update computes only the blocks on and above the diagonal (three at 300 columns); mirrored, it is
    ``sum [x; 1] [x; 1]^T``."""
    from gp_lightning.compensation.layerwise import Gram, block_edges

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 50, 300, generator=g)
    gram = Gram(300, torch.device("cpu"))
    gram.add(x, torch.ones(2))
    rows = torch.cat([x.reshape(-1, 300), torch.ones(100, 1)], dim=1).double()
    assert len(block_edges(300)) == 4
    torch.testing.assert_close(gram.value.double(), rows.T @ rows, rtol=1e-5, atol=1e-3)


def test_the_walks_small_inverses() -> None:
    """The OBS walk's block inverses: 1 x 1 directly (a reciprocal), larger ones by their Cholesky factor."""
    from gp_lightning.compensation.refit import _spd_inverse

    one = torch.tensor([[3.7e-4]])
    assert float(_spd_inverse(one)) == pytest.approx(1 / 3.7e-4, rel=1e-6)
    two = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    torch.testing.assert_close(_spd_inverse(two), torch.linalg.inv(two))


@pytest.mark.parametrize("own_bias", [False, True])
def test_the_projection_on_its_kept_columns_is_the_masked_projection(own_bias: bool) -> None:
    """What the sequential walk applies after a refit (the kept input columns only, the refit bias) equals the
    masked projection it writes into the running model, and both equal one masked by hand: removed columns zero,
    the bias its own or an added forward hook."""
    from gp_lightning.compensation.layerwise import AddedBias
    from gp_lightning.compensation.refit import Refit
    from gp_lightning.compensation.run import write_refit

    g = torch.Generator().manual_seed(7)
    projection = torch.nn.Linear(40, 12, bias=own_bias)
    reference = torch.nn.Linear(40, 12, bias=True)
    kept = torch.tensor([0, 3, 4, 9, 17, 30, 39])
    fit = Refit(torch.randn(12, len(kept), generator=g, dtype=torch.float64),
                torch.randn(12, generator=g, dtype=torch.float64), "least_squares", 1.0, 0.5)
    with torch.no_grad():
        reference.weight.zero_()
        reference.weight[:, kept] = fit.weight.float()
        reference.bias.copy_(fit.bias.float())
    hooks = AddedBias()
    compact = write_refit(projection, kept, fit, hooks)
    x = torch.randn(3, 5, 40, generator=g)
    with torch.no_grad():
        expected, written = reference(x), projection(x)
    hooks.remove()
    assert compact.weight.shape == (12, len(kept))
    torch.testing.assert_close(compact(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(written, expected, rtol=1e-5, atol=1e-5)


def test_grams_joined_in_one_reused_buffer_equal_fresh_ones() -> None:
    """Every Gram of a walk joins its batches in one scratch buffer: a smaller Gram after a larger one (and one with
    padding windows) comes out as with a fresh buffer."""
    from gp_lightning.compensation.layerwise import Batches, Scratch, gram_of

    g = torch.Generator().manual_seed(8)
    scratch = Scratch()
    for features, weights in ((64, torch.ones(2)), (24, torch.tensor([1.0, 0.0])), (64, torch.ones(2))):
        inputs = [torch.randn(2, 7, features, generator=g) for _ in range(3)]
        batches = Batches([], [], [weights] * 3)
        reused = gram_of(inputs, batches, scratch)
        assert torch.equal(reused, gram_of(inputs, batches))
        rows = torch.cat([x[weights > 0].reshape(-1, features) for x in inputs])
        assert int(reused[-1, -1]) == rows.shape[0]


def _held_out_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kept: torch.Tensor, fit) -> float:
    """The relative output error of ``fit`` on the tokens ``x``, by products over the tokens (not the Gram)."""
    y = x @ weight.T + bias
    got = x[:, kept] @ fit.weight.double().T + fit.bias.double()
    return float((y - got).square().sum() / y.square().sum()) ** 0.5


@pytest.mark.parametrize("train_tokens,expect_refit", [(14, False), (3000, True)])
def test_held_out_choice_measures_every_candidate_and_never_keeps_one_worse_than_bias(train_tokens: int,
                                                                                       expect_refit: bool) -> None:
    """Fit on 14 tokens (12 unknowns an output) and the refit overfits: the held-out tokens choose slicing or the
    bias; on 3,000 the refit wins. 160 outputs: the candidates are ranked on every second one (80 rows), and each
    held-out error is the token-level error of the candidate fit on those rows."""
    x, weight, bias, _ = _projection_data(seed=5, tokens=train_tokens + 400, out=160)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    train, held = (part.T @ part for part in (xa[:train_tokens], xa[train_tokens:]))  # other tokens, same law
    x_held = x[train_tokens:]
    kept = torch.tensor([0, 2, 3, 5, 8, 9, 13, 14, 17, 20, 23])
    rows = ranking_rows(160)
    assert torch.equal(rows, torch.arange(0, 160, 2))
    choice = held_out_choice(weight, bias, train, held, kept, "least_squares", 1e-4)
    assert set(choice.errors) == {"none", "bias", *(f"least_squares@{m:g}" for m in DAMPING_LADDER)}
    for name, error in choice.errors.items():
        method, _, multiple = name.partition("@")
        fit = refit(weight[rows], bias[rows], train, kept, method, 1e-4 * float(multiple or 1))
        assert error == pytest.approx(_held_out_error(x_held, weight[rows], bias[rows], kept, fit), rel=1e-4), name
    assert choice.errors[choice.chosen] == min(choice.errors.values()) <= choice.errors["bias"]
    assert (choice.method == "least_squares") == expect_refit
    # on all 160 rows, the chosen refit is no worse than the bias on the held-out tokens either
    full = {name: _held_out_error(x_held, weight, bias, kept, refit(weight, bias, train, kept, name, 1e-4 * (
        choice.damping or 1.0))) for name in (choice.method, "bias")}
    assert full[choice.method] <= full["bias"]


def _realistic_projection(seed: int, train_tokens: int, held_tokens: int = 512, features: int = 256, out: int = 384):
    """Correlated inputs of uneven scales (a few outlier features ten times larger, like an MLP's massive
    activations), small weights: the train and held-out Grams, and the kept columns (70%)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64) / features ** 0.5
    scales = torch.rand(features, generator=g, dtype=torch.float64).pow(3) * 3 + 0.05
    x = (torch.randn(train_tokens + held_tokens, features, generator=g, dtype=torch.float64) @ mix + 0.3) * scales
    x[:, :4] *= 8
    weight = torch.randn(out, features, generator=g, dtype=torch.float64) * 0.05
    bias = torch.randn(out, generator=g, dtype=torch.float64) * 0.01
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    train, held = xa[:train_tokens].T @ xa[:train_tokens], xa[train_tokens:].T @ xa[train_tokens:]
    kept = torch.sort(torch.randperm(features, generator=g)[: int(features * 0.7)]).values
    return weight, bias, train, held, kept


@pytest.mark.parametrize("seed,train_tokens,damping,expected", [
    (0, 200, 0.03, "least_squares@3"), (1, 200, 0.03, "least_squares@10"), (0, 200, 0.003, "least_squares@30"),
    (0, 4000, 0.01, "least_squares@1")])
def test_ranking_on_a_subset_of_rows_chooses_what_all_rows_choose(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                                   train_tokens: int, damping: float,
                                                                   expected: str) -> None:
    """The damping that fits best is shared by the rows: 77 of 384 rows choose what all of them choose, across
    cases whose best damping differs (fewer tokens, more damping)."""
    from gp_lightning.compensation import refit as refit_module

    weight, bias, train, held, kept = _realistic_projection(seed, train_tokens)
    assert len(ranking_rows(384)) == 77
    subset = held_out_choice(weight, bias, train, held, kept, "least_squares", damping)
    monkeypatch.setattr(refit_module, "RANKING_ROWS", 10**9)  # every row
    every = held_out_choice(weight, bias, train, held, kept, "least_squares", damping)
    assert subset.chosen == every.chosen == expected
    assert subset.errors != every.errors  # the subset really is one


def test_compensation_applies_what_the_held_out_windows_chose() -> None:
    dense = tiny_model("llama", layers=4, gqa=2, num_kv=3, attention_bias=True, mlp_bias=True)
    result = compensate(copy.deepcopy(dense), describe(dense), _plan(dense), WINDOWS, CompensationConfig(), 4)
    for entry in result.report:
        errors, chosen = entry["held_out_errors"], entry["held_out_choice"]
        assert errors[chosen] <= errors["bias"] and entry["method"] == chosen.split("@")[0], entry
    off = compensate(copy.deepcopy(dense), describe(dense), _plan(dense), WINDOWS,
                     CompensationConfig(compensation_holdout=0), 4)
    assert all(entry["held_out_errors"] is None for entry in off.report)
    # 3 windows hold none out (every 4th is held): the refit without a hold-out, not a choice among empty errors
    few, plain = (compensate(copy.deepcopy(dense), describe(dense), _plan(dense), WINDOWS[:3],
                             CompensationConfig(compensation_holdout=h), 4) for h in (0.25, 0))
    assert all(entry["held_out_errors"] is None for entry in few.report)
    for key, weight in plain.weights.items():
        torch.testing.assert_close(few.weights[key], weight, rtol=0, atol=0)
