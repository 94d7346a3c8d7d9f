"""Reduce per-weight scores to per-unit sums (one number per GQA group and per MLP channel).

Importance methods differ only in the per-weight score (``|w * g|`` for Taylor, ``|w|`` for
magnitude, ...); the grouping of weights into units is the same for all, and lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gp_lightning.model.layout import ModelLayout, decoder_layers
from gp_lightning.runtime.errors import CalibrationError
from gp_lightning.runtime.sharding import is_sharded, local_part

#: ``score(module_name, parameter) -> per-element non-negative tensor`` (float32).
ElementScore = Callable[[str, nn.Parameter], torch.Tensor]


@dataclass
class UnitImportance:
    """Importance per unit: ``attention[l]`` has one entry per KV group, ``mlp[l]`` per channel."""

    attention: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    #: Method-specific figures worth recording (e.g. the share of taylor_2nd's Fisher term).
    details: dict[str, float] = field(default_factory=dict)
    #: True while the values are one rank's partial sums over its parameter shards.
    sharded: bool = False
    #: Per layer/block figures of the calibration gradients (gradient methods only).
    gradient_statistics: dict | None = None

    def all_reduce(self) -> UnitImportance:
        """Sum partial per-unit values over all ranks, in one collective (no-op in one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        keys = [("attention", k) for k in sorted(self.attention)] + [("mlp", k) for k in sorted(self.mlp)]
        tensors = [(self.attention if kind == "attention" else self.mlp)[k] for kind, k in keys]
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)
        dist.all_reduce(flat)
        start = 0
        for (kind, k), t in zip(keys, tensors, strict=True):
            (self.attention if kind == "attention" else self.mlp)[k] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        self.sharded = False
        return self

    def total(self) -> float:
        return sum(float(t.sum()) for t in self.attention.values()) + sum(float(t.sum()) for t in self.mlp.values())

    def add(self, item: UnitParameter, contribution: torch.Tensor) -> None:
        """Add a per-unit contribution (one value per unit of ``item``'s block)."""
        totals = self.attention if item.kind == "attention" else self.mlp
        previous = totals.get(item.layer_idx)
        totals[item.layer_idx] = contribution if previous is None else previous + contribution

    def combined(self, other: UnitImportance, weight: float = 1.0) -> UnitImportance:
        """``self + weight * other``, unit by unit."""
        return UnitImportance(
            {k: v + weight * other.attention[k] for k, v in self.attention.items()},
            {k: v + weight * other.mlp[k] for k, v in self.mlp.items()},
        )

    def check_finite(self, method: str, fix: str) -> None:
        """Fail with ``fix`` in the message if any unit's importance is NaN/inf or all are zero."""
        total = 0.0
        for kind, values in (("attention", self.attention), ("mlp", self.mlp)):
            for layer, tensor in values.items():
                if not torch.isfinite(tensor).all():
                    raise CalibrationError(f"{method} importance of layer {layer} {kind} is NaN/inf. {fix}")
                total += float(tensor.sum())
        if total == 0.0:
            raise CalibrationError(f"All {method} importances are zero: the calibration produced no signal. {fix}")


#: Per block: its attribute, the unit kind, and the projections whose rows (axis 0) or columns
#: (axis 1) make up a unit. Row projections bring their biases; o_proj/down_proj biases are per
#: hidden unit and belong to no pruning unit.
_BLOCKS = (
    ("self_attn", "attention", (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1))),
    ("mlp", "mlp", (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))),
)


@dataclass(frozen=True)
class UnitParameter:
    """A parameter that belongs to pruning units: ``units`` consecutive blocks along ``axis``."""

    layer_idx: int
    kind: str  # attention | mlp
    units: int
    name: str  # e.g. layers.3.self_attn.q_proj.weight
    param: nn.Parameter
    axis: int
    module: nn.Linear  # the projection that owns ``param``


def unit_parameters(model: nn.Module, layout: ModelLayout) -> Iterator[UnitParameter]:
    """Every parameter of every pruning unit, with how it splits into units."""
    for layer, module in zip(layout.layers, decoder_layers(model), strict=True):
        for attr, kind, projections in _BLOCKS:
            block = getattr(module, attr, None)
            units = layer.num_kv_heads if kind == "attention" else layer.intermediate_size
            if block is None or units == 0:
                continue
            for proj_name, axis in projections:
                proj = getattr(block, proj_name)
                prefix = f"layers.{layer.index}.{attr}.{proj_name}"
                yield UnitParameter(layer.index, kind, units, f"{prefix}.weight", proj.weight, axis, proj)
                if axis == 0 and proj.bias is not None:
                    yield UnitParameter(layer.index, kind, units, f"{prefix}.bias", proj.bias, 0, proj)


def per_unit(values: torch.Tensor, units: int, axis: int, row_offset: int = 0, rows: int | None = None) -> torch.Tensor:
    """Sum a per-element score into ``units`` per-unit totals (float64).

    ``values`` may be a block of rows ``[row_offset, row_offset + len)`` of a ``rows``-row tensor
    (a local shard): the result is then this block's partial contribution to every unit.
    """
    if values.dim() == 2 and axis == 1:  # column units (o_proj, down_proj): every local row adds to all
        return values.sum(dim=0, dtype=torch.float64).view(units, -1).sum(dim=1)
    row_sums = values.sum(dim=1, dtype=torch.float64) if values.dim() == 2 else values.double()
    rows = values.shape[0] if rows is None else rows
    if row_offset == 0 and values.shape[0] == rows:
        return row_sums.view(units, -1).sum(dim=1)
    unit_of_row = (torch.arange(values.shape[0], device=values.device) + row_offset) // (rows // units)
    return torch.zeros(units, dtype=torch.float64, device=values.device).index_add_(0, unit_of_row, row_sums)


def unit_importance(model: nn.Module, layout: ModelLayout, score: ElementScore) -> UnitImportance:
    """Apply ``score`` to every unit parameter and sum the result per unit (float64).

    ``score`` receives the parameter and returns per-element values of its LOCAL part (see
    :func:`local_part`); with sharded parameters the result holds this rank's partial sums and
    ``sharded`` is set, so the caller all-reduces it.
    """
    result = UnitImportance({}, {})
    for item in unit_parameters(model, layout):
        _, offset, rows = local_part(item.param)
        result.add(item, per_unit(score(item.name, item.param), item.units, item.axis, offset, rows))
        result.sharded = result.sharded or is_sharded(item.param)
    return result
