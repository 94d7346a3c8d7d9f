"""Architecture adapter: where the pruning units of a Llama-style decoder live and what they cost.

A pruning unit is either
- an attention **GQA group**: one KV head and the query heads that share it (rows of q/k/v, with
  their biases where present, and the matching columns of o_proj), or
- an MLP **channel**: row i of gate_proj and up_proj (and their biases) and column i of down_proj.

The layout is read from the modules' actual shapes rather than from the config, so a model that
was already pruned (layers of different widths, skipped blocks) is described just as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gp_lightning.runtime.errors import ConfigError, UnsupportedArchitectureError

#: HF ``model_type`` values whose decoder layers have the Llama module structure.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gp_pruned")

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerLayout:
    """Shapes of one decoder layer, as far as pruning is concerned."""

    index: int
    num_kv_heads: int  # 0 when the attention block is skipped
    queries_per_kv: int
    head_dim: int
    intermediate_size: int  # 0 when the MLP block is skipped
    qkv_bias: bool
    o_bias: bool  # the attention output has a bias (o_proj's, or a pruned model's own output bias)
    mlp_in_bias: bool
    down_bias: bool  # likewise for the MLP output

    @property
    def has_attention(self) -> bool:
        return self.num_kv_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.queries_per_kv


@dataclass(frozen=True)
class ModelLayout:
    """The pruning view of a whole model."""

    model_type: str
    hidden_size: int
    head_dim: int
    queries_per_kv: int
    layers: tuple[LayerLayout, ...]
    total_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_group_cost(self, layer: LayerLayout) -> int:
        """Parameters removed with one GQA group: q/k/v rows (+ biases) and o_proj columns."""
        q_width = layer.queries_per_kv * layer.head_dim
        weights = self.hidden_size * q_width + 2 * self.hidden_size * layer.head_dim + q_width * self.hidden_size
        biases = (q_width + 2 * layer.head_dim) if layer.qkv_bias else 0
        return weights + biases

    def mlp_channel_cost(self, layer: LayerLayout) -> int:
        """Parameters removed with one MLP channel: gate/up rows (+ biases) and a down_proj column."""
        return 3 * self.hidden_size + (2 if layer.mlp_in_bias else 0)

    def layer_params(self, layer: LayerLayout, groups: int | None = None, channels: int | None = None) -> int:
        """Prunable parameters of ``layer`` (with ``groups``/``channels`` units left, if given)."""
        groups = layer.num_kv_heads if groups is None else groups
        channels = layer.intermediate_size if channels is None else channels
        return groups * self.attention_group_cost(layer) + channels * self.mlp_channel_cost(layer)

    @property
    def uniform_widths(self) -> bool:
        """Whether every layer has the same GQA groups and MLP channels (what a stock class can hold)."""
        return len({(x.num_kv_heads, x.intermediate_size) for x in self.layers}) <= 1

    @property
    def prunable_params(self) -> int:
        """Sum of the cost of every unit: all params of the projections except output biases."""
        return sum(self.layer_params(layer) for layer in self.layers)


def check_supported(model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported. gp-lightning prunes Llama-style decoders "
            f"with grouped-query attention: {', '.join(SUPPORTED_MODEL_TYPES)}. Convert the model to "
            "one of these, or open an issue asking for an adapter for this architecture."
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a causal-LM model (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `model.layers` ModuleList: it is not a Llama-style "
            f"causal LM. Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return layers


def attention_of(layer: nn.Module) -> nn.Module | None:
    return getattr(layer, "self_attn", None)


def mlp_of(layer: nn.Module) -> nn.Module | None:
    return getattr(layer, "mlp", None)


def head_dim_of(config: object) -> int:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    return int(config.hidden_size // config.num_attention_heads)  # type: ignore[attr-defined]


def describe(model: nn.Module) -> ModelLayout:
    """Read the pruning layout of ``model`` (an HF causal LM of a supported architecture)."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    check_supported(model_type)
    hidden = int(config.hidden_size)
    head_dim = head_dim_of_model(model)
    queries_per_kv = 0
    layers = []
    for idx, layer in enumerate(decoder_layers(model)):
        attn, mlp = attention_of(layer), mlp_of(layer)
        num_kv, qpk, qkv_bias, o_bias = 0, 0, False, False
        if attn is not None:
            _require_linears(attn, ATTENTION_PROJECTIONS, idx, "self_attn")
            num_kv = attn.k_proj.out_features // head_dim
            qpk = attn.q_proj.out_features // max(head_dim * num_kv, 1)
            if attn.q_proj.out_features != qpk * num_kv * head_dim or attn.k_proj.out_features % head_dim:
                raise UnsupportedArchitectureError(
                    f"Layer {idx}: q_proj ({attn.q_proj.out_features}) and k_proj "
                    f"({attn.k_proj.out_features}) widths are not whole GQA groups of head_dim {head_dim}."
                )
            qkv_bias = attn.q_proj.bias is not None
            o_bias = attn.o_proj.bias is not None
            queries_per_kv = queries_per_kv or qpk
        inter, in_bias, down_bias = 0, False, False
        if mlp is not None:
            _require_linears(mlp, MLP_PROJECTIONS, idx, "mlp")
            inter = mlp.gate_proj.out_features
            in_bias = mlp.gate_proj.bias is not None
            down_bias = mlp.down_proj.bias is not None
        # a block of a pruned model may add an output bias of its own (a skipped block's, a refit's)
        o_bias = o_bias or getattr(layer, "self_attn_output_bias", None) is not None
        down_bias = down_bias or getattr(layer, "mlp_output_bias", None) is not None
        layers.append(LayerLayout(idx, num_kv, qpk, head_dim, inter, qkv_bias, o_bias, in_bias, down_bias))
    if not queries_per_kv:
        queries_per_kv = int(config.num_attention_heads) // int(config.num_key_value_heads or 1)
    total = sum(p.numel() for p in model.parameters())
    return ModelLayout(model_type, hidden, head_dim, queries_per_kv, tuple(layers), total)


def head_dim_of_model(model: nn.Module) -> int:
    for layer in decoder_layers(model):
        attn = attention_of(layer)
        if attn is not None and getattr(attn, "head_dim", None):
            return int(attn.head_dim)
    return head_dim_of(model.config)


def _require_linears(block: nn.Module, names: tuple[str, ...], idx: int, where: str) -> None:
    for name in names:
        if not isinstance(getattr(block, name, None), nn.Linear):
            raise UnsupportedArchitectureError(
                f"Layer {idx} {where} has no nn.Linear '{name}': not a Llama-style block "
                f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})."
            )


def check_sequence_lengths(model: nn.Module | dict, lengths: dict[str, int]) -> None:
    """Windows longer than the model's positions (``max_position_embeddings``) are refused before any work:
    rotary models run past them without an error, but on positions they never saw, and memory grows with
    the square of the length. ``model``: the model, or its config.json read as a dict (before any load)."""
    config = model if isinstance(model, dict) else vars(model.config)
    limit = config.get("max_position_embeddings")
    for key, length in lengths.items():
        if limit is not None and length > limit:
            raise ConfigError(f"Config key '{key}' = {length} is invalid: the model has {limit} positions "
                              f"(max_position_embeddings); use at most {limit}.")
