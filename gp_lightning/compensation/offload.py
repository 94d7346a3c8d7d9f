"""Decoder layers read from disk one at a time, for a model whose weights do not fit in host memory.

The compensation walks the layers in order and needs only the one in hand: the model is built on the
meta device, the input embedding is read once (the walk starts from what enters layer 0), and each
decoder layer is read from the checkpoint's safetensors when the walk reaches it and returned to the
meta device when it is done. Peak memory is then one layer's weights and statistics plus the hidden
states of the windows, whatever the model's size; the refit weights are kept for surgery, which streams
the rest from the same files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gp_lightning.model.layout import decoder_layers
from gp_lightning.model.sharded import read_parameters
from gp_lightning.runtime.errors import ModelSourceError


class LayerLoader:
    """Materializes modules of a meta-device model from its checkpoint (``model.gp_weights_dir``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.directory = Path(model.gp_weights_dir)
        self.files = model.gp_tensor_files  # read by meta_model
        self.names = {id(module): name for name, module in model.named_modules()}

    def load(self, module: nn.Module) -> None:
        """Allocate ``module``'s parameters on the CPU and read them (its buffers are kept as they are)."""
        read_parameters(module, self.directory, self.files, torch.device("cpu"), self.names[id(module)])

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[None]:
        """Decoder layer ``index`` read for the duration of the block, then dropped."""
        module = decoder_layers(self.model)[index]
        self.load(module)
        try:
            yield
        finally:
            module.to("meta")


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``model``'s decoder layers are on the meta device (to be read layer by layer)."""
    return any(p.is_meta for p in decoder_layers(model).parameters())


def prepare(model: nn.Module) -> LayerLoader | None:
    """For an offloaded model: read what runs before the first layer (the input embedding) and return the
    loader of its layers; None for a model in memory."""
    if not is_offloaded(model):
        return None
    if not hasattr(model, "gp_weights_dir"):
        raise ModelSourceError("the model is on the meta device but has no checkpoint to read its layers from "
                               "(build it with gp_lightning.model.sharded.meta_model).")
    loader = LayerLoader(model)
    loader.load(model.get_input_embeddings())
    return loader
