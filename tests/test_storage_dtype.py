"""A pruned checkpoint keeps the source's dtype and its exact values, whatever the machine's compute precision."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE
from safetensors.torch import load_file

from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.model.layout import describe
from gp_lightning.pipeline import oneshot
from gp_lightning.runtime import machine
from gp_lightning.surgery.in_memory import apply_plan, mask_units


@pytest.fixture
def force_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``force_machine(kind)``: this process decides as a machine of that kind would (the work runs here)."""

    def force(kind: str) -> None:
        monkeypatch.setenv(machine.ENV, kind)
        machine.detect.cache_clear()

    yield force
    monkeypatch.delenv(machine.ENV, raising=False)
    machine.detect.cache_clear()


def _prune(source: Path, wikitext: Path, output: Path, **keys: object):
    return oneshot(model=str(source), output=str(output), pruning_ratio=0.3 * TINY_CHECKPOINT_PRUNABLE, num_samples=4,
                   seq_len=32, batch_size=4, dataset=str(wikitext / "valid.txt"), test_before_prune=False,
                   test_after_prune=False, accelerator="cpu", **keys)


@pytest.mark.parametrize("kind", ["avx2", "avx512_bf16", "amx"])
def test_auto_precision_saves_the_source_values_on_every_cpu_kind(kind: str, force_machine, tmp_path: Path,
                                                                  tiny_checkpoint: Path, wikitext: Path) -> None:
    force_machine(kind)
    result = _prune(tiny_checkpoint, wikitext, tmp_path / "run", compensation="none")
    assert result.evaluation["precision"] == ("32-true" if kind == "avx2" else "bf16-true")  # calibration's numerics
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    layout, plan = describe(dense), result.selection.plan
    expected = apply_plan(dense, layout, plan, {}).state_dict()
    assert saved.keys() <= expected.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name  # sliced, never rounded through bf16

    masked = copy.deepcopy(dense)
    mask_units(masked, layout, plan)
    pruned = load_pruned(tmp_path / "run" / "model")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (pruned(input_ids=ids).logits - masked(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_bf16_source_stays_bf16_and_save_dtype_converts(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(source)
    stored = load_file(source / "model.safetensors")
    result = _prune(source, wikitext, tmp_path / "run", precision="32-true")  # float32 compute, refit included
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert result.pruned_model.dtype == torch.bfloat16  # what was evaluated is what was saved
    assert torch.equal(saved["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])
    kept = result.selection.plan.layers[0].keep_channels
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], stored["model.layers.0.mlp.up_proj.weight"][kept])

    wide = _prune(source, wikitext, tmp_path / "wide", precision="32-true", save_dtype="float32",
                  from_table=str(tmp_path / "run" / "global_group_table.csv"))
    saved_wide = load_file(tmp_path / "wide" / "model" / "model.safetensors")
    assert {t.dtype for t in saved_wide.values()} == {torch.float32}
    assert wide.selection.plan.to_json() == result.selection.plan.to_json()
    for name, tensor in saved.items():  # the kept weights are the same values; a refit is rounded once, to bf16
        assert torch.equal(saved_wide[name].to(torch.bfloat16), tensor), name
