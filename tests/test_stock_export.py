"""allocation: uniform_per_layer always leaves a stock checkpoint (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM) that loads without remote code and gives the in-memory pruned model's logits, at every ratio and
compensation, with enough layers that the saved per-layer keys are zero-padded ("00" ... "11"); what cannot be saved
as a stock class is refused before calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_pipeline import _config
from transformers import AutoModelForCausalLM, AutoTokenizer

from gp_lightning.model.weights import describe_checkpoint
from gp_lightning.pipeline import oneshot
from gp_lightning.runtime.errors import ConfigError

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CASES = ([("llama", "least_squares", ratio) for ratio in (0.2, 0.25, 0.3, 0.35, 0.5)]
         + [("llama", method, 0.3) for method in ("bias", "none")]
         + [(arch, "least_squares", 0.3) for arch in ("mistral", "qwen2")])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """A 12-layer dense checkpoint of each family, with the tiny checkpoint's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    root = tmp_path_factory.mktemp("dense")
    for arch in CLASSES:
        tiny_model(arch, gqa=2, num_kv=3, layers=12, vocab=len(tokenizer)).save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
    return {arch: root / arch for arch in CLASSES}


def _run(source: Path, wikitext: Path, output: Path, ratio: float, **settings: object):
    """Prune ``ratio`` of the decoder layers' parameters (the tiny models are mostly embedding)."""
    layout = describe_checkpoint(source)
    share = ratio * layout.prunable_params / layout.total_params
    return oneshot(_config(source, wikitext, output, **{"allocation": "uniform_per_layer", "pruning_ratio": share,
                                                         "num_samples": 4, "test_before_prune": False,
                                                         "importance_method": "magnitude",  # no calibration pass
                                                         "test_after_prune": False, **settings}))


@pytest.mark.parametrize("arch,method,ratio", CASES)
def test_uniform_allocation_saves_a_stock_checkpoint_with_the_pruned_logits(arch: str, method: str, ratio: float,
                                                                            sources: dict[str, Path], wikitext: Path,
                                                                            tmp_path: Path) -> None:
    result = _run(sources[arch], wikitext, tmp_path / "run", ratio, compensation=method)
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSES[arch]] and "auto_map" not in config and not list(model_dir.glob("*.py"))
    assert config["num_hidden_layers"] == 12 and (config["num_key_value_heads"], config["intermediate_size"]) != (3, 24)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.pruned_model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_what_no_stock_class_can_hold_is_refused_before_calibration(sources: dict[str, Path], wikitext: Path,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bias adds output biases, which stock mistral cannot hold"):
        _run(sources["mistral"], wikitext, tmp_path / "bias", 0.3, compensation="bias")
    pruned = tmp_path / "global"
    _run(sources["llama"], wikitext, pruned, 0.3, allocation="global")  # per-layer widths: a gp_pruned model
    with pytest.raises(ConfigError, match="layers all have the same widths, and the layers of .* differ"):
        _run(pruned / "model", wikitext, tmp_path / "again", 0.2)
    assert not (tmp_path / "bias").exists() and not (tmp_path / "again").exists()
