"""Walk the decoder layer by layer over the calibration windows, with one layer's statistics in memory.

The hidden states entering layer 0 (and the keyword arguments the model hands its layers: masks,
rotary embeddings) are captured once by stopping the model's forward at layer 0. Then, for each
layer in turn, the Gram matrices of its o_proj and down_proj inputs are accumulated over every
batch, the projections are refit, and the layer's outputs become the next layer's inputs:

- ``sequential``: attention statistics from this layer's inputs, refit attention, MLP statistics
  with the refit attention in place, refit MLP, and the outputs of the pruned-and-compensated layer
  go on (SparseGPT / SlimGPT style): later layers are fit to what they will really see.
- not sequential: both Grams from one pass of the dense layer, whose outputs go on.

Removing a unit inside the running model means zeroing its o_proj (down_proj) columns: its heads
(channels) then add nothing, exactly as after surgery. Refit weights are written into the layer in
place and an added output bias is a forward hook, so the model walked is the masked, compensated
dense model (which the surgery then slices). With several ranks each rank walks its own windows and
the Gram sums are all-reduced (once per block), so every rank computes the same refit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.model.layout import decoder_layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the rest of it is not needed)."""


@dataclass
class Batches:
    """The hidden states entering the current layer, batch by batch, the keyword arguments the model passes
    its layers for each batch, each window's weight (0: padding of an uneven rank shard) and, when the refit holds
    windows out, which windows are held out."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    weights: list[torch.Tensor]
    held: list[torch.Tensor] = field(default_factory=list)  # per batch, a bool per window (empty: none held out)

    def on(self, hidden: list[torch.Tensor]) -> Batches:
        """The same batches carrying other hidden states."""
        return Batches(hidden, self.kwargs, self.weights, self.held)

    def part_weights(self, part: str | None) -> list[torch.Tensor]:
        """The window weights of the ``train`` or ``held`` windows only (the others 0), or all of them (None)."""
        if part is None or not self.held:
            return self.weights
        return [w * (h if part == "held" else ~h) for w, h in zip(self.weights, self.held, strict=True)]


@dataclass
class Grams:
    """A projection's input Gram over all refit windows, and over the fitting and the held-out windows when the
    refit holds some out (``full`` is then their sum)."""

    full: torch.Tensor
    train: torch.Tensor | None = None
    held: torch.Tensor | None = None

    @classmethod
    def of(cls, train: torch.Tensor, held: torch.Tensor | None) -> Grams:
        return cls(train, None, None) if held is None else cls(train + held, train, held)


def first_layer_inputs(model: nn.Module, windows: torch.Tensor, weights: torch.Tensor, batch_size: int,
                       held: torch.Tensor | None = None) -> Batches:
    """Run the model on each batch up to its first decoder layer and keep what that layer receives (``held``: which
    windows the refit holds out)."""
    captured: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = dict(kwargs)
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    batches = Batches([], [], [])
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                batches.hidden.append(captured["hidden"].detach())
                batches.kwargs.append(captured["kwargs"])
                batches.weights.append(weights[start : start + batch_size])
                if held is not None:
                    batches.held.append(held[start : start + batch_size])
    finally:
        handle.remove()
    return batches


#: Captured batches are joined into chunks of about this size before a Gram update: one 4,096-token update of a
#: 1,536-wide input took 0.84x the time of eight 512-token ones here (one thread); the cap bounds the copy.
_GRAM_CHUNK_BYTES = 32 * 2**20


def block_edges(size: int) -> list[int]:
    """Column blocks of a Gram update that computes only the blocks on and above the diagonal: about
    96 columns each, at most 16 (about 53% of the products of the full matrix). 96: a 1,536-wide Gram update took
    0.52x the time of the full product here (one thread), 192-column blocks 0.57x."""
    blocks = max(1, min(16, size // 96))
    return [round(i * size / blocks) for i in range(blocks + 1)]


class Gram:
    """``sum [x; 1] [x; 1]^T`` over the tokens of real windows, accumulated in float32 (a few thousand tokens of
    activations: float32 sums keep about six digits, the refit itself is float64).

    Only the upper triangle is accumulated, block row by block row; :attr:`value` mirrors it once at the end.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.upper = torch.zeros(features + 1, features + 1, dtype=torch.float32, device=device)
        self.edges = block_edges(features)

    def add(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Add the tokens of ``x`` (batch x seq x features) whose ``weights`` are positive (not padding)."""
        self.add_rows(real_rows(x, weights))

    def add_rows(self, real: torch.Tensor) -> None:
        """Add the tokens of ``real`` (tokens x features, float32)."""
        features = real.shape[1]
        for start, stop in itertools.pairwise(self.edges):
            self.upper[start:stop, start:features].addmm_(real[:, start:stop].T, real[:, start:])
        self.upper[:features, features] += real.sum(dim=0)  # the constant input: sums and the token count
        self.upper[features, features] += real.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """The whole symmetric matrix (call once, after the last :meth:`add`)."""
        full = self.upper.triu(1)
        full += full.T.contiguous()
        full.diagonal().copy_(self.upper.diagonal())
        return full


def real_rows(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The tokens of ``x`` whose window weight is positive, as rows (float32)."""
    real = weights.to(x.device) > 0
    if bool(real.all()):  # no padding: a view, not a copy
        return x.reshape(-1, x.shape[-1]).float()
    return x[real].reshape(-1, x.shape[-1]).float()


def all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks in one collective (nothing in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].view_as(t))
        start += t.numel()


