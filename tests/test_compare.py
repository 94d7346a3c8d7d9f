"""`gp-lightning compare` on two real runs, cross-checked against each run's JSON; `evaluate` side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_CHECKPOINT_PRUNABLE

from gp_lightning.analysis.compare import compare_runs
from gp_lightning.cli import main
from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import evaluation_windows, tokenize
from gp_lightning.evaluation.perplexity import perplexity
from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.model.source import load_model
from gp_lightning.pipeline import oneshot

PRUNABLE = TINY_CHECKPOINT_PRUNABLE


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, wikitext: Path) -> list[Path]:
    base = tmp_path_factory.mktemp("runs")
    runs = []
    for name, extra in (("taylor", {}), ("wanda", {"importance_method": "wanda", "save_model": False})):
        oneshot(model=str(tiny_checkpoint), output=str(base / name), pruning_ratio=0.3 * PRUNABLE, num_samples=8,
                seq_len=32, batch_size=4, dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"),
                eval_max_windows=4, eval_seq_len=32, precision="32-true", eval_precision="32-true",
                accelerator="cpu", **extra)
        runs.append(base / name)
    return runs


def test_compare_numbers_match_each_run(two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", *map(str, two_runs), "--output", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    table, _ = compare_runs(two_runs)
    for run, row in zip(two_runs, table.itertuples(), strict=True):
        results = json.loads((run / "evaluation_results.json").read_text())
        summary = pd.read_csv(run / "analysis" / "pruning_summary_by_layer.csv")
        diagnosis = json.loads((run / "analysis" / "gradient_diagnosis.json").read_text())
        assert row.params_after == results["params_after"] and row.ratio == results["achieved_ratio"]
        assert row.ppl_before == results["ppl_before"] and row.ppl_after == results["ppl_after"]
        assert row.max_layer_rate == summary["layer_rate"].max()
        assert row.extreme_layers == len(diagnosis["extreme_layers"])
        assert f"{results['ppl_after']:,.2f}" in printed or f"{results['ppl_after']:.4f}" in printed
    assert table["method"].tolist() == ["taylor", "wanda"]
    saved = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert saved["params_after"].tolist() == table["params_after"].tolist()
    assert (tmp_path / "cmp" / "pruning_rates_overlay.png").stat().st_size > 10_000
    assert main(["compare", str(tmp_path)]) == 2  # not a run: a clear error


def test_evaluate_puts_checkpoints_side_by_side(two_runs: list[Path], tiny_checkpoint: Path, wikitext: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    pruned = two_runs[0] / "model"
    assert main(["evaluate", str(tiny_checkpoint), str(pruned), "--eval_dataset", str(wikitext / "test.txt"),
                 "--eval_seq_len", "32", "--eval_max_windows", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    dense, tokenizer = load_model(str(tiny_checkpoint))
    windows = evaluation_windows(tokenize(load_text(str(wikitext / "test.txt"), "evaluation"), tokenizer), 32, 4)
    assert rows[0]["ppl"] == pytest.approx(perplexity(dense, windows, 8), rel=1e-6)
    assert rows[1]["ppl"] == pytest.approx(perplexity(load_pruned(pruned), windows, 8), rel=1e-6)
    results = json.loads((two_runs[0] / "evaluation_results.json").read_text())
    assert rows[1]["ppl"] == pytest.approx(results["ppl_after"], rel=1e-6)  # the run measured the same windows
    assert rows[1]["params"] == results["params_after"]
