"""Map every dense tensor ``(name, tensor)`` to its pruned form, or to nothing: the one slicer of both surgeries.

Works on names and tensors only, so it slices a model's in-memory state dict and checkpoint
tensors streamed from disk alike. A layer whose attention (MLP) lost every unit loses that block's
tensors (its output bias survives as the block's own output bias); a dropped layer loses all of
them and the later layers are renumbered. With a compensation, the refit o_proj / down_proj weights
and output biases are written instead of the sliced ones; an output bias the dense model had no
tensor for comes out of :meth:`TensorSlicer.added`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from gp_lightning.model.layout import LayerLayout, ModelLayout
from gp_lightning.selection.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from gp_lightning.compensation.run import Compensation

_LAYER_PARAM = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def unit_rows(groups: list[int], width: int) -> torch.Tensor:
    return torch.tensor([g * width + i for g in groups for i in range(width)], dtype=torch.long)


class TensorSlicer:
    """Maps a dense parameter ``(name, tensor)`` to its pruned form, or to nothing."""

    def __init__(self, layout: ModelLayout, plan: PruningPlan, compensation: Compensation | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.layout = layout
        self.plan = plan
        self.dtype = dtype  # floating tensors come out in it (None: each in its own); refits are rounded once to it
        kept = plan.kept_layers
        self.new_index = {old: new for new, old in enumerate(kept)}
        self.weights = {} if compensation is None else compensation.weights
        self.biases = {} if compensation is None else compensation.biases
        self._placed: set[tuple[int, str]] = set()  # compensation biases written into a dense tensor
    def __call__(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        match = _LAYER_PARAM.match(name)
        if match is None:
            return name, self._cast(tensor)
        old = int(match["idx"])
        if old not in self.new_index:
            return None
        result = self._slice(self.layout.layers[old], self.plan.layers[old], match["rest"], tensor)
        if result is None:
            return None
        rest, sliced = self._compensated(old, match["rest"], *result)
        return f"{match['prefix']}.{self.new_index[old]}.{rest}", self._cast(sliced)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or not tensor.is_floating_point() or tensor.dtype == self.dtype:
            return tensor
        return tensor.to(self.dtype)

    def _compensated(self, old: int, dense: str, rest: str, sliced: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The refit weight or output bias instead of the sliced one, where the compensation has one.

        ``dense`` is the tensor's name in the dense layer, ``rest`` its name in the pruned one.
        """
        block = "self_attn" if dense.startswith("self_attn") else "mlp" if dense.startswith("mlp") else None
        if block is None or (old, block) not in self.weights:
            return rest, sliced
        key, projection = (old, block), "o_proj" if block == "self_attn" else "down_proj"
        if dense == f"{block}.{projection}.weight":
            value = self.weights[key]
        elif key not in self.biases:  # refit without an output bias (compensation_bias: false)
            return rest, sliced
        elif dense == f"{block}.{projection}.bias":  # the projection's own bias: the refit one replaces it
            self._placed.add(key)
            value = self.biases[key]
        elif dense == f"{block}_output_bias":  # a pruned model's own output bias: the projection's refit adds to it
            self._placed.add(key)
            value = self.biases[key] + (0 if sliced.is_meta else sliced.to(self.biases[key].dtype))
        else:
            return rest, sliced
        dtype = self.dtype or sliced.dtype
        if sliced.is_meta:  # a dry run over stored shapes
            return rest, torch.empty(value.shape, dtype=dtype, device="meta")
        return rest, value.to(dtype).clone()

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
                return rest, tensor.index_select(0, unit_rows(lp.keep_groups, qpk * hd))
            if proj in ("k_proj", "v_proj"):
                return rest, tensor.index_select(0, unit_rows(lp.keep_groups, hd))
            if proj == "o_proj" and kind == "weight":
                return rest, tensor.index_select(1, unit_rows(lp.keep_groups, qpk * hd))
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

    def apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]], prefix: str = "model.layers"
              ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every pruned tensor of ``named_tensors``, then the added output biases (:meth:`added`)."""
        for name, tensor in named_tensors:
            out = self(name, tensor)
            if out is not None:
                yield out
        yield from self.added(prefix)

    def added(self, prefix: str = "model.layers") -> Iterator[tuple[str, torch.Tensor]]:
        """Compensation biases that no dense tensor carried: new ``<block>_output_bias`` tensors.

        Call after every dense tensor has gone through the slicer.
        """
        for (old, block), bias in sorted(self.biases.items()):
            if (old, block) not in self._placed and old in self.new_index:
                yield f"{prefix}.{self.new_index[old]}.{block}_output_bias", self._cast(bias.clone())