def captured_inputs(run: Callable[[torch.Tensor, dict[str, Any]], Any], target: nn.Module, batches: Batches,
                    hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The input of ``target`` in ``run(hidden, kwargs)`` for every batch; each pass ends at ``target``."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _Stop

    handle = target.register_forward_pre_hook(hook)
    try:
        for h, kwargs in zip(hidden if hidden is not None else batches.hidden, batches.kwargs, strict=True):
            with contextlib.suppress(_Stop), torch.no_grad():
                run(h, kwargs)
    finally:
        handle.remove()
    return seen


class Scratch:
    """One float32 buffer that every layer's Gram chunks are joined into, instead of a fresh 24 MiB chunk per
    down_proj whose pages are faulted in again in every layer (joining took 0.56 s of SmolLM2's compensation into
    fresh chunks, 0.28 s into this buffer; cProfile, one thread)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``parts`` (each tokens x features) joined, in the buffer (valid until the next call)."""
        count, features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        if self.buffer.numel() < count * features or self.buffer.device != parts[0].device:
            self.buffer = torch.empty(count * features, dtype=torch.float32, device=parts[0].device)
        return torch.cat(parts, out=self.buffer[: count * features].view(count, features))


def grams_of(inputs: list[torch.Tensor], batches: Batches, scratch: Scratch | None = None) -> Grams:
    """The Grams of a projection's captured inputs: over all windows, or (when windows are held out) over the
    fitting windows and the held-out ones."""
    if not batches.held:
        return Grams.of(gram_of(inputs, batches, scratch), None)
    return Grams.of(gram_of(inputs, batches, scratch, "train"), gram_of(inputs, batches, scratch, "held"))


def gram_of(inputs: list[torch.Tensor], batches: Batches, scratch: Scratch | None = None,
            part: str | None = None) -> torch.Tensor:
    """The all-reduced Gram matrix of a projection's captured inputs (padding windows left out; ``part``: of the
    ``train`` or ``held`` windows only)."""
    scratch = scratch or Scratch()
    gram = Gram(inputs[0].shape[-1], inputs[0].device)
    pending: list[torch.Tensor] = []
    size = 0  # bytes in pending
    for x, weights in zip(inputs, batches.part_weights(part), strict=True):
        pending.append(real_rows(x, weights))
        size += pending[-1].numel() * pending[-1].element_size()
        if size >= _GRAM_CHUNK_BYTES:
            gram.add_rows(scratch.rows(pending))
            pending, size = [], 0
    if pending:
        gram.add_rows(scratch.rows(pending))
    value = gram.value
    all_reduce([value])
    return value


def dense_pass(layer: nn.Module, batches: Batches, projections: list[nn.Linear]
               ) -> tuple[list[Grams], list[torch.Tensor]]:
    """One pass of the unchanged layer: the Grams of each projection's inputs, and the layer's outputs."""
    parts = ["train", "held"] if batches.held else [None]
    grams = [[Gram(p.in_features, p.weight.device) for _ in parts] for p in projections]
    weights = [batches.part_weights(part) for part in parts]
    current: dict[str, int] = {}

    def hook_for(index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def add(module: nn.Module, args: tuple[Any, ...]) -> None:
            for gram, part_weights in zip(grams[index], weights, strict=True):
                gram.add(args[0].detach(), part_weights[current["batch"]])
        return add

    handles = [p.register_forward_pre_hook(hook_for(i)) for i, p in enumerate(projections)]
    outputs = []
    try:
        with torch.no_grad():
            for batch, (hidden, kwargs) in enumerate(zip(batches.hidden, batches.kwargs, strict=True)):
                current["batch"] = batch
                out = layer(hidden, **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    finally:
        for handle in handles:
            handle.remove()
    values = [[g.value for g in pair] for pair in grams]
    all_reduce([v for pair in values for v in pair])
    return [Grams.of(pair[0], pair[1] if len(pair) == 2 else None) for pair in values], outputs


def layer_outputs(layer: nn.Module, batches: Batches) -> list[torch.Tensor]:
    """The layer's output hidden states for every batch (the next layer's inputs)."""
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in zip(batches.hidden, batches.kwargs, strict=True):
            out = layer(hidden, **kwargs)
            outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


@dataclass
class AddedBias:
    """Forward hooks that add the refit output biases of projections that have no bias of their own."""

    handles: list[Any] = field(default_factory=list)

    def add(self, projection: nn.Linear, bias: torch.Tensor) -> None:
        value = bias.to(projection.weight.dtype)
        self.handles.append(projection.register_forward_hook(lambda module, args, out: out + value.to(out.device)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def progress(layers: int, rank: int) -> Iterator[int]:
    return iter(tqdm(range(layers), desc="Compensation", unit="layer", disable=rank != 0))
