"""The prune recipe end to end on a tiny checkpoint with real text: artefacts, reload, run protection."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.cli import prune_main
from gp_lightning.config import PruneConfig
from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.pipeline import oneshot
from gp_lightning.runtime.errors import ConfigError, DataError, RunDirectoryError

PRUNABLE = TINY_CHECKPOINT_PRUNABLE


def _config(tiny_checkpoint: Path, wikitext: Path, output: Path, **overrides: object) -> PruneConfig:
    values = dict(model=str(tiny_checkpoint), output=str(output), pruning_ratio=0.3 * PRUNABLE, num_samples=8, seq_len=32,
                  batch_size=4, dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"),
                  eval_max_windows=8, eval_seq_len=32, precision="32-true", eval_precision="32-true",
                  accelerator="cpu")
    values.update(overrides)
    return PruneConfig.from_flat(values)


def test_run_directory_and_reload(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    result = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("config.yaml", "description.txt", "global_group_table.csv", "groups_to_prune.csv",
                 "analysis/pruning_summary_by_layer.csv", "analysis/pruning_summary_by_layer.txt",
                 "evaluation_results.json", "analysis/pruning_comparison.json", "analysis/gradient_statistics.json",
                 "analysis/gradient_diagnosis.json", "visualization/pruning_rates.png",
                 "visualization/gradient_analysis.png",
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
    # emptied blocks lose their norms too; compensation adds an output bias per refit block that had none
    assert results["output_bias_params"] > 0
    assert results["params_after"] <= results["total_params"] - results["removed_params"] + results["output_bias_params"]
    assert results["ppl_after"] > 1.0 and results["ppl_before"] > 1.0
    comparison = json.loads((run / "analysis" / "pruning_comparison.json").read_text())
    assert comparison["total_params_after"] == results["params_after"]
    assert comparison["total_params_before"] == results["total_params"]
    summary = pd.read_csv(run / "analysis" / "pruning_summary_by_layer.csv")
    assert summary["importance_share"].sum() == pytest.approx(1.0)
    assert [x["after"]["intermediate_size"] for x in comparison["layers"]] == list(summary["mlp_channels_after"])

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


@pytest.mark.parametrize("extra", [
    {},  # compensation (the default) refits on the calibration text: the second step reads it too
    {"temperature": 1.0, "normalization": "log", "clip_percentile_low": 5.0, "compensation": "none",
     "within_layer": "score"},
    # every precision: bf16 compute must not reach compensation or surgery differently in the two paths
    {"precision": "auto"}, {"precision": "bf16-true"}, {"precision": "bf16-mixed"},
])
def test_table_only_then_from_table_equals_one_run(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                                   extra: dict) -> None:
    quiet = dict(test_before_prune=False, test_after_prune=False, **extra)
    one = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "one", **quiet))
    first = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "table", table_only=True, **quiet))
    assert first.selection is None and not (tmp_path / "table" / "pruning_plan.json").exists()
    assert (tmp_path / "table" / "table_transforms.json").exists()
    table_csv = tmp_path / "table" / "global_group_table.csv"
    # without compensation the second step needs no calibration text when the saved table has what it needs
    text = {} if extra.get("compensation") != "none" else {"dataset": str(tmp_path / "missing.txt")}
    second = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "second", from_table=str(table_csv),
                             **text, **quiet))
    pd.testing.assert_frame_equal(second.table, one.table, check_exact=True)
    assert second.selection.plan.to_json() == one.selection.plan.to_json()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(second.pruned_model(input_ids=ids).logits, one.pruned_model(input_ids=ids).logits)
    saved = pd.read_csv(tmp_path / "one" / "global_group_table.csv")
    assert saved["importance_raw"].equals(one.table["importance_raw"])  # the CSV round trip is exact
    if extra.get("compensation") == "none":
        return
    with pytest.raises(ConfigError, match="streamed_surgery"):
        _config(tiny_checkpoint, wikitext, tmp_path / "x", compensation_offload=True)
    # the dense model never whole in memory: layers read one at a time, surgery streamed
    offloaded = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "offloaded", from_table=str(table_csv),
                                compensation_offload=True, streamed_surgery=True, **quiet))
    assert offloaded.selection.plan.to_json() == one.selection.plan.to_json()
    with torch.no_grad():
        torch.testing.assert_close(offloaded.pruned_model(input_ids=ids).logits, one.pruned_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_from_table_of_another_model_is_refused(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    table = tmp_path / "other.csv"
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model
    from gp_lightning.table.build import build_table

    model, _ = load_model(str(tiny_checkpoint))
    layout = describe(model)
    importance = UnitImportance({x.index: torch.ones(x.num_kv_heads) for x in layout.layers},
                                {x.index: torch.ones(x.intermediate_size) for x in layout.layers})
    good = build_table(layout, importance)
    good[good["layer_idx"] < 2].to_csv(table, index=False)
    with pytest.raises(DataError, match="no rows for layer 2"):
        oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", from_table=str(table)))
    bad_cost = good.copy()
    bad_cost.loc[bad_cost["group_type"] == "mlp", "cost"] += 1
    bad_cost.to_csv(table, index=False)
    with pytest.raises(DataError, match="run --table_only on this model"):
        oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", from_table=str(table)))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("method", ["taylor_2nd", "wanda", "magnitude", "random"])
def test_every_method_runs_through_the_recipe(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                              method: str) -> None:
    result = oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", importance_method=method,
                             test_before_prune=False, save_model=False, protected_layers=[0], max_rate=0.6,
                             pruning_ratio=0.15 * PRUNABLE))
    summary = pd.read_csv(tmp_path / "run" / "analysis" / "pruning_summary_by_layer.csv")
    assert summary.loc[0, "layer_rate"] == 0 and summary["layer_rate"].max() <= 0.6 + 1e-9
    assert result.evaluation["ppl_after"] > 1
    assert (pd.read_csv(tmp_path / "run" / "global_group_table.csv")["importance_raw"] >= 0).all()


@pytest.mark.parametrize("key", ["seq_len", "eval_seq_len"])
def test_windows_longer_than_the_model_positions_are_refused_before_the_run(tmp_path: Path, tiny_checkpoint: Path,
                                                                           wikitext: Path, key: str) -> None:
    import json

    limit = json.loads((tiny_checkpoint / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ConfigError, match=f"'{key}' = {limit + 1} .*max_position_embeddings"):
        oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", **{key: limit + 1}))
    assert not (tmp_path / "run").exists()  # nothing written: the corrected rerun is not blocked


def _written_table(tmp_path: Path, layout: object) -> Path:
    """A table of the tiny checkpoint as a run writes it (CSV and its checksum)."""
    from gp_lightning.runtime.io import write_checksum, write_csv
    from gp_lightning.table.build import build_table

    table = build_table(layout, UnitImportance({x.index: torch.rand(x.num_kv_heads) for x in layout.layers},
                                               {x.index: torch.rand(x.intermediate_size) for x in layout.layers}))
    path = tmp_path / "global_group_table.csv"
    write_csv(path, table)
    write_checksum(path)
    return path


def _damage(path: Path, damage: str) -> None:
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    side = path.with_name(path.name + ".sha256")
    if damage.startswith("cut"):  # inside the last row's importance_raw: the value would read as a smaller one
        path.write_text(text[: text.rindex(",") + 3])
        if damage == "cut, no checksum":
            side.unlink()
        return
    side.unlink()  # the cases below are edits on purpose: their checksum is deleted
    if damage in ("string", "inf", "cost"):
        header = lines[0].rstrip("\n").split(",")
        index = {"string": 2, "inf": 1, "cost": -1}[damage]  # the last row: not the first of its layer and block
        row = lines[index].rstrip("\n").split(",")
        column, value = ("cost", "7") if damage == "cost" else ("importance_raw", "abc" if damage == "string" else "inf")
        row[header.index(column)] = value
        lines[index] = ",".join(row) + "\n"
        path.write_text("".join(lines))
    else:
        path.write_text("" if damage == "empty" else lines[0])


DAMAGES = {
    "cut": "SHA-256 differs from global_group_table.csv.sha256",
    "cut, no checksum": "ends in the middle of a line",
    "string": r"line 3: importance_raw = 'abc' is not a finite non-negative number",
    "inf": r"line 2: importance_raw = 'inf' is not a finite",
    "empty": "is not a readable CSV",
    "header only": "lacks rows",
    "cost": r": layer \d+ mlp unit \d+ costs 7 parameters there, \d+ in the model",
}


def test_a_damaged_table_is_refused_naming_the_file(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    """Each damage is refused with one line; the first one through the whole run, as a user meets it."""
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model
    from gp_lightning.table.saved import load_table

    layout = describe(load_model(str(tiny_checkpoint), with_tokenizer=False)[0])
    for number, (damage, message) in enumerate(DAMAGES.items()):
        (tmp_path / str(number)).mkdir()
        path = _written_table(tmp_path / str(number), layout)
        load_table(path, layout)  # the intact table reads
        _damage(path, damage)
        with pytest.raises(DataError, match=f"from_table: .*global_group_table.csv.*{message}"):
            if number == 0:
                oneshot(_config(tiny_checkpoint, wikitext, tmp_path / "run", from_table=str(path)))
            else:
                load_table(path, layout)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uniform_allocation_saves_the_stock_class_with_the_pruned_logits(arch: str, tmp_path: Path, tiny_checkpoint: Path,
                                                                         wikitext: Path) -> None:
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_checkpoint
    if arch != "llama":
        tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
        source = tmp_path / "dense"
        tiny_model(arch, gqa=2, num_kv=3, layers=3, vocab=len(tokenizer)).save_pretrained(source)
        tokenizer.save_pretrained(source)
    result = oneshot(_config(source, wikitext, tmp_path / "run", allocation="uniform_per_layer", export_gguf="f32"))
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    stock = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert config["model_type"] == arch and config["architectures"] == [stock] and "auto_map" not in config
    assert not list(model_dir.glob("*.py"))
    widths = {(x["after"]["num_key_value_heads"], x["after"]["intermediate_size"])
              for x in json.loads((tmp_path / "run" / "analysis" / "pruning_comparison.json").read_text())["layers"]}
    assert widths == {(config["num_key_value_heads"], config["intermediate_size"])}
    assert config["intermediate_size"] < 24
    results = json.loads((tmp_path / "run" / "evaluation_results.json").read_text())
    if arch == "llama":  # the refit's output biases ride on Llama's attention_bias / mlp_bias
        assert results["output_bias_params"] > 0 and (config["attention_bias"] or config["mlp_bias"])
    else:  # stock Qwen2 has no o_proj / down_proj bias: the refit added none
        assert results["output_bias_params"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(reloaded).__name__ == stock
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.pruned_model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    import gguf  # export_gguf: the stock model as a plain llama GGUF

    fields = gguf.GGUFReader(tmp_path / "run" / "model.gguf").fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.feed_forward_length"].contents() == config["intermediate_size"]
