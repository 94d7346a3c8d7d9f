"""The real model: SmolLM2-135M calibrated once on 16 x 128 WikiText-2 windows, pruned 20% (refit on the same
windows) and 35% (LoRA recovery) from that table; perplexities on the first 16 x 128 tokens of test.txt."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import selection as selection_config

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import evaluation_windows, tokenize
from gp_lightning.evaluation.perplexity import perplexity
from gp_lightning.model.layout import describe
from gp_lightning.model.source import load_model
from gp_lightning.pipeline import oneshot
from gp_lightning.selection.greedy import select
from gp_lightning.surgery.in_memory import apply_plan
from gp_lightning.table.build import build_table


def test_smollm2_global_taylor_beats_random(smollm2_dir: Path, wikitext: Path, smollm2_table: tuple[Path, float],
                                            smollm2_pruned: tuple[Path, dict]) -> None:
    dense_ppl = smollm2_table[1]
    ev = smollm2_pruned[1]
    assert math.isfinite(ev["ppl_after"])
    assert ev["ppl_after"] > dense_ppl
    assert abs(ev["achieved_ratio"] - 0.2) < 0.001

    # random selection of the same size, same windows
    model, tokenizer = load_model(str(smollm2_dir))
    layout = describe(model)
    g = torch.Generator().manual_seed(0)
    random_importance = UnitImportance(
        {x.index: torch.rand(x.num_kv_heads, generator=g, dtype=torch.float64) for x in layout.layers},
        {x.index: torch.rand(x.intermediate_size, generator=g, dtype=torch.float64) for x in layout.layers},
    )
    table = build_table(layout, random_importance)
    table["score"] = table["importance"]  # random order, not biased toward a unit kind
    selection = select(table, layout, selection_config(0.2))
    random_model = apply_plan(model, layout, selection.plan, {})
    windows = evaluation_windows(tokenize(load_text(str(wikitext / "test.txt"), "evaluation"), tokenizer), 128, 16)
    random_ppl = perplexity(random_model, windows, 8)
    print(f"SmolLM2 20%: dense {dense_ppl:.2f}, global taylor {ev['ppl_after']:.2f}, random {random_ppl:.2f}")
    assert ev["ppl_after"] * 3 < random_ppl


def test_smollm2_lora_recovery_lowers_held_out_perplexity(tmp_path: Path, smollm2_dir: Path, wikitext: Path,
                                                          smollm2_table: tuple[Path, float]) -> None:
    """SmolLM2 pruned 35%, then 8 LoRA steps on 4 x 64 tokens of valid text: test-set perplexity (8 x 128) goes down."""
    from transformers import AutoTokenizer

    from gp_lightning.finetune.config import FinetuneConfig
    from gp_lightning.finetune.recipe import FinetuneRecipe

    pruned = oneshot(
        model=str(smollm2_dir), output=str(tmp_path / "run"), from_table=str(smollm2_table[0]), pruning_ratio=0.35,
        test_before_prune=False, test_after_prune=False, save_model=False, normalization="log",
        normalization_level="layer", compensation="none",  # the fine-tune alone has to recover
    )
    config = FinetuneConfig.from_flat(
        model=str(tmp_path / "run" / "model"), output=str(tmp_path / "ft"), dataset=str(wikitext / "valid.txt"),
        eval_dataset=str(wikitext / "test.txt"), eval_max_windows=8, eval_seq_len=128, finetune_samples=32,
        val_samples=4, seq_len=64, batch_size=4, learning_rate=1e-3, warmup_steps=1, save_model=False,
    )
    result = FinetuneRecipe(config, model=pruned.pruned_model, tokenizer=AutoTokenizer.from_pretrained(smollm2_dir)).run()
    ev = result.evaluation
    print(f"SmolLM2 35% + LoRA ({ev['optimizer_steps']} steps): test PPL {ev['ppl_before']:.2f} -> {ev['ppl_after']:.2f}")
    assert ev["optimizer_steps"] == 8
    assert ev["ppl_after"] < ev["ppl_before"] * 0.95
