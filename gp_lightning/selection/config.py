"""The selection group: the budget, depth pruning, and per-layer limits on what selection may take.

Global selection can empty a layer whose importance happens to be small in scale; these limits
bound the damage. All rates are fractions of a layer's prunable parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gp_lightning.runtime.errors import ConfigError, check_config

if TYPE_CHECKING:  # the config stays importable without torch
    from gp_lightning.model.layout import LayerLayout, ModelLayout


@dataclass(frozen=True)
class LayerLimits:
    """What selection may and must remove from one layer."""

    layer_idx: int
    candidate: bool  # False: protected or outside [layer_start, layer_end)
    cap_params: int  # remove at most this many parameters
    need_params: int  # remove at least this many (min_rate)
    max_groups: int  # attention groups that may go
    max_channels: int  # MLP channels that may go

    def upper_bound(self, group_cost: int, channel_cost: int) -> int:
        if not self.candidate:
            return 0
        return min(self.cap_params, self.max_groups * group_cost + self.max_channels * channel_cost)


Allocation = Literal["global", "uniform_per_layer", "search"]


@dataclass
class SelectionConfig:
    """Selection (budget and per-layer limits)"""

    pruning_ratio: float = 0.2
    """Fraction of ALL model parameters to remove (embeddings and lm_head count in the total but are never
    pruned). Must be in (0, 1)."""
    allocation: Allocation = "global"
    """``global``: the lowest scores anywhere go first, so layers end up with different widths (a gp_pruned
    checkpoint; llama.cpp runs it as a ``deci`` GGUF). ``uniform_per_layer``: every layer keeps the same number
    of GQA groups and MLP channels (Minitron's homogeneous shape; the split between attention and MLP is the
    global selection's, and each layer loses its own lowest-score units), saved as the stock
    Llama/Mistral/Qwen2 class that vLLM, TGI, TensorRT-LLM and llama.cpp's ``llama`` run. The per-layer limits
    below do not apply to it. ``search``: each block's width chosen by evolutionary search on the KL divergence
    from the dense model's next-token distributions, seeded with the ``global`` and uniform allocations (never
    worse than either on its windows; the ``search_*`` keys, ``analysis/search.json``); a gp_pruned checkpoint."""
    remove_empty_layers: bool = False
    """Depth pruning: blocks may be emptied entirely (min_attention_groups / min_mlp_channels no longer apply)
    and a layer whose attention and MLP are both emptied is dropped."""
    min_rate: float = 0.0
    """Every candidate layer loses at least this fraction of its prunable parameters."""
    max_rate: float = 1.0
    """No layer loses more than this fraction of its prunable parameters."""
    early_layers: int = 0
    """Number of first layers capped by ``early_layer_max_rate``."""
    early_layer_max_rate: float = 1.0
    """Rate cap of the first ``early_layers`` layers."""
    protected_layers: list[int] = field(default_factory=list)
    """Layer indices that are never pruned, e.g. ``[0, 1, 29]``."""
    min_attention_groups: int = 1
    """GQA groups every layer keeps (not applied with remove_empty_layers)."""
    min_mlp_channels: int = 1
    """MLP channels every layer keeps (not applied with remove_empty_layers)."""
    layer_start: int = 0
    """First layer whose units are candidates for pruning."""
    layer_end: int | None = None
    """One past the last candidate layer (null: up to the last layer)."""

    def __post_init__(self) -> None:
        def bad(key: str, rule: str) -> ConfigError:
            return ConfigError(f"Config key '{key}' = {getattr(self, key)!r} is invalid: it {rule}.")

        check_config(0.0 < self.pruning_ratio < 1.0, "pruning_ratio", self.pruning_ratio,
                     "must be strictly between 0 and 1 (e.g. 0.2 removes 20% of all parameters)")
        for key in ("min_rate", "max_rate", "early_layer_max_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "is a fraction of a layer's prunable parameters, in [0, 1]")
        if self.min_rate > self.max_rate:
            raise bad("min_rate", f"must not exceed max_rate ({self.max_rate})")
        if self.early_layers > 0 and self.min_rate > self.early_layer_max_rate:
            raise bad("min_rate", f"must not exceed early_layer_max_rate ({self.early_layer_max_rate})")
        for key in ("early_layers", "min_attention_groups", "min_mlp_channels", "layer_start"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if any(i < 0 for i in self.protected_layers):
            raise bad("protected_layers", "lists layer indices, which are >= 0")
        if self.layer_end is not None and self.layer_end <= self.layer_start:
            raise bad("layer_end", f"must be greater than layer_start ({self.layer_start}), or null")
        if self.allocation == "uniform_per_layer":
            per_layer = {"remove_empty_layers": False, "min_rate": 0.0, "max_rate": 1.0, "early_layers": 0,
                         "protected_layers": [], "layer_start": 0, "layer_end": None}
            changed = [key for key, default in per_layer.items() if getattr(self, key) != default]
            if changed:
                raise ConfigError(f"allocation: uniform_per_layer gives every layer the same shape, so it cannot be "
                                  f"combined with {', '.join(changed)}: drop those keys or use allocation: global.")

    @property
    def kept_groups(self) -> int:
        """GQA groups every block keeps (none with depth pruning)."""
        return 0 if self.remove_empty_layers else self.min_attention_groups

    @property
    def kept_channels(self) -> int:
        """MLP channels every block keeps (none with depth pruning)."""
        return 0 if self.remove_empty_layers else self.min_mlp_channels

    def check_layout(self, layout: ModelLayout) -> None:
        """Errors that need the model: layer indices beyond its depth."""
        if self.layer_start >= layout.num_layers:
            raise ConfigError(f"Config key 'layer_start' = {self.layer_start} is invalid: the model has only "
                              f"{layout.num_layers} layers.")
        beyond = [i for i in self.protected_layers if i >= layout.num_layers]
        if beyond:
            raise ConfigError(f"Config key 'protected_layers' names layers {beyond}, but the model has only "
                              f"{layout.num_layers} layers (0-{layout.num_layers - 1}).")

    def end(self, layout: ModelLayout) -> int:
        return layout.num_layers if self.layer_end is None else min(self.layer_end, layout.num_layers)

    def cap_rate(self, layer_idx: int) -> float:
        if layer_idx < self.early_layers:
            return min(self.max_rate, self.early_layer_max_rate)
        return self.max_rate

    def limits(self, layout: ModelLayout, layer: LayerLayout) -> LayerLimits:
        candidate = self.layer_start <= layer.index < self.end(layout) and layer.index not in self.protected_layers
        total = layout.layer_params(layer)
        return LayerLimits(
            layer_idx=layer.index,
            candidate=candidate,
            cap_params=math.floor(self.cap_rate(layer.index) * total + 1e-6) if candidate else 0,
            need_params=math.ceil(self.min_rate * total - 1e-6) if candidate else 0,
            max_groups=max(layer.num_kv_heads - self.kept_groups, 0) if candidate else 0,
            max_channels=max(layer.intermediate_size - self.kept_channels, 0) if candidate else 0,
        )

    def describe(self) -> str:
        parts = []
        if self.max_rate < 1:
            parts.append(f"max_rate={self.max_rate}")
        if self.early_layers and self.early_layer_max_rate < 1:
            parts.append(f"early_layer_max_rate={self.early_layer_max_rate} on {self.early_layers} early layers")
        if self.protected_layers:
            parts.append(f"protected_layers={list(self.protected_layers)}")
        if self.kept_groups or self.kept_channels:
            parts.append(f"min_attention_groups={self.kept_groups}, min_mlp_channels={self.kept_channels}")
        if self.layer_start or self.layer_end is not None:
            parts.append(f"layers [{self.layer_start}, {self.layer_end})")
        return ", ".join(parts) or "no constraints"
