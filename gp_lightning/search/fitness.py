"""The search's fitness: KL(dense || candidate) of the next-token distributions, on real windows.

A candidate is the dense model with each block's variant written in (:class:`Candidates`): the removed input
columns of o_proj / down_proj zero, the kept ones refit, the refit output bias added. That computes exactly what
the pruned model computes (a removed MLP channel or GQA group then contributes nothing), without surgery.

Windows are spread over the ranks (window ``i`` on rank ``i mod world``); each rank holds the dense model's
next-token distributions of its own windows only, and one all-reduce of a vector that is zero except at a
rank's own windows gathers the per-window values exactly, so any number of ranks sums the same numbers in
the same order as one process does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gp_lightning.compensation.layerwise import all_reduce
from gp_lightning.search.variants import Database


class Candidates:
    """Writes allocations into the model; :meth:`restore` puts the dense weights back."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.current = np.array([database.units(b) for b in range(len(database.projections))])
        self.added: dict[int, torch.Tensor | None] = {}
        self.handles = [p.register_forward_hook(self._hook(b)) for b, p in enumerate(database.projections)
                        if p.bias is None]

    def _hook(self, block: int):  # noqa: ANN202 - a forward hook
        def add(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            bias = self.added.get(block)
            return out if bias is None else out + bias

        return add

    @torch.no_grad()
    def apply(self, kept: np.ndarray) -> None:
        """Write allocation ``kept`` (units per block) into the model, block by block where it changed."""
        for block in np.flatnonzero(kept != self.current).tolist():
            variant = self.database.variant(block, int(kept[block]))
            target = self.database.projections[block]
            if variant.columns.numel() == target.weight.shape[1]:
                target.weight.copy_(variant.weight)
            else:
                target.weight.zero_()
                target.weight[:, variant.columns] = variant.weight
            if target.bias is not None:
                target.bias.copy_(variant.bias)
            else:
                self.added[block] = variant.bias
            self.current[block] = kept[block]

    @torch.no_grad()
    def restore(self) -> None:
        """The dense weights back, the hooks removed."""
        for target, (weight, bias) in zip(self.database.projections, self.database.weights, strict=True):
            target.weight.copy_(weight)
            if bias is not None:
                target.bias.copy_(bias)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


class Fitness:
    """Mean per-token KL(dense || model) over chosen windows, the dense side measured once (float16 probabilities
    and the float64 entropy of each window)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, rank: int = 0, world: int = 1) -> None:
        self.model, self.windows, self.rank, self.world = model, windows, rank, world
        self.dense: dict[int, tuple[torch.Tensor, float]] = {}
        for i in self.mine(range(windows.shape[0])):
            log_p = _log_probs(model, windows[i])
            p = log_p.exp().half()  # the dense side of KL(p || q) = sum p (log p - log q), float16 p in both terms
            self.dense[i] = (p, float((p.float() * log_p).sum(dtype=torch.float64)))
        self.evaluations = 0  # windows this rank has run

    def mine(self, which: range | list[int]) -> list[int]:
        return [i for i in which if i % self.world == self.rank]

    @torch.no_grad()
    def per_window(self, which: list[int]) -> np.ndarray:
        """KL per token of each window of ``which`` (every rank gets every value)."""
        values = torch.zeros(self.windows.shape[0], dtype=torch.float64)
        for i in self.mine(which):
            log_q = _log_probs(self.model, self.windows[i])
            p, negative_entropy = self.dense[i]
            cross = float((p.float() * log_q).sum(dtype=torch.float64))
            values[i] = (negative_entropy - cross) / log_q.shape[0]
            self.evaluations += 1
        all_reduce([values])
        return values.numpy()[which]

    def __call__(self, which: list[int]) -> float:
        return float(np.mean(self.per_window(which))) if which else 0.0
