"""The gp_pruned config of a model after a plan: per-layer widths, skipped blocks, output biases, provenance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gp_lightning.model.gp_pruned.configuration_gp_pruned import GPPrunedConfig
from gp_lightning.model.layout import ModelLayout
from gp_lightning.selection.plan import PruningPlan

if TYPE_CHECKING:
    from gp_lightning.compensation.run import Compensation

#: Config keys of the dense config that must not be copied into the pruned one.
_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "per_layer_config",
                     "base_model_type", "pruning", "quantization_config", "output_bias",
                     "allow_global_per_layer_attribute_access", "serialize_explicit_per_layer_config")


def pruned_config(dense_config: Any, layout: ModelLayout, plan: PruningPlan, provenance: dict,
                  compensation: Compensation | None = None) -> GPPrunedConfig:
    """The GPPrunedConfig describing the model after ``plan`` (and its compensation's output biases)."""
    base = architecture_keys(config_dict(dense_config))
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
    base["output_bias"] = _output_biases(dense_config, layout, plan, compensation)
    if isinstance(base.get("layer_types"), list):
        base["layer_types"] = [base["layer_types"][old] for old in kept]
    if "max_window_layers" in base:
        base["max_window_layers"] = sum(1 for old in kept if old < base["max_window_layers"])
    provenance = dict(provenance, original_layers=kept, original_num_hidden_layers=layout.num_layers)
    config = GPPrunedConfig(base_model_type=base_type, pruning=provenance, per_layer_config=per_layer, **base)
    config.architectures = ["GPPrunedForCausalLM"]
    return config


def _output_biases(dense_config: Any, layout: ModelLayout, plan: PruningPlan,
                   compensation: Compensation | None) -> dict[str, list[int]]:
    """Per block, the (new) indices of the layers whose block output carries a bias of its own.

    That is a skipped block whose o_proj / down_proj had a bias, every block that already carried
    one in a model pruned before, and every block the compensation gave a bias its projection had no
    tensor for (or that it skips).
    """
    before = getattr(dense_config, "output_bias", None) or {}
    refit = {} if compensation is None else compensation.biases
    own = set() if compensation is None else compensation.own_bias
    biases: dict[str, list[int]] = {"self_attn": [], "mlp": []}
    for new, old in enumerate(plan.kept_layers):
        layer, lp = layout.layers[old], plan.layers[old]
        for block, kept, has_bias in (("self_attn", lp.keep_groups, layer.o_bias),
                                      ("mlp", lp.keep_channels, layer.down_bias)):
            added = (old, block) in refit and (not kept or (old, block) not in own)
            if old in before.get(block, []) or (not kept and has_bias) or added:
                biases[block].append(new)
    return biases


def architecture_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that name a class or describe a pruning (what a new config inherits)."""
    return {k: v for k, v in data.items() if k not in _DROP_CONFIG_KEYS}


def config_dict(config: Any) -> dict[str, Any]:
    """``config.to_dict()`` that also reads a per-layer config's global attributes, with ``dtype`` as text."""
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
