"""Gradient diagnosis: a layer whose weights (and so gradients) were scaled down 1000x is flagged, the
recommendations name real config keys, and normalization makes the flag go away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE, tiny_model

from gp_lightning.config import PruneConfig
from gp_lightning.pipeline import oneshot

PRUNABLE = TINY_CHECKPOINT_PRUNABLE


@pytest.fixture(scope="module")
def weak_layer_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("weak-layer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_model("llama", gqa=2, num_kv=2, layers=3, vocab=len(tokenizer))
    with torch.no_grad():
        for name, param in model.model.layers[1].named_parameters():
            if "_proj" in name:
                param.mul_(1e-3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(checkpoint: Path, wikitext: Path, output: Path, **extra: object) -> dict:
    oneshot(model=str(checkpoint), output=str(output), pruning_ratio=0.3 * PRUNABLE, num_samples=8, seq_len=32,
            batch_size=4, dataset=str(wikitext / "valid.txt"), test_before_prune=False, test_after_prune=False,
            save_model=False, precision="32-true", accelerator="cpu", **extra)
    return json.loads((output / "analysis" / "gradient_diagnosis.json").read_text())


def test_scaled_down_layer_is_flagged_and_normalization_clears_it(tmp_path: Path, weak_layer_checkpoint: Path,
                                                                   wikitext: Path) -> None:
    plain = _run(weak_layer_checkpoint, wikitext, tmp_path / "plain")
    assert [e["layer_idx"] for e in plain["extreme_layers"]] == [1]
    assert plain["extreme_layers"][0]["mlp_rate"] > 0.9
    kinds = {issue["kind"]: issue for issue in plain["issues"]}
    assert kinds["gradient_scale_spread"]["layers"][0] == 1
    assert kinds["gradient_scale_spread"]["severity"] in ("medium", "high")
    assert plain["gradient_ratios"]["mean_ratio"] > 100
    recommended = {r["key"]: r["value"] for r in plain["recommendations"]}
    assert recommended["normalization"] == "log" and "temperature" in recommended
    assert set(recommended) <= set(PruneConfig.key_owners())  # no recommendation for a key that does not exist
    PruneConfig.from_flat(recommended)  # every recommended key exists, and every value is valid

    normalized = _run(weak_layer_checkpoint, wikitext, tmp_path / "log", normalization="log",
                      normalization_level="block")
    assert 1 not in [e["layer_idx"] for e in normalized["extreme_layers"]]


def test_analysis_json_schema(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    diagnosis = _run(tiny_checkpoint, wikitext, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "analysis" / "gradient_statistics.json").read_text())
    figures = {"count": int, "mean_abs": float, "mean": float, "std": float, "l2_norm": float, "max": float,
               "min": float, "max_abs": float, "min_abs": float}
    assert set(stats) == {"layers", "blocks", "ratios", "seconds"}
    for row in stats["layers"]:
        assert set(row) == {"layer_idx", *figures} and all(isinstance(row[k], t) for k, t in figures.items())
    for row in stats["blocks"]:
        assert set(row) == {"layer_idx", "block", *figures} and row["block"] in ("attention", "mlp")
    assert set(stats["ratios"]) == {"mean_ratio", "std_ratio", "norm_ratio", "max_ratio"}
    assert set(diagnosis) == {"extreme_rate", "extreme_layers", "gradient_ratios", "issues", "recommendations"}
    for issue in diagnosis["issues"]:
        assert set(issue) == {"kind", "severity", "message", "layers"}
        assert issue["severity"] in ("medium", "high", "critical")
    for rec in diagnosis["recommendations"]:
        assert set(rec) == {"key", "value", "reason"}


def test_plots_are_written_with_their_panels(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    import pandas as pd

    from gp_lightning.analysis.plots import gradient_analysis_figure, pruning_rates_figure

    run = tmp_path / "run"
    _run(tiny_checkpoint, wikitext, run)
    for name in ("gradient_analysis.png", "pruning_rates.png"):
        data = (run / "visualization" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    stats = json.loads((run / "analysis" / "gradient_statistics.json").read_text())
    summary = pd.read_csv(run / "analysis" / "pruning_summary_by_layer.csv")
    table = pd.read_csv(run / "global_group_table.csv")
    figure = gradient_analysis_figure(stats, summary, table)
    assert len(figure.axes) == 3
    assert [len(line.get_xdata()) for line in figure.axes[0].get_lines()] == [3, 3, 3]  # mean, std, norm per layer
    rates = pruning_rates_figure(summary)
    assert len(rates.axes) == 1 and len(rates.axes[0].patches) == 2 * len(summary)  # attention + MLP bars


def test_every_key_a_diagnosis_can_recommend_is_a_config_key() -> None:
    """diagnose() names keys as string literals; each must be a real key of the pruning config."""
    import ast
    import inspect

    from gp_lightning.analysis import diagnostics

    tree = ast.parse(inspect.getsource(diagnostics))
    named = {call.args[0].value for call in ast.walk(tree) if isinstance(call, ast.Call)
             and getattr(call.func, "id", None) == "_recommend" and isinstance(call.args[0], ast.Constant)}
    assert len(named) >= 8 and named <= set(PruneConfig.key_owners())
