"""Every importance method equals a direct reference computation: autograd for the gradients, explicit
loops over every unit for the grouping, and inputs recomputed from the model's own modules for Wanda."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate, tiny_model

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.model.layout import describe

WINDOWS = torch.randint(0, 101, (6, 16), generator=torch.Generator().manual_seed(5))


def _unit_sums(model: torch.nn.Module, element: dict[str, torch.Tensor]) -> UnitImportance:
    """Sum per-element scores (keyed by parameter name) over each unit with explicit loops."""
    config = model.config
    hd, kv = config.head_dim, config.num_key_value_heads
    qpk = config.num_attention_heads // kv
    result = UnitImportance({}, {})
    for layer in range(config.num_hidden_layers):
        def s(name: str, layer: int = layer) -> torch.Tensor | None:
            return element.get(f"model.layers.{layer}.{name}")

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
        result.attention[layer] = torch.stack(groups).double()
        channels = []
        for c in range(config.intermediate_size):
            total = s("mlp.gate_proj.weight")[c].sum() + s("mlp.up_proj.weight")[c].sum()
            total += s("mlp.down_proj.weight")[:, c].sum()
            for bias in ("gate_proj", "up_proj"):
                b = s(f"mlp.{bias}.bias")
                if b is not None:
                    total += b[c]
            channels.append(total)
        result.mlp[layer] = torch.stack(channels).double()
    return result


def _unit_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    skip = ("o_proj.bias", "down_proj.bias")
    return {n: p for n, p in model.named_parameters() if "_proj." in n and not n.endswith(skip)}


def _gradients(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the mean token loss over ``windows``, by autograd in one pass."""
    params = _unit_params(model)
    logits = model(input_ids=windows, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def _assert_equal(actual: UnitImportance, expected: UnitImportance) -> None:
    assert actual.attention.keys() == expected.attention.keys() and actual.mlp.keys() == expected.mlp.keys()
    for layer in expected.attention:
        torch.testing.assert_close(actual.attention[layer], expected.attention[layer], rtol=1e-5, atol=0)
        torch.testing.assert_close(actual.mlp[layer], expected.mlp[layer], rtol=1e-5, atol=0)


def _calibrate(model: torch.nn.Module, method: str, batch_size: int, **kwargs: object) -> UnitImportance:
    return calibrate(model, WINDOWS, batch_size, method, **kwargs)


@pytest.mark.parametrize("arch,batch_size", [("llama", 3), ("qwen2", 2)])
def test_taylor_matches_autograd(arch: str, batch_size: int) -> None:
    model = tiny_model(arch, gqa=2, num_kv=2, layers=2)
    params, grads = _unit_params(model), _gradients(model, WINDOWS)
    expected = _unit_sums(model, {n: (p * grads[n]).abs().double() for n, p in params.items()})
    _assert_equal(_calibrate(model, "taylor", batch_size), expected)
    assert all(p.grad is None for p in model.parameters())  # gradients are released after reduction


@pytest.mark.parametrize("arch,batch_size,fisher_batch_size", [("llama", 3, 1), ("qwen2", 2, None), ("mistral", 3, 3)])
def test_taylor_2nd_matches_autograd(arch: str, batch_size: int, fisher_batch_size: int | None) -> None:
    """First-order term from the whole-set gradient plus 0.5 * w^2 * mean over passes of g_pass^2."""
    model = tiny_model(arch, gqa=2, num_kv=2, layers=2)
    params, grads = _unit_params(model), _gradients(model, WINDOWS)
    chunk = fisher_batch_size or batch_size
    passes = [WINDOWS[i : i + chunk] for b in range(0, 6, batch_size) for i in range(b, b + batch_size, chunk)]
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for windows in passes:
        for name, g in _gradients(model, windows).items():
            fisher[name] += g.double().square() / len(passes)
    expected = _unit_sums(model, {
        n: (p * grads[n]).abs().double() + 0.5 * p.double().square() * fisher[n] for n, p in params.items()
    })
    _assert_equal(_calibrate(model, "taylor_2nd", batch_size, fisher_batch_size=fisher_batch_size), expected)
    first = _unit_sums(model, {n: (p * grads[n]).abs().double() for n, p in params.items()})
    assert all((expected.mlp[k] > first.mlp[k]).all() for k in first.mlp)  # the Fisher term is really there


def test_fisher_term_shrinks_with_larger_backward_passes() -> None:
    model = tiny_model("llama", layers=2)
    first = _calibrate(model, "taylor", 6)
    per_sample = _calibrate(model, "taylor_2nd", 6, fisher_batch_size=1)
    whole = _calibrate(model, "taylor_2nd", 6, fisher_batch_size=6)
    extra = [sum(float((imp.mlp[k] - first.mlp[k]).sum()) for k in first.mlp) for imp in (per_sample, whole)]
    assert extra[0] > extra[1] > 0
    assert per_sample.details["backward_passes"] == 6 and whole.details["backward_passes"] == 1
    assert per_sample.details["second_order_share"] > whole.details["second_order_share"] > 0


def _wanda_reference(model: torch.nn.Module, windows: torch.Tensor) -> UnitImportance:
    """Inputs of every projection recomputed from the model's hidden states and its own norm/act modules."""
    with torch.no_grad():
        out = model(input_ids=windows, output_hidden_states=True, use_cache=False)
        o_inputs: dict[int, torch.Tensor] = {}
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: o_inputs.__setitem__(i, a[0])) for i, layer in enumerate(model.model.layers)]
        model(input_ids=windows, use_cache=False)
        for h in handles:
            h.remove()
    element = {}
    for i, layer in enumerate(model.model.layers):
        h = out.hidden_states[i]
        x_attn = layer.input_layernorm(h)
        attn_out = layer.self_attn.o_proj(o_inputs[i])
        x_mlp = layer.post_attention_layernorm(h + attn_out)
        x_down = layer.mlp.act_fn(layer.mlp.gate_proj(x_mlp)) * layer.mlp.up_proj(x_mlp)
        inputs = {"self_attn.q_proj": x_attn, "self_attn.k_proj": x_attn, "self_attn.v_proj": x_attn,
                  "self_attn.o_proj": o_inputs[i], "mlp.gate_proj": x_mlp, "mlp.up_proj": x_mlp,
                  "mlp.down_proj": x_down}
        for proj, x in inputs.items():
            x = x.detach().reshape(-1, x.shape[-1]).double()
            module = layer.get_submodule(proj)
            norm = torch.stack([x[:, j].norm() for j in range(x.shape[1])])
            element[f"model.layers.{i}.{proj}.weight"] = module.weight.detach().double().abs() * norm[None, :]
            if module.bias is not None:
                element[f"model.layers.{i}.{proj}.bias"] = module.bias.detach().double().abs() * x.shape[0] ** 0.5
    return _unit_sums(model, element)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wanda_matches_explicit_inputs(arch: str) -> None:
    model = tiny_model(arch, gqa=2, num_kv=2, layers=2)
    expected = _wanda_reference(model, WINDOWS)
    _assert_equal(_calibrate(model, "wanda", 4), expected)
    assert all(p.grad is None for p in model.parameters())  # forward only


