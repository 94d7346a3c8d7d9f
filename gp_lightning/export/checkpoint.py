"""Write and read pruned checkpoints: safetensors + tokenizer + generation config + modeling code.

The checkpoint carries its own config and modeling files (``auto_map``), so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works in any process with
transformers, and :func:`load_pruned` works without remote code inside the project.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gp_lightning.model.gp_pruned.configuration_gp_pruned import GPPrunedConfig
from gp_lightning.model.gp_pruned.modeling_gp_pruned import GPPrunedForCausalLM
from gp_lightning.runtime.io import staged_directory


def save_pruned(model: GPPrunedForCausalLM, tokenizer: object | None, directory: Path,
                max_shard_size: str | int = "5GB") -> Path:
    """Save atomically: written into a staging directory, then renamed onto ``directory``."""
    GPPrunedConfig.register_for_auto_class()
    GPPrunedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    # transformers may flip this switch while building the model; it is not part of the schema
    model.config.__dict__.pop("allow_global_per_layer_attribute_access", None)
    with staged_directory(directory) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
    return directory


def load_pruned(path: str | Path, dtype: torch.dtype | None = None) -> GPPrunedForCausalLM:
    """Load a pruned checkpoint with the project's own classes (no remote code).

    Warns when the checkpoint's shipped modeling code is older than this release's (other tools run that copy).
    """
    from gp_lightning.model.gp_pruned.revision import warn_if_stale

    warn_if_stale(path)
    return GPPrunedForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def save_checkpoint(model: torch.nn.Module, tokenizer: object | None, directory: Path) -> Path:
    """Save any supported model atomically in its own format: pruned models as pruned checkpoints."""
    if isinstance(model, GPPrunedForCausalLM):
        return save_pruned(model, tokenizer, directory)
    with staged_directory(directory) as staging:
        model.save_pretrained(staging, safe_serialization=True)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
    return directory
