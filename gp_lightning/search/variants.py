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

import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.compensation.layerwise import Batches, dense_pass
from gp_lightning.compensation.refit import obs_removals, refit, unit_columns, without_bias
from gp_lightning.model.layout import ModelLayout, decoder_layers
from gp_lightning.runtime.io import atomic_write
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


class GramStore:
    """Every block's Gram: in memory, or (given a directory) one safetensors file per layer, written by rank 0 and read
    when a refit needs it, so that a process holds one layer's Grams at a time (all layers of Llama-3-8B are 25 GiB
    in float32, of Llama-3-70B 245 GiB). The files survive a killed run: ``--resume`` reads them back instead of
    passing over the windows again."""

    def __init__(self, layers: int, directory: Path | None = None, rank: int = 0) -> None:
        self.layers, self.directory, self.rank = layers, directory, rank
        self.memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"grams-layer{index:03d}.safetensors"

    def put(self, index: int, attention: torch.Tensor, mlp: torch.Tensor) -> None:
        if self.directory is None:
            self.memory[index] = (attention, mlp)
        elif self.rank == 0:
            tensors = {"o_proj": attention.contiguous(), "down_proj": mlp.contiguous()}
            atomic_write(self._path(index), lambda tmp: save_file(tensors, str(tmp)))

    def get(self, block: int) -> torch.Tensor:
        index, name = block % self.layers, PROJECTIONS[block >= self.layers][1]
        if self.directory is None:
            return self.memory[index][block >= self.layers]
        with safe_open(str(self._path(index)), framework="pt") as handle:
            return handle.get_tensor(name)

    def complete(self) -> bool:
        return self.directory is not None and all(self._path(i).is_file() for i in range(self.layers))

    def remove(self) -> None:
        """Delete the files (rank 0, once every rank is done with them)."""
        barrier()
        if self.directory is not None and self.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)


class Database:
    """Variants of every block, from the Grams and removal orders of the dense model."""

    def __init__(self, model: nn.Module, layout: ModelLayout, grams: GramStore, config: CompensationConfig,
                 cache_bytes: int) -> None:
        self.layers = layout.num_layers
        self.projections = [projection(model, self.layers, b) for b in range(2 * self.layers)]
        self.weights = [(p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone())
                        for p in self.projections]
        self.widths = [layout.layers[b % self.layers].queries_per_kv * layout.layers[b % self.layers].head_dim
                       if b < self.layers else 1 for b in range(2 * self.layers)]
        self.grams, self.config = grams, config
        self.orders: list[list[int]] = [[] for _ in range(2 * self.layers)]
        self.cache: OrderedDict[tuple[int, int], Variant] = OrderedDict()
        self.cache_bytes, self.cached_bytes, self.made = cache_bytes, 0, 0

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
        self.cached_bytes += found.nbytes
        while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
            self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        return found

    def _make(self, block: int, kept: int) -> Variant:
        weight, bias = self.weights[block]
        units = self.units(block)
        gone = set(self.orders[block][: units - kept])
        columns = unit_columns([u for u in range(units) if u not in gone], self.widths[block])
        if kept >= units:
            return Variant(columns, weight, bias)
        with_bias = self.config.compensation_bias or bias is not None
        fit = refit(weight, bias, self.grams.get(block), columns, self.config.compensation,
                    self.config.compensation_damping, with_bias=with_bias)
        added = fit.bias.to(weight.dtype) if with_bias or bias is not None else None
        return Variant(columns, fit.weight.to(weight.dtype), added)


def block_order(block: int, layers: int, weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor,
                width: int, count: int, config: CompensationConfig, ordered: pd.DataFrame) -> list[int]:
    """The order in which block ``block`` gives up its first ``count`` units (OBS walk, or the scores of the table
    ``ordered``, sorted by score once for every block)."""
    if config.obs_selection:
        with_bias = config.compensation_bias or bias is not None
        walk_gram = gram if with_bias else without_bias(gram, bias)
        return obs_removals(weight, walk_gram, width, count, config.compensation_damping, bias, ordered=True)
    kind = "attention" if block < layers else "mlp"
    rows = ordered[(ordered["layer_idx"] == block % layers) & (ordered["group_type"] == kind)]
    return [int(u) for u in rows["group_idx"].tolist()[:count]]


def build(model: nn.Module, layout: ModelLayout, batches: Callable[[], Batches], floors: list[int],
          config: CompensationConfig, table: pd.DataFrame, cache_bytes: int, grams: GramStore,
          orders: list[list[int]] | None = None) -> Database:
    """The database: each block's removal order down to its floor, from one dense pass that stores the Grams
    (``orders`` and complete ``grams``: what a resumed search saved; no pass then). ``batches``: the refit windows at
    the first layer, made only when a pass is needed."""
    database = Database(model, layout, grams, config, cache_bytes)
    if orders is not None and grams.complete():
        database.orders = orders
        return database
    layers, current = layout.num_layers, batches()
    ordered = table.iloc[score_order(table)]
    for index in tqdm(range(layers), desc="Search variants", unit="layer", disable=grams.rank != 0):
        pair = [database.projections[index], database.projections[layers + index]]
        with torch.no_grad():
            found, outputs = dense_pass(decoder_layers(model)[index], current, pair)
        current = current.on(outputs)
        for block, gram in ((index, found[0].full), (layers + index, found[1].full)):
            weight, bias = database.weights[block]
            database.orders[block] = block_order(block, layers, weight, bias, gram, database.widths[block],
                                                 database.units(block) - floors[block], config, ordered)
        grams.put(index, found[0].full, found[1].full)
    barrier()
    return database


def barrier() -> None:
    """Every rank waits for rank 0's files (nothing in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