def test_magnitude_and_random() -> None:
    model = tiny_model("qwen2", gqa=2, num_kv=2, layers=2)
    params = _unit_params(model)
    _assert_equal(_calibrate(model, "magnitude", 2), _unit_sums(model, {n: p.abs().double() for n, p in params.items()}))

    layout = describe(model)
    first, again = _calibrate(model, "random", 2, seed=3), _calibrate(model, "random", 2, seed=3)
    _assert_equal(first, again)
    other = _calibrate(model, "random", 2, seed=4)
    assert not torch.equal(first.mlp[0], other.mlp[0])
    # importance / cost is uniform in [0, 1): units are taken in random order whatever their kind
    for layer in layout.layers:
        for values, cost in ((first.attention[layer.index], layout.attention_group_cost(layer)),
                             (first.mlp[layer.index], layout.mlp_channel_cost(layer))):
            score = values / cost
            assert ((score >= 0) & (score < 1)).all()


def test_bf16_weights_accumulate_in_float32() -> None:
    model = tiny_model("llama", layers=2)
    windows = WINDOWS[:4, :12]
    for method in ("taylor", "taylor_2nd"):
        exact = calibrate(model, windows, 2, method)
        bf16 = tiny_model("llama", layers=2).to(torch.bfloat16)
        approx = calibrate(bf16, windows, 2, method, precision="bf16-true")
        for layer in exact.mlp:
            assert approx.mlp[layer].dtype == torch.float64
            torch.testing.assert_close(approx.mlp[layer], exact.mlp[layer], rtol=0.1, atol=1e-6)


def test_activation_checkpointing_gives_the_same_taylor() -> None:
    model = tiny_model("qwen2", layers=2)
    plain = _calibrate(model, "taylor", 3)
    checkpointed = _calibrate(tiny_model("qwen2", layers=2), "taylor", 3, activation_checkpointing=True)
    for layer in plain.mlp:
        torch.testing.assert_close(checkpointed.mlp[layer], plain.mlp[layer], rtol=1e-6, atol=0)
        torch.testing.assert_close(checkpointed.attention[layer], plain.attention[layer], rtol=1e-6, atol=0)


def test_gradient_statistics_match_autograd() -> None:
    model = tiny_model("qwen2", gqa=2, num_kv=2, layers=2)
    grads = _gradients(model, WINDOWS)
    stats = _calibrate(model, "taylor", 3).gradient_statistics
    for row in stats["blocks"]:
        prefix = f"model.layers.{row['layer_idx']}.{'self_attn' if row['block'] == 'attention' else 'mlp'}."
        g = torch.cat([v.reshape(-1).double() for n, v in grads.items() if n.startswith(prefix)])
        assert row["count"] == g.numel()
        for key, expected in (("mean_abs", g.abs().mean()), ("std", g.std(unbiased=False)), ("l2_norm", g.norm()),
                              ("max", g.max()), ("min", g.min()), ("max_abs", g.abs().max())):
            assert row[key] == pytest.approx(float(expected), rel=1e-5), key
    layer0 = torch.cat([v.reshape(-1).double() for n, v in grads.items() if n.startswith("model.layers.0.")])
    assert stats["layers"][0]["l2_norm"] == pytest.approx(float(layer0.norm()), rel=1e-5)
    means = [row["mean_abs"] for row in stats["layers"]]
    assert stats["ratios"]["mean_ratio"] == pytest.approx(max(means) / min(means))
