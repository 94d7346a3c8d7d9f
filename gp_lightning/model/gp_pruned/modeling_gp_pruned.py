"""Modeling of a structurally pruned Llama-style model (shipped inside every pruned checkpoint).

Loaded through ``auto_map`` with ``trust_remote_code=True`` by processes that do not have
gp_lightning installed, so it imports only torch and transformers.

Each layer is built from its own entry of ``config.per_layer_config`` with the base architecture's
own attention/MLP/norm modules (Llama, Mistral or Qwen2), so the numerics are the stock ones. A
skipped block is the identity on the residual stream plus, where the checkpoint has one, an output
bias (``config.output_bias`` lists the blocks that carry one). A skipped attention block still
records a one-element-wide entry per token in the KV cache, so that every layer's cache length (which
generation and the masks read, from layer 0 by default) stays right.

transformers renames its cache argument from time to time (``past_key_values`` became ``cache`` in
5.24). This file takes either name from its callers and passes the cache on under the name the
installed transformers' own modules declare; a cache handed over under a name it does not know, or
a cached call that arrives without its cache, is an error instead of silently wrong tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gp_pruned import GPPrunedConfig

#: Revision of this file's code. A checkpoint whose shipped copy is older is repaired with
#: ``gp-lightning upgrade-checkpoint DIR``. 1: the original (``past_key_values`` only); 2: either
#: cache name, loud failures, ``output_bias``.
MODELING_REVISION = 2

#: Names transformers has used for the KV cache argument, newest first.
CACHE_NAMES = ("cache", "past_key_values")

_BASE_MODULES = {
    "llama": ("llama", "Llama"),
    "mistral": ("mistral", "Mistral"),
    "qwen2": ("qwen2", "Qwen2"),
}

_UPGRADE_HINT = ("Upgrade gp-lightning and run `gp-lightning upgrade-checkpoint <checkpoint dir>`, or install a "
                 "transformers release that this checkpoint's code supports.")


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers passes the KV cache in a way this modeling code does not know."""


def _cache_name(function: Callable[..., Any], what: str) -> str:
    """The keyword under which ``function`` (of the installed transformers) takes the KV cache."""
    parameters = inspect.signature(function).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise UnsupportedTransformersError(
        f"transformers {transformers.__version__}: {what} takes none of the cache arguments {CACHE_NAMES} that this "
        f"gp_pruned modeling code (revision {MODELING_REVISION}) knows. {_UPGRADE_HINT}"
    )


def _output_cache_field() -> str:
    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    for name in CACHE_NAMES:
        if name in fields:
            return name
    raise UnsupportedTransformersError(
        f"transformers {transformers.__version__}: BaseModelOutputWithPast has none of the fields {CACHE_NAMES}. "
        + _UPGRADE_HINT
    )


_MASK_CACHE = _cache_name(create_causal_mask, "create_causal_mask")
_OUTPUT_CACHE = _output_cache_field()


def take_cache(kwargs: dict[str, Any]) -> Cache | None:
    """Remove the KV cache from ``kwargs``, under whichever known name the caller used.

    A :class:`Cache` under any other keyword means a transformers release that renamed the argument
    again: ignoring it would recompute without the past and generate wrong tokens, so it is an error.
    """
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if name in kwargs}
    caches = [value for value in given.values() if value is not None]
    if len(caches) > 1:
        raise ValueError(f"Pass the KV cache once, as `cache`, not as both of {sorted(given)}.")
    stray = sorted(key for key, value in kwargs.items() if isinstance(value, Cache))
    if stray:
        raise UnsupportedTransformersError(
            f"transformers {transformers.__version__} passed the KV cache as {stray}, which this gp_pruned modeling "
            f"code (revision {MODELING_REVISION}) does not read. {_UPGRADE_HINT}"
        )
    return caches[0] if caches else None


@dataclass(frozen=True)
class _BaseParts:
    attention: type[nn.Module]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]
    cache_name: str  # keyword under which the attention module takes the cache


def _base_parts(base_model_type: str) -> _BaseParts:
    if base_model_type not in _BASE_MODULES:
        raise ValueError(
            f"GPPruned checkpoints support base_model_type in {sorted(_BASE_MODULES)}, got '{base_model_type}'."
        )
    package, prefix = _BASE_MODULES[base_model_type]
    module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    attention = getattr(module, f"{prefix}Attention")
    return _BaseParts(
        attention=attention,
        mlp=getattr(module, f"{prefix}MLP"),
        norm=getattr(module, f"{prefix}RMSNorm"),
        rotary=getattr(module, f"{prefix}RotaryEmbedding"),
        cache_name=_cache_name(attention.forward, f"{prefix}Attention.forward"),
    )


