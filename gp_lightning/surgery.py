"""Surgery: physically remove the planned units, so the model really gets smaller and faster.

Everything works tensor by tensor on ``(name, tensor)`` pairs, so the same code slices a model's
in-memory state dict and (later) checkpoint shards streamed from disk. A layer whose attention
(MLP) lost every unit skips that block; with ``remove_empty_layers`` a layer that lost both is
dropped and the following layers are renumbered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers.initialization import no_init_weights

from gp_lightning.architecture import LayerLayout, ModelLayout, decoder_layers
from gp_lightning.export import GPPrunedConfig, GPPrunedForCausalLM
from gp_lightning.plan import LayerPlan, PruningPlan

_LAYER_PARAM = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")

#: Config keys of the dense config that must not be copied into the pruned one.
_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "per_layer_config",
                     "base_model_type", "pruning", "quantization_config", "output_bias",
                     "allow_global_per_layer_attribute_access", "serialize_explicit_per_layer_config")


def _rows(groups: list[int], width: int) -> torch.Tensor:
    return torch.tensor([g * width + i for g in groups for i in range(width)], dtype=torch.long)


class TensorSlicer:
    """Maps a dense parameter ``(name, tensor)`` to its pruned form, or to nothing."""

    def __init__(self, layout: ModelLayout, plan: PruningPlan) -> None:
        self.layout = layout
        self.plan = plan
        kept = plan.kept_layers
        self.new_index = {old: new for new, old in enumerate(kept)}

    def __call__(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        match = _LAYER_PARAM.match(name)
        if match is None:
            return name, tensor
        old = int(match["idx"])
        if old not in self.new_index:
            return None
        result = self._slice(self.layout.layers[old], self.plan.layers[old], match["rest"], tensor)
        if result is None:
            return None
        rest, sliced = result
        return f"{match['prefix']}.{self.new_index[old]}.{rest}", sliced

    def _slice(self, layer: LayerLayout, lp: LayerPlan, rest: str, tensor: torch.Tensor
               ) -> tuple[str, torch.Tensor] | None:
        attn_gone = not lp.keep_groups
        mlp_gone = not lp.keep_channels
        hd, qpk = layer.head_dim, layer.queries_per_kv
        if rest.startswith("self_attn."):
            if attn_gone:
                return ("self_attn_output_bias", tensor.clone()) if rest == "self_attn.o_proj.bias" else None
            proj, kind = rest.split(".")[1:3]
            if proj == "q_proj":
                return rest, tensor.index_select(0, _rows(lp.keep_groups, qpk * hd))
            if proj in ("k_proj", "v_proj"):
                return rest, tensor.index_select(0, _rows(lp.keep_groups, hd))
            if proj == "o_proj" and kind == "weight":
                return rest, tensor.index_select(1, _rows(lp.keep_groups, qpk * hd))
            return rest, tensor.clone()
        if rest.startswith("mlp."):
            if mlp_gone:
                return ("mlp_output_bias", tensor.clone()) if rest == "mlp.down_proj.bias" else None
            proj, kind = rest.split(".")[1:3]
            keep = torch.tensor(lp.keep_channels, dtype=torch.long)
            if proj in ("gate_proj", "up_proj"):
                return rest, tensor.index_select(0, keep)
            if proj == "down_proj" and kind == "weight":
                return rest, tensor.index_select(1, keep)
            return rest, tensor.clone()
        if rest.startswith("input_layernorm.") and attn_gone:
            return None
        if rest.startswith("post_attention_layernorm.") and mlp_gone:
            return None
        return rest, tensor

    def apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            out = self(name, tensor)
            if out is not None:
                yield out


def pruned_config(dense_config: Any, layout: ModelLayout, plan: PruningPlan, provenance: dict) -> GPPrunedConfig:
    """The GPPrunedConfig describing the model after ``plan``."""
    base = {k: v for k, v in _config_dict(dense_config).items() if k not in _DROP_CONFIG_KEYS}
    base_type = getattr(dense_config, "base_model_type", None) or dense_config.model_type
    kept = plan.kept_layers
    per_layer: dict[int, dict[str, Any]] = {}
    for new, old in enumerate(kept):
        lp, layer = plan.layers[old], layout.layers[old]
        entry: dict[str, Any] = {}
        skip = []
        if lp.keep_groups:
            entry["num_key_value_heads"] = len(lp.keep_groups)
            entry["num_attention_heads"] = len(lp.keep_groups) * layer.queries_per_kv
        else:
            skip.append("self_attn")
        if lp.keep_channels:
            entry["intermediate_size"] = len(lp.keep_channels)
        else:
            skip.append("mlp")
        if skip:
            entry["skip"] = skip
        per_layer[new] = entry
    base["num_hidden_layers"] = len(kept)
    base["head_dim"] = layout.head_dim
    base["output_bias"] = _output_biases(dense_config, layout, plan)
    if isinstance(base.get("layer_types"), list):
        base["layer_types"] = [base["layer_types"][old] for old in kept]
    if "max_window_layers" in base:
        base["max_window_layers"] = sum(1 for old in kept if old < base["max_window_layers"])
    provenance = dict(provenance, original_layers=kept, original_num_hidden_layers=layout.num_layers)
    config = GPPrunedConfig(base_model_type=base_type, pruning=provenance, per_layer_config=per_layer, **base)
    config.architectures = ["GPPrunedForCausalLM"]
    return config


def _output_biases(dense_config: Any, layout: ModelLayout, plan: PruningPlan) -> dict[str, list[int]]:
    """Per block, the (new) indices of the layers whose block output carries a bias of its own.

    That is a skipped block whose o_proj / down_proj had a bias, and every block that already carried
    one in a model pruned before.
    """
    before = getattr(dense_config, "output_bias", None) or {}
    biases: dict[str, list[int]] = {"self_attn": [], "mlp": []}
    for new, old in enumerate(plan.kept_layers):
        layer, lp = layout.layers[old], plan.layers[old]
        if old in before.get("self_attn", []) or (not lp.keep_groups and layer.o_bias):
            biases["self_attn"].append(new)
        if old in before.get("mlp", []) or (not lp.keep_channels and layer.down_bias):
            biases["mlp"].append(new)
    return biases


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "allow_global_per_layer_attribute_access"):
        previous = config.allow_global_per_layer_attribute_access
        config.allow_global_per_layer_attribute_access = True
        try:
            data = config.to_dict()
        finally:
            config.allow_global_per_layer_attribute_access = previous
    else:
        data = config.to_dict()
    for key, value in list(data.items()):
        if key == "dtype" and value is not None and not isinstance(value, str):
            data[key] = str(value).removeprefix("torch.")
    return data


def apply_plan(model: nn.Module, layout: ModelLayout, plan: PruningPlan, provenance: dict) -> GPPrunedForCausalLM:
    """Return a new, physically smaller model carrying the dense model's remaining weights."""
    config = pruned_config(model.config, layout, plan, provenance)
    config._attn_implementation = getattr(model.config, "_attn_implementation", None)
    dtype = next(model.parameters()).dtype
    device = torch.get_default_device()  # where a freshly constructed model would live
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    dense = model.state_dict()
    dense_storages = {tensor.untyped_storage().data_ptr() for tensor in dense.values()}
    state = {}
    for name, tensor in TensorSlicer(layout, plan).apply(dense.items()):
        if name in tied:
            continue  # the embedding, tied below
        tensor = tensor.to(device=device, dtype=dtype)
        if tensor.untyped_storage().data_ptr() in dense_storages:  # passed through unsliced: own it
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        state[name] = tensor
    del dense
    # Parameters on the meta device and no initialization: random weights that loading would overwrite
    # were most of the surgery's time. Buffers computed at construction (rotary frequencies) stay real.
    with init_empty_weights(include_buffers=False), no_init_weights():
        pruned = GPPrunedForCausalLM(config)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"Surgery produced a state dict that does not fit: missing={missing}, unexpected={unexpected}")
    if tied:
        pruned.tie_weights()
        if pruned.lm_head.weight is not pruned.model.embed_tokens.weight:
            raise RuntimeError("Surgery could not tie lm_head to the input embeddings")
    pruned.to(dtype)  # the buffers follow the weights' dtype, as in a model built and then cast
    left = [name for name, tensor in (*pruned.named_parameters(), *pruned.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"Surgery left tensors without data: {left}")
    pruned.generation_config = model.generation_config
    return pruned.eval()


@torch.no_grad()
def mask_units(model: nn.Module, layout: ModelLayout, plan: PruningPlan) -> None:
    """Zero the planned units in a dense model in place (the reference that surgery must equal)."""
    for layer, lp, module in zip(layout.layers, plan.layers, decoder_layers(model), strict=True):
        gone = sorted(set(range(lp.num_groups)) - set(lp.keep_groups))
        if gone:
            attn = module.self_attn
            q_rows = _rows(gone, layer.queries_per_kv * layer.head_dim)
            kv_rows = _rows(gone, layer.head_dim)
            for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
        gone_c = torch.tensor(sorted(set(range(lp.num_channels)) - set(lp.keep_channels)), dtype=torch.long)
        if gone_c.numel():
            mlp = module.mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[gone_c] = 0
                if proj.bias is not None:
                    proj.bias[gone_c] = 0
            mlp.down_proj.weight[:, gone_c] = 0
