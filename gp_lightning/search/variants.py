"""The layer-variant database: every block at every width the search asks for, with its refit.

One pass of the dense model over the fitness windows gives, per layer, the Gram matrices of o_proj's and
down_proj's inputs (each layer sees the dense model's inputs: the variants are local, as in Tyr-the-Pruner's
supernet). The order in which a block gives up its units is fixed once: the greedy OBS walk of
:mod:`gp_lightning.compensation.refit` run down to the block's floor (``within_layer: obs``; every prefix of its
order is the walk's choice at that width), or the table's scores (``within_layer: score``). A variant at ``k``
kept units keeps the first units of that order's complement and refits o_proj / down_proj on them exactly as
compensation does, made when first asked for and kept in a least-recently-used cache of bounded size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.compensation.layerwise import Batches, dense_pass
from gp_lightning.compensation.refit import obs_removals, refit, unit_columns, without_bias
from gp_lightning.model.layout import ModelLayout, decoder_layers
from gp_lightning.table.build import score_order

#: The projection refit for each block kind (blocks ``0..L-1`` are attention, ``L..2L-1`` MLP).
PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


@dataclass
class Variant:
    """One block at one width: its kept input columns, their refit weights and the output bias (None: none)."""

    columns: torch.Tensor
    weight: torch.Tensor  # out x kept, the projection's dtype
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.columns.numel() * 8


def projection(model: nn.Module, layers: int, block: int) -> nn.Linear:
    """o_proj of block ``block < layers``, else down_proj of layer ``block - layers``."""
    part, name = PROJECTIONS[block >= layers]
    return getattr(getattr(decoder_layers(model)[block % layers], part), name)


class Database:
    """Variants of every block, from the Grams and removal orders of the dense model."""

    def __init__(self, model: nn.Module, layout: ModelLayout, grams: list[torch.Tensor], orders: list[list[int]],
                 config: CompensationConfig, cache_bytes: int) -> None:
        self.layers = layout.num_layers
        self.projections = [projection(model, self.layers, b) for b in range(2 * self.layers)]
        self.weights = [(p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone())
                        for p in self.projections]
        self.widths = [layout.layers[b % self.layers].queries_per_kv * layout.layers[b % self.layers].head_dim
                       if b < self.layers else 1 for b in range(2 * self.layers)]
        self.grams, self.orders, self.config = grams, orders, config
        self.cache: OrderedDict[tuple[int, int], Variant] = OrderedDict()
        self.cache_bytes, self.made = cache_bytes, 0

    def units(self, block: int) -> int:
        return self.weights[block][0].shape[1] // self.widths[block]

    def variant(self, block: int, kept: int) -> Variant:
        """Block ``block`` keeping ``kept`` units (the dense weights at full width)."""
        key = (block, kept)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        found = self._make(block, kept)
        self.cache[key] = found
        self.made += 1
        while sum(v.nbytes for v in self.cache.values()) > self.cache_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)
        return found

    def _make(self, block: int, kept: int) -> Variant:
        weight, bias = self.weights[block]
        units = self.units(block)
        gone = set(self.orders[block][: units - kept])
        columns = unit_columns([u for u in range(units) if u not in gone], self.widths[block])
        if kept >= units:
            return Variant(columns, weight, bias)
        with_bias = self.config.compensation_bias or bias is not None
        fit = refit(weight, bias, self.grams[block], columns, self.config.compensation,
                    self.config.compensation_damping, with_bias=with_bias)
        added = fit.bias.to(weight.dtype) if with_bias or bias is not None else None
        return Variant(columns, fit.weight.to(weight.dtype), added)


def block_order(block: int, layers: int, weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor,
                width: int, count: int, config: CompensationConfig, table: pd.DataFrame) -> list[int]:
    """The order in which block ``block`` gives up its first ``count`` units (OBS walk, or the table's scores)."""
    if config.obs_selection:
        with_bias = config.compensation_bias or bias is not None
        walk_gram = gram if with_bias else without_bias(gram, bias)
        return obs_removals(weight, walk_gram, width, count, config.compensation_damping, bias, ordered=True)
    kind = "attention" if block < layers else "mlp"
    rows = table.iloc[score_order(table)]
    rows = rows[(rows["layer_idx"] == block % layers) & (rows["group_type"] == kind)]
    return [int(u) for u in rows["group_idx"].tolist()[:count]]


def dense_grams(model: nn.Module, layers: int, batches: Batches, rank: int) -> list[torch.Tensor]:
    """Per block, the Gram of its projection's inputs over the fitness windows (float32), from one dense pass."""
    grams: list[torch.Tensor] = [torch.empty(0)] * (2 * layers)
    for index in tqdm(range(layers), desc="Search variants", unit="layer", disable=rank != 0):
        module = decoder_layers(model)[index]
        pair = [projection(model, layers, index), projection(model, layers, layers + index)]
        found, outputs = dense_pass(module, batches, pair)
        grams[index], grams[layers + index] = (g.full for g in found)
        batches = batches.on(outputs)
    return grams


def build(model: nn.Module, layout: ModelLayout, batches: Batches, floors: list[int], config: CompensationConfig,
          table: pd.DataFrame, cache_bytes: int, rank: int, orders: list[list[int]] | None = None) -> Database:
    """The database: Grams from one dense pass, and each block's removal order down to its floor (``orders``: the
    ones a resumed search saved)."""
    layers = layout.num_layers
    with torch.no_grad():
        grams = dense_grams(model, layers, batches, rank)
    database = Database(model, layout, grams, orders or [], config, cache_bytes)
    if orders is None:
        for block in range(2 * layers):
            weight, bias = database.weights[block]
            count = database.units(block) - floors[block]
            database.orders.append(block_order(block, layers, weight, bias, grams[block], database.widths[block],
                                               count, config, table))
    return database
