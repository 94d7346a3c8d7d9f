"""Surgery must equal masking: the pruned model's logits equal the dense model's with units zeroed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from gp_lightning.model.layout import describe
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan, mask_units


def _plan(model: torch.nn.Module, remove_empty_layers: bool) -> PruningPlan:
    layout = describe(model)
    inter = layout.layers[0].intermediate_size
    kv = layout.layers[0].num_kv_heads
    groups = {0: {kv - 1}, 1: set(range(kv))}  # layer 1 loses all attention
    channels = {0: {1, 5, 7}, 1: set(range(0, inter, 2)), 2: set(range(inter))}  # layer 2 loses its MLP
    if kv > 1:
        groups[2] = {0}
    groups[3] = set(range(kv))
    channels[3] = set(range(inter))  # layer 3 emptied entirely
    return PruningPlan.from_removals(layout, groups, channels, remove_empty_layers)


@pytest.mark.parametrize("remove_empty_layers", [False, True])
@pytest.mark.parametrize(
    "arch,gqa,num_kv,extra",
    [
        ("llama", 1, 3, {}),
        ("llama", 2, 2, {"attention_bias": True, "mlp_bias": True}),
        ("mistral", 4, 2, {}),
        ("qwen2", 2, 3, {}),
    ],
)
def test_pruned_logits_equal_masked_dense(arch: str, gqa: int, num_kv: int, extra: dict,
                                          remove_empty_layers: bool) -> None:
    dense = tiny_model(arch, gqa=gqa, num_kv=num_kv, layers=4, **extra)
    layout = describe(dense)
    plan = _plan(dense, remove_empty_layers)
    pruned = apply_plan(dense, layout, plan, {})
    masked = copy.deepcopy(dense)
    mask_units(masked, layout, plan)

    ids = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = masked(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
        unmasked = dense(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (unmasked - expected).abs().max().item() > 1e-3  # the masking did change the model

    # the model really is smaller, by exactly the planned units
    removed = sum(
        (lp.num_groups - len(lp.keep_groups)) * layout.attention_group_cost(layer)
        + (lp.num_channels - len(lp.keep_channels)) * layout.mlp_channel_cost(layer)
        for layer, lp in zip(layout.layers, plan.layers, strict=True)
    )
    norms_dropped = sum(
        layout.hidden_size * ((not lp.keep_groups) + (not lp.keep_channels))
        for lp in plan.layers if not plan.dropped(lp.index)
    ) + sum(2 * layout.hidden_size for lp in plan.layers if plan.dropped(lp.index))
    assert sum(p.numel() for p in pruned.parameters()) == layout.total_params - removed - norms_dropped

    kept_layers = len(plan.kept_layers)
    has_out_bias = bool(extra.get("attention_bias"))
    assert kept_layers == (3 if remove_empty_layers and not has_out_bias else 4)
    assert pruned.config.num_hidden_layers == kept_layers


def test_generation_with_kv_cache_matches_full_recompute() -> None:
    """Layer 0 skips attention: the cache length must still come out right."""
    dense = tiny_model("llama", gqa=2, num_kv=2, layers=3)
    layout = describe(dense)
    plan = PruningPlan.from_removals(layout, {0: {0, 1}, 2: {1}}, {1: set(range(24))})
    pruned = apply_plan(dense, layout, plan, {})
    prompt = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(3))
    generated = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            step = pruned(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    assert torch.equal(generated, ids)
