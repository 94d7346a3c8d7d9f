"""Modeling of a structurally pruned Llama-style model (shipped inside every pruned checkpoint).

Loaded through ``auto_map`` with ``trust_remote_code=True`` by processes that do not have
gp_lightning installed, so it imports only torch and transformers.

Each layer is built from its own entry of ``config.per_layer_config`` with the base architecture's
own attention/MLP/norm modules (Llama, Mistral or Qwen2), so the numerics are the stock ones. A
skipped block is the identity on the residual stream (plus the block's output bias, if the
architecture has one). A skipped attention block still records an empty entry in the KV cache so
that the cache length (read from layer 0 during generation) stays right.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gp_pruned import GPPrunedConfig

_BASE_MODULES = {
    "llama": ("llama", "Llama"),
    "mistral": ("mistral", "Mistral"),
    "qwen2": ("qwen2", "Qwen2"),
}


@dataclass(frozen=True)
class _BaseParts:
    attention: type[nn.Module]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]


def _base_parts(base_model_type: str) -> _BaseParts:
    if base_model_type not in _BASE_MODULES:
        raise ValueError(
            f"GPPruned checkpoints support base_model_type in {sorted(_BASE_MODULES)}, got '{base_model_type}'."
        )
    package, prefix = _BASE_MODULES[base_model_type]
    module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    return _BaseParts(
        attention=getattr(module, f"{prefix}Attention"),
        mlp=getattr(module, f"{prefix}MLP"),
        norm=getattr(module, f"{prefix}RMSNorm"),
        rotary=getattr(module, f"{prefix}RotaryEmbedding"),
    )


def _layer_type(config: GPPrunedConfig, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    if config.base_model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


def _has_output_bias(config: GPPrunedConfig, block: str) -> bool:
    """Whether the base architecture's o_proj / down_proj carries a bias."""
    if config.base_model_type != "llama":
        return False
    return bool(getattr(config, "attention_bias" if block == "self_attn" else "mlp_bias", False))


class GPPrunedDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer with its own widths; either block may be skipped."""

    def __init__(self, config: GPPrunedConfig, layer_idx: int, parts: _BaseParts) -> None:
        super().__init__()
        skip = set(getattr(config, "skip", None) or [])
        self.layer_idx = layer_idx
        self.attention_type = _layer_type(config, layer_idx)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eps = config.rms_norm_eps
        if "self_attn" in skip:
            self.self_attn = None
            self.input_layernorm = None
            bias = torch.zeros(config.hidden_size) if _has_output_bias(config, "self_attn") else None
            self.self_attn_output_bias = nn.Parameter(bias) if bias is not None else None
        else:
            self.self_attn = parts.attention(config=config, layer_idx=layer_idx)
            self.input_layernorm = parts.norm(config.hidden_size, eps=eps)
        if "mlp" in skip:
            self.mlp = None
            self.post_attention_layernorm = None
            bias = torch.zeros(config.hidden_size) if _has_output_bias(config, "mlp") else None
            self.mlp_output_bias = nn.Parameter(bias) if bias is not None else None
        else:
            self.mlp = parts.mlp(config)
            self.post_attention_layernorm = parts.norm(config.hidden_size, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            residual = hidden_states
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = residual + attn_out
        else:
            if past_key_values is not None:
                batch, length = hidden_states.shape[:2]
                empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
                past_key_values.update(empty, empty.clone(), self.layer_idx)
            if self.self_attn_output_bias is not None:
                hidden_states = hidden_states + self.self_attn_output_bias
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.mlp_output_bias is not None:
            hidden_states = hidden_states + self.mlp_output_bias
        return hidden_states


class GPPrunedPreTrainedModel(PreTrainedModel):
    config_class = GPPrunedConfig
    config: GPPrunedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPPrunedDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class GPPrunedModel(GPPrunedPreTrainedModel):
    def __init__(self, config: GPPrunedConfig) -> None:
        super().__init__(config)
        parts = _base_parts(config.base_model_type)
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GPPrunedDecoderLayer(config.per_layer_config[i], i, parts) for i in range(config.num_hidden_layers)]
        )
        self.norm = parts.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = parts.rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        }
        kinds = {layer.attention_type for layer in self.layers}
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.attention_type],
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class GPPrunedForCausalLM(GPPrunedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GPPrunedConfig) -> None:
        super().__init__(config)
        self.model = GPPrunedModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


__all__ = ["GPPrunedForCausalLM", "GPPrunedModel", "GPPrunedPreTrainedModel"]
