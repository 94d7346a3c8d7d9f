"""Taylor importance from the Lightning calibration equals a direct per-parameter autograd computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from gp_lightning.architecture import describe
from gp_lightning.calibration import run_calibration


def _reference(model: torch.nn.Module, windows: torch.Tensor) -> tuple[dict, dict]:
    """Mean token loss over ALL windows at once, autograd, then explicit loops over every unit."""
    params = dict(model.named_parameters())
    logits = model(input_ids=windows, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    names = [n for n in params if ".layers." in n and ("_proj." in n)]
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))
    config = model.config
    hd, kv = config.head_dim, config.num_key_value_heads
    qpk = config.num_attention_heads // kv
    attention, mlp = {}, {}
    for layer in range(config.num_hidden_layers):
        def s(name: str, layer: int = layer) -> torch.Tensor:
            key = f"model.layers.{layer}.{name}"
            return (params[key] * grads[key]).abs().double() if key in params else None

        groups = []
        for g in range(kv):
            q_rows = slice(g * qpk * hd, (g + 1) * qpk * hd)
            kv_rows = slice(g * hd, (g + 1) * hd)
            total = s("self_attn.q_proj.weight")[q_rows].sum() + s("self_attn.k_proj.weight")[kv_rows].sum()
            total += s("self_attn.v_proj.weight")[kv_rows].sum() + s("self_attn.o_proj.weight")[:, q_rows].sum()
            for bias, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                b = s(f"self_attn.{bias}.bias")
                if b is not None:
                    total += b[rows].sum()
            groups.append(total)
        attention[layer] = torch.stack(groups)
        channels = []
        for c in range(config.intermediate_size):
            total = s("mlp.gate_proj.weight")[c].sum() + s("mlp.up_proj.weight")[c].sum()
            total += s("mlp.down_proj.weight")[:, c].sum()
            channels.append(total)
        mlp[layer] = torch.stack(channels)
    return attention, mlp


@pytest.mark.parametrize("arch,batch_size", [("llama", 3), ("qwen2", 2)])
def test_taylor_matches_autograd_reference(arch: str, batch_size: int) -> None:
    model = tiny_model(arch, gqa=2, num_kv=2, layers=2)
    windows = torch.randint(0, 101, (6, 16), generator=torch.Generator().manual_seed(5))
    ref_attention, ref_mlp = _reference(model, windows)
    model.zero_grad(set_to_none=True)
    importance = run_calibration(model, describe(model), windows, batch_size=batch_size, accelerator="cpu",
                                 progress=False)
    for layer in ref_attention:
        torch.testing.assert_close(importance.attention[layer], ref_attention[layer], rtol=1e-5, atol=0)
        torch.testing.assert_close(importance.mlp[layer], ref_mlp[layer], rtol=1e-5, atol=0)
    assert all(p.grad is None for p in model.parameters())  # gradients are released after reduction


def test_bf16_weights_accumulate_in_float32() -> None:
    model = tiny_model("llama", layers=2)
    windows = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(2))
    exact = run_calibration(model, describe(model), windows, 2, accelerator="cpu", progress=False)
    bf16 = tiny_model("llama", layers=2).to(torch.bfloat16)
    approx = run_calibration(bf16, describe(bf16), windows, 2, precision="bf16-true", accelerator="cpu",
                             progress=False)
    for layer in exact.mlp:
        assert approx.mlp[layer].dtype == torch.float64
        torch.testing.assert_close(approx.mlp[layer], exact.mlp[layer], rtol=0.1, atol=1e-6)
