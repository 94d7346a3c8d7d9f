"""Config of a structurally pruned Llama-style model (shipped inside every pruned checkpoint).

This file is copied next to ``config.json`` and named in its ``auto_map``, so any Python process
with transformers can load the checkpoint with ``trust_remote_code=True``; it must therefore not
import gp_lightning.

Per-layer shapes use the transformers heterogeneous-config schema: ``per_layer_config`` maps a
layer index to the attributes that differ there (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``) and to ``skip``, the list of blocks
(``self_attn``, ``mlp``) that were pruned away entirely. Stock ``LlamaConfig`` cannot hold this (it
validates head counts globally), hence a config class of its own.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class GPPrunedConfig(PreTrainedConfig):
    """A Llama / Mistral / Qwen2 config whose layers may differ in width or skip blocks.

    ``base_model_type`` names the architecture the model was pruned from; its attention, MLP, norm
    and rotary modules are reused unchanged. Every other attribute is the base config's, with the
    original (unpruned) widths as global values and the pruned widths in ``per_layer_config``.
    ``pruning`` records provenance (original layer indices, ratio, method).
    """

    model_type = "gp_pruned"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, base_model_type: str = "llama", pruning: dict | None = None, **kwargs: object) -> None:
        self.base_model_type = base_model_type
        self.pruning = pruning or {}
        super().__init__(**kwargs)
