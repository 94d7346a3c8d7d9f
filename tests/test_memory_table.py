"""bench/memory_table.py: parameter counts against real (meta-device) models, and the memory model's trends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bench.memory_table as mt

PUBLISHED = {"Llama-3-8B": 8_030_261_248, "Llama-3-70B": 70_553_706_496}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _meta_model(shape: mt.ModelShape) -> torch.nn.Module:
    """Built from the shapes the layout reports, so the counts below check the layout against the real model."""
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tied_embeddings,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("shape", mt.MODELS, ids=lambda m: m.name)
def test_parameter_counts_match_the_real_model(shape: mt.ModelShape) -> None:
    model = _meta_model(shape)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == shape.total_params == PUBLISHED[shape.name]
    projections = sum(p.numel() for name, p in params.items() if name.rsplit(".", 2)[-2] in PROJECTIONS)
    assert projections == shape.projection_params
    layer0 = sum(p.numel() for name, p in params.items() if name.startswith("model.layers.0."))
    assert layer0 == shape.block_params
    assert shape.total_params - shape.layers * shape.block_params == shape.root_params


@pytest.mark.parametrize("strategy", mt.STRATEGIES)
@pytest.mark.parametrize("shape", mt.MODELS, ids=lambda m: m.name)
def test_per_gpu_memory_shrinks_with_more_gpus(shape: mt.ModelShape, strategy: mt.Strategy) -> None:
    settings = mt.Settings()
    estimates = [mt.estimate(shape, strategy, n, settings) for n in (8, 16, 32)]
    for fewer, more in zip(estimates, estimates[1:], strict=False):
        assert more.weights < fewer.weights
        assert more.grads < fewer.grads
        assert more.total < fewer.total
        assert (more.activations, more.logits, more.statistics) == (fewer.activations, fewer.logits, fewer.statistics)
    # the sharded part halves (up to one element of rounding) when the GPU count doubles; ZeRO-3 keeps the
    # RMSNorm weights (below its persistence threshold) whole on every rank
    replicated = shape.norm_params * settings.stored_bytes if strategy == "ZeRO-3" else 0
    halves = [e.weights_sharded - replicated for e in estimates[:2]]
    assert abs(2 * halves[1] - halves[0]) <= 2 * settings.stored_bytes


def test_terms_follow_the_documented_formulas() -> None:
    s = mt.Settings(seq_len=2048, micro_batch=1)
    m = mt.LLAMA3_8B
    assert mt.logits_bytes(m, s) == 2048 * 128256 * 4 * 2
    assert mt.statistics_bytes(m) == 32 * (8 + 14336) * 8
    e = mt.estimate(m, "FSDP2", 8, s)
    assert e.grads_sharded == 4 * m.projection_params // 8
    assert e.weights_in_flight == (2 * m.block_params + m.root_params) * 2
    longer = mt.Settings(seq_len=4096, micro_batch=2)
    assert mt.activation_bytes(m, longer) == 4 * mt.activation_bytes(m, s)  # linear in tokens (no seq^2 term)
    assert mt.activation_bytes(m, mt.Settings(activation_checkpointing=False)) > 5 * mt.activation_bytes(m, s)


def test_main_writes_the_markdown_with_its_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "table.md"
    assert mt.main(["--seq_len", "1024", "--gpus", "8", "16", "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert capsys.readouterr().out == text + "\n"  # the same markdown on stdout
    assert f"Produced by: `python bench/memory_table.py --seq_len 1024 --gpus 8 16 --output {out}`" in text
    assert "| Llama-3-70B | FSDP2 | 16 |" in text and "| 32 |" not in text
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
