"""Load a model already sharded: each FSDP2 rank reads only its own rows of every weight.

Loading a 70B model whole into every rank's CPU memory (282 GB in float32, times 8 ranks per
node) is impossible. Instead every rank builds the model on the meta device (no memory), shards it
with ``fully_shard``, allocates only its local shard and fills it from the checkpoint's
safetensors with ``get_slice`` (rows ``[offset, offset + n)``), so each rank reads and holds about
``1 / world_size`` of the weights. Buffers computed at construction (rotary frequencies) are built
for real, since ``init_empty_weights`` leaves buffers alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from gp_lightning.model.layout import check_supported
from gp_lightning.model.source import refuse_mismatch, unexpected_tensors
from gp_lightning.model.weights import source_weight_files
from gp_lightning.runtime.errors import ModelSourceError
from gp_lightning.runtime.sharding import local_part


def meta_model(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``directory`` with parameters on the meta device; remembers where its weights are."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    check_supported(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stored = tensor_files(directory)  # the checkpoint covers the config exactly, as a load in memory checks
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # a tied lm_head is the embedding
    missing = [name for name, _ in model.named_parameters() if name not in stored and name not in tied]
    refuse_mismatch(missing, unexpected_tensors(stored, model), str(directory))
    model.gp_weights_dir = str(directory)
    model.gp_tensor_files = stored  # where each tensor is: the loads below read no header again
    return model.eval()


def tensor_files(directory: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor (checked and listed as streamed surgery does)."""
    files: dict[str, Path] = {}
    for path in source_weight_files(directory):
        with safe_open(path, framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def load_local_shards(model: nn.Module, device: torch.device) -> None:
    """Allocate this rank's shard of every (already ``fully_shard``-ed) parameter and read it from disk."""
    directory = Path(model.gp_weights_dir)
    read_parameters(model, directory, model.gp_tensor_files, device, sharded=True)


@torch.no_grad()
def read_parameters(module: nn.Module, directory: Path, files: dict[str, Path], device: torch.device,
                    prefix: str = "", sharded: bool = False) -> None:
    """Allocate ``module``'s parameters on ``device`` and read them from the checkpoint's safetensors (its
    buffers are kept). ``prefix``: the module's name in the model; ``sharded``: only this rank's rows."""
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    module.to_empty(device=device)
    for name, buffer in module.named_buffers():
        buffer.copy_(buffers[name])
    by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
    for name, param in module.named_parameters():
        full = f"{prefix}.{name}" if prefix else name
        if full not in files:
            raise ModelSourceError(f"{directory} has no tensor '{full}': the checkpoint does not match its config.")
        by_file.setdefault(files[full], []).append((full, param))
    for path, params in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for full, param in params:
                if sharded:
                    local, offset, _ = local_part(param.data)
                    rows = handle.get_slice(full)[offset : offset + local.shape[0]]
                    local.copy_(rows.to(dtype=local.dtype, device=local.device))
                else:
                    param.copy_(handle.get_tensor(full).to(param.dtype))
