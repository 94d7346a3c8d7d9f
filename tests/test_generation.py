"""Cached generation of pruned models equals recomputation without a cache, on every allowed transformers.

Each model has a skipped attention block, a skipped MLP, a dropped layer and (Llama) output biases;
Mistral has a sliding window shorter than prompt + generation, Qwen2 has q/k/v biases. Greedy
tokens are compared for one prompt and for a left-padded batch, in memory, after a reload with
the project's classes, and through ``trust_remote_code`` in a process without gp_lightning.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CASES, pruned_model
from safetensors.torch import load_file, save_file

from gp_lightning.export.checkpoint import load_pruned, save_pruned

NEW_TOKENS = 7
PAD = 0

def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of three prompts of lengths 6, 4 and 2, and its attention mask."""
    g = torch.Generator().manual_seed(5)
    lengths = (6, 4, 2)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(1, 101, (length,), generator=g)
        mask[row, -length:] = 1
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)


@torch.no_grad()
def recompute(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the whole sequence recomputed at every step (no cache at all): tokens, step logits."""
    steps = []
    for _ in range(NEW_TOKENS):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        steps.append(model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1])
        step = steps[-1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)
    return ids, torch.stack(steps, 1)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_cached_generation_equals_recomputation(arch: str, tmp_path: Path) -> None:
    model = pruned_model(arch)
    skips = [layer.self_attn is None for layer in model.model.layers], [layer.mlp is None for layer in model.model.layers]
    if arch == "llama":  # layer 2 stays: its output biases make it more than the identity
        assert skips == ([True, False, True, False], [False, True, True, False])
    else:  # layer 2 was dropped
        assert skips == ([True, False, False], [False, True, False])
    ids, mask = prompts()
    single = (ids[:1], mask[:1])
    for prompt, prompt_mask in (single, (ids, mask)):
        expected, expected_logits = recompute(model, prompt, prompt_mask)
        out = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences, expected)
        torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits.float(), rtol=0, atol=1e-6)
    # each row of the padded batch generates what the prompt alone generates
    batch = generate(model, ids, mask)
    for row in range(ids.shape[0]):
        alone = generate(model, ids[row : row + 1, mask[row].bool()], mask[row : row + 1, mask[row].bool()])
        assert torch.equal(batch[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])

    save_pruned(model, None, tmp_path / "model")
    reloaded = load_pruned(tmp_path / "model")
    assert torch.equal(generate(reloaded, ids, mask), batch)


def test_remote_code_generation_equals_in_memory(tmp_path: Path) -> None:
    """One subprocess loads all three checkpoints with trust_remote_code (no gp_lightning) and generates."""
    ids, mask = prompts()
    expected = {}
    for arch in CASES:
        model = pruned_model(arch)
        save_pruned(model, None, tmp_path / arch)
        expected[arch] = generate(model, ids, mask)
    save_file({"ids": ids, "mask": mask, **expected}, tmp_path / "expected.safetensors")
    result = run_without_gp_lightning(tmp_path, f"""
        from safetensors.torch import load_file
        data = load_file({str(tmp_path / "expected.safetensors")!r})
        for arch in {sorted(CASES)!r}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + arch, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            got = model.generate(data["ids"], attention_mask=data["mask"], max_new_tokens={NEW_TOKENS},
                                 do_sample=False, pad_token_id={PAD})
            assert torch.equal(got, data[arch]), (arch, got, data[arch])
        print("REMOTE-OK")
    """)
    assert "REMOTE-OK" in result


def run_without_gp_lightning(cwd: Path, body: str) -> str:
    """Run ``body`` in a fresh interpreter where gp_lightning cannot be imported and stdin is closed (a question
    transformers asks finds no answer instead of waiting for one); return what it printed, stdout then stderr."""
    project = str(Path(__file__).resolve().parent.parent)
    script = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p and p not in ({project!r}, {project + "/tests"!r})]
        sys.modules["gp_lightning"] = None  # as if gp_lightning were not installed
        try:
            import gp_lightning  # noqa: F401
            raise SystemExit("gp_lightning is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
    """) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_cache_under_an_unknown_name_is_an_error() -> None:
    """Should transformers rename the argument again, the model refuses instead of dropping the past."""
    from transformers.cache_utils import DynamicCache

    from gp_lightning.model.gp_pruned.modeling_gp_pruned import UnsupportedTransformersError

    model = pruned_model("llama")
    ids, mask = prompts()
    with pytest.raises(UnsupportedTransformersError, match="kv_state"):
        model(input_ids=ids, attention_mask=mask, kv_state=DynamicCache(config=model.config))
    # the past is in the mask, but no cache arrived under a name the model reads
    with pytest.raises(UnsupportedTransformersError, match="past tokens"):
        model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True)
    with pytest.raises(ValueError, match="once"):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache, past_key_values=cache)


def test_checkpoint_records_output_biases(tmp_path: Path) -> None:
    model = pruned_model("llama")
    save_pruned(model, None, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["output_bias"] == {"self_attn": [0, 2], "mlp": [1, 2]}
    stored = load_file(tmp_path / "model" / "model.safetensors")
    assert {k for k in stored if k.endswith("output_bias")} == {
        "model.layers.0.self_attn_output_bias", "model.layers.2.self_attn_output_bias",
        "model.layers.1.mlp_output_bias", "model.layers.2.mlp_output_bias"}
