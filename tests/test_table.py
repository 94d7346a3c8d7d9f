"""Table transforms: clipping and normalization properties, T/tau corrections, every stage recorded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import calibrate, tiny_model
from conftest import selection as selection_config

from gp_lightning.calibration.module import token_loss_sum
from gp_lightning.model.layout import describe
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.selection.greedy import select
from gp_lightning.table.ablation import ablation_losses
from gp_lightning.table.build import build_table
from gp_lightning.table.config import TableConfig
from gp_lightning.table.corrections import ABLATION_FLOOR
from gp_lightning.table.normalize import CONSTANT_GROUP_VALUE
from gp_lightning.table.transforms import STAGE_COLUMNS, transform_table


def _random_table(seed: int, layers: int = 5) -> pd.DataFrame:
    """Heavy-tailed importances with very different scales per block, one constant block, some ties."""
    rng = np.random.default_rng(seed)
    parts = []
    for layer in range(layers):
        for kind, n, cost in (("attention", 4, 900), ("mlp", 30, 30)):
            values = rng.lognormal(0, 2, n) * 10.0 ** rng.integers(-6, 2)
            if layer == 2 and kind == "mlp":
                values[:] = 0.5  # a constant block
            if layer == 3:
                values[::5] = values[0]  # ties
            parts.append(pd.DataFrame({"layer_idx": layer, "group_type": kind, "group_idx": np.arange(n),
                                       "cost": cost, "importance_raw": values}))
    return pd.concat(parts, ignore_index=True)


def _groups(table: pd.DataFrame, level: str):
    return table.groupby(["layer_idx"] if level == "layer" else ["layer_idx", "group_type"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", ["layer", "block"])
@pytest.mark.parametrize("method", ["minmax", "zscore", "log", "sqrt"])
def test_normalization_properties(method: str, level: str, seed: int) -> None:
    raw = _random_table(seed)
    table, report = transform_table(raw, TableConfig(normalization=method, normalization_level=level), 5)
    assert np.isfinite(table[STAGE_COLUMNS].drop(columns=["B", "L"]).to_numpy()).all()
    assert report["normalization"]["method"] == method
    for _, group in _groups(table, level):
        x, y = group["importance_raw"].to_numpy(), group["importance_normalized"].to_numpy()
        order = np.argsort(x, kind="stable")
        assert (np.diff(y[order]) >= -1e-12).all(), "order within the normalization unit is preserved"
        if method == "sqrt":
            np.testing.assert_allclose(y, np.sqrt(x))
            continue
        if np.ptp(x) == 0:
            assert (y == CONSTANT_GROUP_VALUE).all()
            continue
        assert y.min() == pytest.approx(0.0, abs=1e-12)
        if method in ("minmax", "log"):
            assert y.max() == pytest.approx(1.0) and ((y >= 0) & (y <= 1)).all()
        else:  # zscore, shifted to a minimum of 0: (x - min) / std
            assert y.max() == pytest.approx(np.ptp(x) / x.std())
            np.testing.assert_allclose(y, (x - x.mean()) / x.std() - ((x - x.mean()) / x.std()).min(), atol=1e-9)
    np.testing.assert_allclose(table["score"], table["importance"] / table["cost"])


@pytest.mark.parametrize("low,high", [(5, 95), (None, 90), (10, None)])
def test_clipping_to_whole_table_percentiles(low: float | None, high: float | None) -> None:
    raw = _random_table(0)
    table, report = transform_table(raw, TableConfig(clip_percentile_low=low, clip_percentile_high=high), 5)
    x, y = table["importance_raw"], table["importance_clipped"]
    lo = np.percentile(raw["importance_raw"], low) if low is not None else -np.inf
    hi = np.percentile(raw["importance_raw"], high) if high is not None else np.inf
    assert ((y >= lo) & (y <= hi)).all()
    inside = (x >= lo) & (x <= hi)
    assert (y[inside] == x[inside]).all() and inside.sum() < len(x)
    assert report["clip"]["units_raised"] == int((x < lo).sum())
    assert report["clip"]["units_lowered"] == int((x > hi).sum())


def test_all_steps_off_is_the_identity_and_columns_are_stable() -> None:
    raw = _random_table(1)
    table, _ = transform_table(raw, TableConfig(), 5)
    assert list(table.columns) == ["layer_idx", "group_type", "group_idx", "cost", *STAGE_COLUMNS]
    for column in ("importance_clipped", "importance_normalized", "importance_block", "importance_layer", "importance"):
        assert table[column].equals(table["importance_raw"]), column
    assert (table["depth_factor"] == 1).all() and (table["tau_factor"] == 1).all()
    assert table["B"].isna().all() and table["L"].isna().all()


def _losses(table: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    blocks = table[["layer_idx", "group_type"]].drop_duplicates().reset_index(drop=True)
    blocks["B"] = rng.uniform(-0.01, 1.0, len(blocks))
    layers = pd.DataFrame({"layer_idx": range(5), "L": rng.uniform(-0.01, 2.0, 5)})
    return blocks, layers


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_block_temperature_sets_block_totals_and_keeps_ranking(temperature: float) -> None:
    raw = _random_table(2)
    blocks, layers = _losses(raw, 2)
    table, report = transform_table(raw, TableConfig(temperature=temperature), 5, blocks, layers)
    for (layer, kind), group in table.groupby(["layer_idx", "group_type"]):
        b = blocks.set_index(["layer_idx", "group_type"]).loc[(layer, kind), "B"]
        assert group["importance_block"].sum() == pytest.approx(max(b, ABLATION_FLOOR) ** (1 / temperature))
        np.testing.assert_allclose(group["importance_block"] / group["importance_block"].sum(),
                                   group["importance_normalized"] / group["importance_normalized"].sum())
    floored = {(r["layer_idx"], r["group_type"]) for r in report["temperature"]["floored_blocks"]}
    assert floored == {tuple(r) for r in blocks.loc[blocks["B"] <= 0, ["layer_idx", "group_type"]].to_numpy()}


def test_layer_tau_and_depth_weight_factors() -> None:
    raw = _random_table(3)
    blocks, layers = _losses(raw, 3)
    table, _ = transform_table(raw, TableConfig(tau=2.0, layer_depth_weight=0.5), 5, blocks, layers)
    losses = layers.set_index("layer_idx")["L"].clip(lower=ABLATION_FLOOR)
    expected_tau = table["layer_idx"].map((losses / losses.mean()) ** 2.0)
    np.testing.assert_allclose(table["tau_factor"], expected_tau)
    np.testing.assert_allclose(table["importance_layer"], table["importance_block"] * expected_tau)
    np.testing.assert_allclose(table["depth_factor"], 1 + (1 - table["layer_idx"] / 5) * 0.5)
    np.testing.assert_allclose(table["importance"], table["importance_layer"] * table["depth_factor"])
    # T = 0 and tau = 0 reproduce the uncorrected table exactly, even with losses supplied
    plain, _ = transform_table(raw, TableConfig(), 5)
    zero, _ = transform_table(raw, TableConfig(temperature=0.0, tau=0.0), 5, blocks, layers)
    assert zero["importance"].equals(plain["importance"]) and zero["score"].equals(plain["score"])


def test_invalid_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="clip_percentile_low"):
        TableConfig(clip_percentile_low=-1)
    with pytest.raises(ConfigError, match="below clip_percentile_high"):
        TableConfig(clip_percentile_low=90, clip_percentile_high=10)
    with pytest.raises(ConfigError, match="'tau'"):
        TableConfig(tau=-0.5)
    with pytest.raises(ConfigError, match="ablation losses B"):
        transform_table(_random_table(0), TableConfig(temperature=1.0), 5)


@pytest.fixture(scope="module")
def trained_block() -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny model in which only layer 2's MLP was trained, on text it can learn (next = prev + 13).

    That block then carries what the model knows: skipping it costs far more loss than skipping
    anything else, which the ablation must measure.
    """
    windows = (torch.randint(0, 101, (8, 1), generator=torch.Generator().manual_seed(1)) + 13 * torch.arange(24)) % 101
    model = tiny_model("llama", layers=4, gqa=2, num_kv=2)
    for param in model.parameters():
        param.requires_grad_(False)
    block = list(model.model.layers[2].mlp.parameters())
    for param in block:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(block, lr=1e-2)
    for _ in range(100):
        loss = token_loss_sum(model, windows) / windows[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for param in model.parameters():
        param.requires_grad_(True)
        param.grad = None
    return model, windows


def _rates(table: pd.DataFrame, model: torch.nn.Module, ratio: float) -> dict[tuple[int, str], int]:
    pruned = select(table, describe(model), selection_config(ratio)).pruned
    return pruned.groupby(["layer_idx", "group_type"]).size().to_dict()


def test_corrections_move_pruning_away_from_an_important_block(trained_block) -> None:
    model, windows = trained_block
    layout = describe(model)

    raw = build_table(layout, calibrate(model, windows, 4))
    _, blocks, layers = ablation_losses(model, layout, windows, 4, blocks=True, layers=True)
    assert blocks.loc[blocks["B"].idxmax(), ["layer_idx", "group_type"]].tolist() == [2, "mlp"]
    assert int(layers.loc[layers["L"].idxmax(), "layer_idx"]) == 2
    # the failure mode the corrections exist for: first-order importance that misses the block
    raw.loc[raw["layer_idx"] == 2, "importance_raw"] *= 0.02
    plain = _rates(transform_table(raw, TableConfig(), 4)[0], model, 0.2)
    with_t = _rates(transform_table(raw, TableConfig(temperature=1.0), 4, blocks, layers)[0], model, 0.2)
    with_tau = _rates(transform_table(raw, TableConfig(tau=2.0), 4, blocks, layers)[0], model, 0.2)
    print(f"layer-2 units pruned: plain {plain}, T=1 {with_t}, tau=2 {with_tau}")
    assert plain.get((2, "mlp"), 0) >= 12, plain
    assert with_t.get((2, "mlp"), 0) < plain[(2, "mlp")], with_t
    assert sum(v for (layer, _), v in with_tau.items() if layer == 2) < sum(
        v for (layer, _), v in plain.items() if layer == 2), with_tau
