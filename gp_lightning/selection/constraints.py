"""Per-layer limits on what selection may take: rate caps and floors, protected and early layers.

Global selection can empty a layer whose importance happens to be small in scale; these
constraints bound the damage. All rates are fractions of a layer's prunable parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gp_lightning.model.layout import LayerLayout, ModelLayout
from gp_lightning.runtime.errors import ConfigError


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


@dataclass(frozen=True)
class SelectionConstraints:
    """Constraints of global selection (the defaults allow anything).

    ``min_attention_groups``/``min_mlp_channels`` are the units every block keeps; pass 0 to allow
    emptying blocks (depth pruning).
    """

    layer_start: int = 0
    layer_end: int | None = None
    min_rate: float = 0.0
    max_rate: float = 1.0
    early_layers: int = 0
    early_layer_max_rate: float = 1.0
    protected_layers: tuple[int, ...] = ()
    min_attention_groups: int = 0
    min_mlp_channels: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, rule: str) -> ConfigError:
            return ConfigError(f"Config key '{key}' = {getattr(self, key)!r} is invalid: it {rule}.")

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
            max_groups=max(layer.num_kv_heads - self.min_attention_groups, 0) if candidate else 0,
            max_channels=max(layer.intermediate_size - self.min_mlp_channels, 0) if candidate else 0,
        )

    def describe(self) -> str:
        parts = []
        if self.max_rate < 1:
            parts.append(f"max_rate={self.max_rate}")
        if self.early_layers and self.early_layer_max_rate < 1:
            parts.append(f"early_layer_max_rate={self.early_layer_max_rate} on {self.early_layers} early layers")
        if self.protected_layers:
            parts.append(f"protected_layers={list(self.protected_layers)}")
        if self.min_attention_groups or self.min_mlp_channels:
            parts.append(f"min_attention_groups={self.min_attention_groups}, min_mlp_channels={self.min_mlp_channels}")
        if self.layer_start or self.layer_end is not None:
            parts.append(f"layers [{self.layer_start}, {self.layer_end})")
        return ", ".join(parts) or "no constraints"
