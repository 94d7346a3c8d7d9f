"""The prune recipe end to end on a tiny checkpoint with real text: artefacts, reload, run protection."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from gp_lightning.cli import prune_main
from gp_lightning.config import PruneConfig
from gp_lightning.errors import RunDirectoryError
from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.pipeline import oneshot

# The tiny checkpoint has SmolLM2's 49k vocabulary, so its embeddings dwarf its layers: ratios
# of ALL parameters are small here. PRUNABLE is the fraction of parameters in the layers.
PRUNABLE = 31_104 / 4_750_128


def _config(tiny_checkpoint: Path, wikitext: Path, output: Path, **overrides: object) -> PruneConfig:
    values = dict(model=str(tiny_checkpoint), output=str(output), pruning_ratio=0.3 * PRUNABLE, num_samples=8, seq_len=32,
                  batch_size=4, dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"),
                  eval_max_windows=8, eval_seq_len=32, precision="32-true", eval_precision="32-true",
                  accelerator="cpu")
    values.update(overrides)
    return PruneConfig(**values)


def test_run_directory_and_reload(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    result = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("config.yaml", "description.txt", "global_group_table.csv", "groups_to_prune.csv",
                 "pruning_summary_by_layer.csv", "pruning_summary_by_layer.txt", "evaluation_results.json",
                 "training.log", "pruning_plan.json", "model/config.json", "model/model.safetensors",
                 "model/modeling_gp_pruned.py", "model/tokenizer.json"):
        assert (run / name).exists(), name
    assert not list(run.glob(".*tmp*"))  # no temporary files left behind

    results = json.loads((run / "evaluation_results.json").read_text())
    table = pd.read_csv(run / "global_group_table.csv")
    pruned_rows = pd.read_csv(run / "groups_to_prune.csv")
    assert list(table["score"]) == sorted(table["score"])
    assert results["removed_params"] == int(pruned_rows["cost"].sum())
    assert results["achieved_ratio"] == pytest.approx(results["removed_params"] / results["total_params"])
    assert results["params_after"] == sum(p.numel() for p in result.pruned_model.parameters())
    assert results["params_after"] <= results["total_params"] - results["removed_params"]
    assert results["ppl_after"] > 1.0 and results["ppl_before"] > 1.0

    reloaded = load_pruned(run / "model")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.pruned_model(input_ids=ids).logits)

    with pytest.raises(RunDirectoryError, match="--overwrite"):
        oneshot(_config(tiny_checkpoint, wikitext, run))
    again = oneshot(_config(tiny_checkpoint, wikitext, run, overwrite=True, save_model=False))
    assert again.evaluation["removed_params"] == results["removed_params"]  # same seed, same selection


def test_depth_pruning_drops_emptied_layers(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    result = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", pruning_ratio=0.98 * 2 / 3 * PRUNABLE,
                             remove_empty_layers=True, test_before_prune=False, test_after_prune=False,
                             layer_start=1, layer_end=3))
    plan = result.selection.plan
    assert plan.layers[0].keep_groups == [0, 1] and len(plan.layers[0].keep_channels) == 24
    emptied = [lp.index for lp in plan.layers if lp.empty]
    assert emptied, "98% of two layers leaves at most a few units, so a layer is emptied"
    assert result.pruned_model.config.num_hidden_layers == 3 - len(emptied)


def test_cli_prints_summary(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                            capsys: pytest.CaptureFixture) -> None:
    code = prune_main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "cli"),
                       "--pruning_ratio", str(0.1 * PRUNABLE),
                       "--num_samples", "4", "--seq_len", "32", "--dataset", str(wikitext / "valid.txt"),
                       "--eval_dataset", str(wikitext / "test.txt"), "--eval_max_windows", "4",
                       "--eval_seq_len", "32", "--save_model", "false", "--accelerator", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Pruned" in out and "Perplexity" in out
