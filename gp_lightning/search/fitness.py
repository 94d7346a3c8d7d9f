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

from gp_lightning.compensation.layerwise import all_reduce, first_layer_inputs
from gp_lightning.model.layout import decoder_layers
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


class LayerForward:
    """The model run layer by layer: each window's first-layer input and the keyword arguments the model passes its
    layers are taken once, then any run starts at any layer from hidden states kept from an earlier one (a mutant
    differs from its parent from its first changed layer on), and ends with the final norm and lm_head. Every
    measurement takes this path, so a run from kept states gives exactly what a run from the start gives."""

    def __init__(self, model: nn.Module, windows: dict[int, torch.Tensor]) -> None:
        self.layers = decoder_layers(model)
        self.norm, self.head = model.model.norm, model.get_output_embeddings()
        self.first = {i: first_layer_inputs(model, window[None], torch.ones(1), 1) for i, window in windows.items()}

    def log_probs(self, i: int, start: int = 0, states: list[torch.Tensor] | None = None,
                  record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Next-token log-probabilities of window ``i`` (float32), from layer ``start`` on ``states[start]``;
        ``record`` receives the input of every layer run."""
        batches = self.first[i]
        start = start if states is not None else 0
        hidden = states[start] if start > 0 else batches.hidden[0]
        for layer in self.layers[start:]:
            if record is not None:
                record.append(hidden)
            out = layer(hidden, **batches.kwargs[0])
            hidden = out[0] if isinstance(out, tuple) else out
        return torch.log_softmax(self.head(self.norm(hidden))[0].float(), dim=-1).cpu()


class Fitness:
    """Mean per-token KL(dense || model) over chosen windows, the dense side measured once (float16 probabilities
    and the float64 entropy of each window). The current parent's hidden states entering every layer are kept for
    this rank's windows (when they fit in ``state_bytes``), so that a mutant runs only from its first changed
    layer."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, rank: int = 0, world: int = 1,
                 state_bytes: int = 0, parent_windows: list[int] | None = None) -> None:
        self.model, self.windows, self.rank, self.world = model, windows, rank, world
        # the windows whose parent states are kept (the fitness windows; not the held-out ones)
        self.parent_windows = set(range(windows.shape[0]) if parent_windows is None else parent_windows)
        self.forward = LayerForward(model, {i: windows[i] for i in self.mine(range(windows.shape[0]))})
        self.dense: dict[int, tuple[torch.Tensor, float]] = {}
        for i in self.forward.first:
            log_p = self.forward.log_probs(i)
            p = log_p.exp().half()  # the dense side of KL(p || q) = sum p (log p - log q), float16 p in both terms
            self.dense[i] = (p, float((p.float() * log_p).sum(dtype=torch.float64)))
        hidden = next(iter(self.forward.first.values())).hidden[0] if self.forward.first else None
        per_window = 0 if hidden is None else hidden.numel() * hidden.element_size() * len(self.forward.layers)
        # the parent's states and, in a generation, the mutants' still in the running (about as many again)
        self.keep = 2 * per_window * len(self.parent_windows & set(self.forward.first)) <= state_bytes
        self.states: dict[int, list[torch.Tensor]] = {}  # the parent's, per window
        self.pending: dict[bytes, dict[int, list[torch.Tensor]]] = {}  # this generation's, per mutant and window
        self.evaluations = 0  # windows this rank has run

    def mine(self, which: range | list[int]) -> list[int]:
        return [i for i in which if i % self.world == self.rank]

    @torch.no_grad()
    def per_window(self, which: list[int], start: int = 0, key: bytes | None = None) -> np.ndarray:
        """KL per token of each window of ``which`` (every rank gets every value); ``start``: the first layer that
        differs from the parent's; ``key``: keep this run's states under it (see :meth:`accept`)."""
        values = torch.zeros(self.windows.shape[0], dtype=torch.float64)
        for i in self.mine(which):
            log_q = self._run(i, start, key if self.keep else None)
            p, negative_entropy = self.dense[i]
            cross = float(log_q.mul_(p).sum(dtype=torch.float64))  # in place: the same products, one 25 MB block fewer
            values[i] = (negative_entropy - cross) / log_q.shape[0]
            self.evaluations += 1
        all_reduce([values])
        return values.numpy()[which]

    def __call__(self, which: list[int]) -> float:
        return float(np.mean(self.per_window(which))) if which else 0.0

    @torch.no_grad()
    def keep_states(self, key: bytes, start: int) -> None:
        """Run the model (as it is now) on this rank's windows whose states are not kept under ``key`` yet, from
        layer ``start``, and keep them (this rank only: no collective)."""
        for i in self.forward.first:
            if self.keep and i in self.parent_windows and i not in self.pending.get(key, {}):
                self._run(i, start, key)

    def _run(self, i: int, start: int, key: bytes | None) -> torch.Tensor:
        """Window ``i`` from layer ``start`` on the parent's kept states (from the first layer when there are none);
        with ``key``, this run's states (the parent's below ``start``) are kept under it."""
        states = self.states.get(i) if start > 0 else None
        recorded: list[torch.Tensor] | None = [] if key is not None else None
        log_q = self.forward.log_probs(i, start, states, recorded)
        if recorded is not None:
            self.pending.setdefault(key, {})[i] = (states[:start] if states is not None else []) + recorded
        return log_q

    def drop_except(self, keys: set[bytes]) -> None:
        """Forget the states kept for any mutant but ``keys``."""
        self.pending = {key: value for key, value in self.pending.items() if key in keys}

    def recorded(self, key: bytes) -> set[int]:
        """This rank's windows whose states are kept under ``key``."""
        return set(self.pending.get(key, {}))

    def accept(self, key: bytes) -> None:
        """The states kept under ``key`` become the parent's; the others are dropped."""
        self.states.update(self.pending.get(key, {}))
        self.pending = {}
