"""The pruning plan: which units go, which stay. The hand-off between selection and surgery.

A plan is plain data (JSON-serializable), so it can be written to the run directory, broadcast
between ranks, and applied later to the model in memory or to its checkpoint files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from gp_lightning.model.layout import ModelLayout


def _kept(count: int, removed: set[int]) -> list[int]:
    """``[i for i in range(count) if i not in removed]`` as Python ints, without a Python loop over ``count``."""
    keep = np.ones(count, dtype=bool)
    gone = np.fromiter(removed, dtype=np.int64, count=len(removed))
    keep[gone[(gone >= 0) & (gone < count)]] = False  # like range(count), ignore indices outside it
    return np.flatnonzero(keep).tolist()


@dataclass
class LayerPlan:
    """What remains of one decoder layer (indices refer to the dense layer)."""

    index: int
    keep_groups: list[int]
    keep_channels: list[int]
    num_groups: int
    num_channels: int
    output_bias: bool = False  # o_proj/down_proj carry a bias: an emptied layer is not the identity

    @property
    def empty(self) -> bool:
        return not self.keep_groups and not self.keep_channels


@dataclass
class PruningPlan:
    layers: list[LayerPlan]
    remove_empty_layers: bool = False
    meta: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_removals(
        cls,
        layout: ModelLayout,
        remove_groups: dict[int, set[int]],
        remove_channels: dict[int, set[int]],
        remove_empty_layers: bool = False,
    ) -> PruningPlan:
        layers = []
        for layer in layout.layers:
            groups = remove_groups.get(layer.index, set())
            channels = remove_channels.get(layer.index, set())
            layers.append(
                LayerPlan(
                    index=layer.index,
                    keep_groups=_kept(layer.num_kv_heads, groups),
                    keep_channels=_kept(layer.intermediate_size, channels),
                    num_groups=layer.num_kv_heads,
                    num_channels=layer.intermediate_size,
                    output_bias=layer.o_bias or layer.down_bias,
                )
            )
        return cls(layers, remove_empty_layers)

    def dropped(self, layer_idx: int) -> bool:
        """Whether the layer disappears entirely (depth pruning).

        A layer with output biases stays (as bias-only blocks), since dropping it would change the
        model's function.
        """
        lp = self.layers[layer_idx]
        return self.remove_empty_layers and lp.empty and not lp.output_bias

    @property
    def kept_layers(self) -> list[int]:
        return [lp.index for lp in self.layers if not self.dropped(lp.index)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        raw = json.loads(text)
        return cls([LayerPlan(**lp) for lp in raw["layers"]], raw["remove_empty_layers"], raw.get("meta", {}))