def _layer_type(config: GPPrunedConfig, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    if config.base_model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


def _has_output_bias(config: GPPrunedConfig, block: str, layer_idx: int, skipped: bool) -> bool:
    """Whether the block's output gets a bias of its own (beyond what its stock modules hold).

    ``config.output_bias`` (block -> layer indices) lists them; checkpoints without that key carry one
    only where a skipped block's base o_proj / down_proj had a bias (Llama's attention_bias / mlp_bias).
    """
    listed = getattr(config, "output_bias", None)
    if listed is not None:
        return layer_idx in listed.get(block, [])
    if not skipped or config.base_model_type != "llama":
        return False
    return bool(getattr(config, "attention_bias" if block == "self_attn" else "mlp_bias", False))


def _bias(hidden_size: int, present: bool) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(hidden_size)) if present else None


class GPPrunedDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer with its own widths; either block may be skipped or carry an output bias."""

    def __init__(self, config: GPPrunedConfig, layer_idx: int, parts: _BaseParts, global_config: GPPrunedConfig
                 ) -> None:
        super().__init__()
        skip = set(getattr(config, "skip", None) or [])
        self.layer_idx = layer_idx
        self.cache_name = parts.cache_name
        self.attention_type = _layer_type(config, layer_idx)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        attn_skipped, mlp_skipped = "self_attn" in skip, "mlp" in skip
        self.self_attn = None if attn_skipped else parts.attention(config=config, layer_idx=layer_idx)
        self.input_layernorm = None if attn_skipped else parts.norm(hidden, eps=eps)
        self.self_attn_output_bias = _bias(hidden, _has_output_bias(global_config, "self_attn", layer_idx,
                                                                    attn_skipped))
        self.mlp = None if mlp_skipped else parts.mlp(config)
        self.post_attention_layernorm = None if mlp_skipped else parts.norm(hidden, eps=eps)
        self.mlp_output_bias = _bias(hidden, _has_output_bias(global_config, "mlp", layer_idx, mlp_skipped))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cache = take_cache(kwargs)
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{self.cache_name: cache},
                **kwargs,
            )
            hidden_states = hidden_states + attn_out
        elif cache is not None:  # keep this layer's cache length equal to the others'
            # one head of width 1: transformers reads a layer's length from its shape and takes an empty
            # tensor (no heads) for an empty cache, which breaks the masks of padded batches
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder.clone(), self.layer_idx)
        if self.self_attn_output_bias is not None:
            hidden_states = hidden_states + self.self_attn_output_bias
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_output_bias is not None:
            hidden_states = hidden_states + self.mlp_output_bias
        return hidden_states


class GPPrunedPreTrainedModel(PreTrainedModel):
    config_class = GPPrunedConfig
    config: GPPrunedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPPrunedDecoderLayer"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


def _check_cache_arrived(cache: Cache | None, use_cache: bool, attention_mask: torch.Tensor | None,
                         length: int) -> None:
    """A 2-D attention mask longer than the input means past tokens: their cache must have come with it."""
    if cache is None and attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] > length:
        raise UnsupportedTransformersError(
            f"transformers {transformers.__version__} called the model with {attention_mask.shape[-1] - length} past "
            f"tokens in the attention mask but no KV cache that this gp_pruned modeling code (revision "
            f"{MODELING_REVISION}) recognizes (use_cache={use_cache}). {_UPGRADE_HINT}"
        )


class GPPrunedModel(GPPrunedPreTrainedModel):
    def __init__(self, config: GPPrunedConfig) -> None:
        super().__init__(config)
        parts = _base_parts(config.base_model_type)
        self.cache_name = parts.cache_name
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GPPrunedDecoderLayer(config.per_layer_config[i], i, parts, config) for i in range(config.num_hidden_layers)]
        )
        self.norm = parts.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = parts.rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        cache = take_cache(kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        _check_cache_arrived(cache, use_cache, attention_mask, inputs_embeds.shape[1])
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       "position_ids": position_ids, _MASK_CACHE: cache}
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
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{self.cache_name: cache},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_OUTPUT_CACHE: cache})


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
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = take_cache(kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{self.model.cache_name: cache},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: getattr(outputs, _OUTPUT_CACHE)})


__all__ = ["GPPrunedForCausalLM", "GPPrunedModel", "GPPrunedPreTrainedModel"]
