"""A uniformly pruned model as the stock transformers class (``LlamaForCausalLM``, ...): no remote code at all.

Every layer has the same widths (``allocation: uniform_per_layer``), so the stock config holds them. Output
biases the compensation added go where the stock class has room: Llama's ``attention_bias`` / ``mlp_bias``
(the q/k/v and gate/up biases that come with them stay zero); Mistral and Qwen2 have no o_proj/down_proj
bias, so the pipeline refits them without one.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from gp_lightning.runtime.errors import ConfigError
from gp_lightning.surgery.pruned_config import architecture_keys, config_dict

#: The output-bias switch of each stock class: (attention, MLP); None: the class has none.
_BIAS_SWITCHES: dict[str, tuple[str | None, str | None]] = {
    "llama": ("attention_bias", "mlp_bias"), "mistral": (None, None), "qwen2": (None, None)}
#: The stock classes a uniformly pruned model can be saved as.
STOCK_CLASSES = tuple(_BIAS_SWITCHES)
#: Projections created (zero) by a switch besides the one that carries the output bias.
_SWITCHED = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _uniform_widths(raw: dict[str, Any]) -> dict[str, int]:
    # keys are layer numbers, saved as strings zero-padded to the widest ("00" ... "29"): read them as numbers
    table = {int(k): v for k, v in (raw.get("per_layer_config") or {}).items()}
    per_layer = [table.get(i, {}) for i in range(raw["num_hidden_layers"])]
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    shapes = {tuple(entry.get(k, raw[k]) for k in keys) for entry in per_layer}
    if len(shapes) != 1 or any(entry.get("skip") for entry in per_layer):
        raise ConfigError("only a model whose layers all have the same widths (allocation: uniform_per_layer) can be "
                          "saved as a stock checkpoint")
    return dict(zip(keys, shapes.pop(), strict=True))


def to_stock(pruned: PreTrainedModel) -> PreTrainedModel:
    """The stock-class model with the pruned model's weights (its logits are the pruned model's)."""
    config = pruned.config
    base = config.base_model_type
    if base not in _BIAS_SWITCHES:
        raise ConfigError(f"no stock class is known for '{base}'")
    raw = config_dict(config)
    data = architecture_keys(raw)
    data.update(_uniform_widths(raw))
    biases = getattr(config, "output_bias", None) or {}
    state = {k: v for k, v in pruned.state_dict().items() if not k.endswith("_output_bias")}
    for block, switch in zip(("self_attn", "mlp"), _BIAS_SWITCHES[base], strict=True):
        if not biases.get(block):
            continue
        if switch is None:
            raise ConfigError(f"stock {base} has no output bias for {block}; refit with compensation_bias: false")
        data[switch] = True
        for i in range(config.num_hidden_layers):
            for name in _SWITCHED[switch]:
                part = "self_attn" if switch == "attention_bias" else "mlp"
                key = f"model.layers.{i}.{part}.{name}"
                weight = state[f"{key}.weight"]
                state.setdefault(f"{key}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
            if i in biases[block]:
                proj = "self_attn.o_proj" if block == "self_attn" else "mlp.down_proj"
                added = pruned.state_dict()[f"model.layers.{i}.{block}_output_bias"]
                state[f"model.layers.{i}.{proj}.bias"] = state[f"model.layers.{i}.{proj}.bias"] + added
    data["gp_lightning_pruning"] = getattr(config, "pruning", {})
    stock_config = AutoConfig.for_model(base, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(stock_config, dtype=next(pruned.parameters()).dtype)
    if stock_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if stock_config.tie_word_embeddings:
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the stock model lacks weights for {missing[:5]}")
    return model.eval()
