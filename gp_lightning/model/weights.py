"""The weight files of a Hugging Face checkpoint directory, read lazily (safetensors headers, one tensor at a time).

Sharded loading (each FSDP rank reads its own rows) and streamed surgery (one tensor at a time)
both read checkpoints this way instead of loading the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gp_lightning.model.layout import ModelLayout, describe
from gp_lightning.runtime.errors import ModelSourceError

SAFE_WEIGHTS_NAME = "model.safetensors"


SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


#: safetensors refuses headers larger than this; a larger length means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000


def source_weight_files(source: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory, in the order they were written.

    Raises :class:`ModelSourceError` (naming the fix) when there is no safetensors checkpoint, since
    only safetensors can be read lazily tensor by tensor.
    """
    source = Path(source)
    if not source.is_dir():
        raise ModelSourceError(
            f"Reading weights tensor by tensor needs a local Hugging Face checkpoint directory, but '{source}' is not a "
            "directory. Download the model first (e.g. `hf download <repo> --local-dir DIR`) and pass DIR."
        )
    index = source / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"'{index}' is not a valid safetensors index ({exc}). Re-download the model.") from exc
        files = [source / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ModelSourceError(
                f"'{index}' lists shard files that are missing: {', '.join(missing)}. The download is "
                "incomplete: download the model again."
            )
        return files
    single = source / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(p.name for p in source.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
    what = f"only {', '.join(found)}" if found else "no weight files at all"
    raise ModelSourceError(
        f"Weights are read lazily from safetensors, but '{source}' has no "
        f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} ({what}). Convert the checkpoint to "
        "safetensors (load it with from_pretrained and save it with save_pretrained(dir, "
        "safe_serialization=True)), or prune it in memory instead of streamed."
    )


def load_dense_config(source: str | Path) -> Any:
    """The dense model's config from ``source``, as a :class:`ModelSourceError` if it is unreadable."""
    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"Could not read the model config from '{source}': {exc}. Point the source at an HF checkpoint "
            "directory that has a config.json."
        ) from exc


def dense_meta_model(dense_config: Any) -> torch.nn.Module:
    """The dense model on the meta device: its modules and tensor names, without any weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(dense_config)


def describe_checkpoint(source: str | Path, dense_config: Any = None) -> ModelLayout:
    """The pruning layout of a checkpoint, read from a meta-device model (no weights are loaded).

    Lets a caller build a plan for a model that is only ever streamed; the layout is the one
    ``describe`` gives for the loaded model, since it depends only on module shapes.
    """
    return describe(dense_meta_model(dense_config if dense_config is not None else load_dense_config(source)))


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file's JSON header.

    Only the header is read: it gives every tensor's shape and byte size without touching the data.
    """
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        for info in header.values():
            info["shape"], info["data_offsets"]  # noqa: B018 (fail here on a malformed entry)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelSourceError(f"'{path}' is not a valid safetensors file ({exc!r}). Re-download the model.") from exc
    return header
