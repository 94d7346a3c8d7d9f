"""What each layer of a checkpoint becomes in llama.cpp's ``deci`` architecture (per-layer head and FFN widths).

``deci`` (written for Nemotron-51B/253B) sizes every layer from per-layer arrays, which is exactly
what an unevenly pruned model needs. Its graph has three traps that this module plans around, each
with an exact zero-weight placeholder instead of a different model:

- a layer with ``feed_forward_length == 0`` skips to the next layer *before* keeping its attention
  output, so an emptied MLP behind a kept attention becomes one zero channel (silu(0) * 0 = 0);
- the head dimension is read only when layer 0 has heads, so an emptied attention in layer 0 (and any
  emptied block that carries an output bias) becomes one zero KV group whose ``attn_output.bias``
  holds the bias;
- a layer with neither block is the identity and is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gp_lightning.runtime.errors import ModelSourceError

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LayerPlan:
    """One layer as written: its source index, widths, and which blocks are zero placeholders."""

    source: int  # layer index in the checkpoint
    heads: int  # query heads written (0: no attention)
    kv_heads: int
    ff: int  # MLP channels written (0: no MLP)
    attention: bool  # the checkpoint has this attention (else: absent or placeholder)
    mlp: bool
    attn_out_bias: bool  # a self_attn_output_bias tensor exists
    mlp_out_bias: bool

    @property
    def attention_placeholder(self) -> bool:
        return self.heads > 0 and not self.attention

    @property
    def mlp_placeholder(self) -> bool:
        return self.ff > 0 and not self.mlp


@dataclass(frozen=True)
class ModelPlan:
    """The checkpoint's architecture as llama.cpp will see it."""

    base_type: str
    config: dict[str, Any]
    layers: list[LayerPlan]
    head_dim: int
    queries_per_kv: int
    tied: bool

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"'{model_dir}' has no config.json: pass a Hugging Face checkpoint directory "
                               "(a pruned run's model/ or a dense llama/mistral/qwen2 model)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelSourceError(f"'{path}' is not valid JSON ({exc}); re-save the checkpoint") from exc


def plan_model(config: dict[str, Any], context_length: int | None = None) -> ModelPlan:
    """Per-layer shapes of a gp_pruned or dense checkpoint, refusing what ``deci`` would run differently."""
    model_type = config.get("model_type")
    base_type = config.get("base_model_type", "llama") if model_type == "gp_pruned" else model_type
    if base_type not in SUPPORTED:
        raise ModelSourceError(f"export-gguf supports {', '.join(SUPPORTED)} (and their gp_pruned checkpoints), "
                               f"not model_type '{model_type}'")
    _check_window(config, base_type, context_length)
    if config.get("hidden_act", "silu") != "silu":
        raise ModelSourceError(f"llama.cpp's deci graph uses SiLU; this model uses {config['hidden_act']}")
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    per_layer = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}
    biases = config.get("output_bias") or {}
    layers: list[LayerPlan] = []
    for i in range(int(config["num_hidden_layers"])):
        entry = per_layer.get(i, {})
        skip = set(entry.get("skip") or [])
        attention, mlp = "self_attn" not in skip, "mlp" not in skip
        attn_bias, mlp_bias = i in biases.get("self_attn", []), i in biases.get("mlp", [])
        if not attention and not mlp and not attn_bias and not mlp_bias:
            continue  # the identity
        layer_kv = int(entry.get("num_key_value_heads", kv)) if attention else 0
        layer_heads = int(entry.get("num_attention_heads", heads)) if attention else 0
        if not attention and (attn_bias or not layers):
            layer_kv, layer_heads = 1, heads // kv  # placeholder: one zero KV group
        ff = int(entry.get("intermediate_size", config["intermediate_size"])) if mlp else 0
        if not mlp and (mlp_bias or layer_heads > 0):
            ff = 1  # placeholder: one zero channel
        layers.append(LayerPlan(i, layer_heads, layer_kv, ff, attention, mlp, attn_bias, mlp_bias))
    if not layers:
        raise ModelSourceError("every layer of this checkpoint is empty; there is nothing for llama.cpp to run")
    return ModelPlan(base_type, config, layers, head_dim, heads // kv, bool(config.get("tie_word_embeddings")))


def _check_window(config: dict[str, Any], base_type: str, context_length: int | None) -> None:
    """``deci`` has no sliding-window attention: a window shorter than the context would change the model."""
    window = config.get("sliding_window")
    types = config.get("layer_types") or []
    uses_window = ("sliding_attention" in types or (base_type == "mistral" and window)
                   or (base_type == "qwen2" and config.get("use_sliding_window") and window))
    if not uses_window or window is None:
        return
    context = context_length or int(config["max_position_embeddings"])
    if context > int(window):
        raise ModelSourceError(
            f"this model attends within a sliding window of {window} tokens, which llama.cpp's deci graph ignores: "
            f"beyond {window} tokens it would be a different model. Pass --context_length {window} (or less) to "
            "export a GGUF that is exact up to that length")


def rope_keys(config: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """``(theta, scaling type, parameters)`` from transformers 5's ``rope_parameters`` or the older keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelSourceError(f"export-gguf writes default, linear and llama3 RoPE; this model uses '{kind}'")
    return theta, kind, params
