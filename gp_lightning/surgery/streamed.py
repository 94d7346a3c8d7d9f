"""Streamed surgery: prune a checkpoint on disk without ever loading the whole model.

The in-memory path (:func:`gp_lightning.surgery.in_memory.apply_plan` + :func:`save_pruned`) needs the dense
model and its pruned copy in RAM at once. For a model that barely fits (or does not fit) that is
too much, so :func:`stream_prune` instead reads the dense safetensors tensor by tensor, passes each
one through the same :class:`TensorSlicer`, and writes output shards of at most ``max_shard_size``
as it goes. Peak memory is then about one output shard plus one input tensor, whatever the model
size, and the files it writes are the ones ``save_pruned`` would have written for the same plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from gp_lightning.model.gp_pruned.configuration_gp_pruned import GPPrunedConfig
from gp_lightning.model.gp_pruned.modeling_gp_pruned import GPPrunedForCausalLM
from gp_lightning.model.layout import ModelLayout
from gp_lightning.model.source import refuse_mismatch, unexpected_tensors
from gp_lightning.model.weights import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    dense_meta_model,
    load_dense_config,
    read_header,
    source_weight_files,
)
from gp_lightning.runtime.errors import ModelSourceError
from gp_lightning.runtime.io import staged_directory
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.pruned_config import pruned_config
from gp_lightning.surgery.slicer import TensorSlicer

if TYPE_CHECKING:
    from gp_lightning.compensation.run import Compensation


GENERATION_CONFIG_NAME = "generation_config.json"


def _parse_size(size: int | str) -> int:
    """Bytes in ``size`` ("5GB", "500MB", or an int), read exactly as ``save_pretrained`` reads it."""
    if isinstance(size, int):
        return size
    if size.strip().isdigit():
        return int(size)
    try:  # the parser transformers' save_pretrained hands max_shard_size to
        from huggingface_hub.serialization._base import parse_size_to_int
    except ImportError:  # pragma: no cover - huggingface_hub moved it
        from transformers.utils.hub import convert_file_size_to_int as parse_size_to_int
    return int(parse_size_to_int(size))


#: A projection weight inside a decoder layer: layer index, block, projection.
_PROJECTION = re.compile(r"^(?:.*\.)?layers\.(?P<idx>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.weight$")


def _check_pruned_axis(name: str, shape: list[int], layout: ModelLayout, source: Path) -> None:
    """Check that a stored projection is as wide as ``layout`` says along the axis the slicer cuts.

    The dry run slices meta tensors, which do no bounds checks, and the other axes are compared
    with the pruned model's shapes; so this is what catches a layout taken from another model.
    """
    match = _PROJECTION.match(name)
    if match is None:
        return
    idx = int(match["idx"])
    if idx >= layout.num_layers:
        raise ModelSourceError(f"The checkpoint in '{source}' has layer {idx} ('{name}'), the layout only "
                               f"{layout.num_layers} layers: the layout or plan does not match the checkpoint.")
    layer = layout.layers[idx]
    q_width, kv_width = layer.num_q_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
    axis_width = {"q_proj": (0, q_width), "k_proj": (0, kv_width), "v_proj": (0, kv_width), "o_proj": (1, q_width),
                  "gate_proj": (0, layer.intermediate_size), "up_proj": (0, layer.intermediate_size),
                  "down_proj": (1, layer.intermediate_size)}.get(match["proj"])
    if axis_width is not None and (len(shape) != 2 or shape[axis_width[0]] != axis_width[1]):
        raise ModelSourceError(
            f"'{name}' in '{source}' has shape {tuple(shape)}, but the layout expects {axis_width[1]} along axis "
            f"{axis_width[0]}: the layout or plan does not match the checkpoint."
        )


@dataclass(frozen=True)
class _Read:
    """One tensor of the output: where its dense source is stored and the name it is written under."""

    name: str
    file: Path
    source_name: str
    nbytes: int  # of the pruned tensor


def _plan_reads(files: list[Path], layout: ModelLayout, slicer: TensorSlicer, dense: torch.nn.Module,
                expected: dict[str, tuple[int, ...]], tied: set[str], source: Path) -> list[_Read | str]:
    """Which stored tensor becomes which output tensor, in the pruned model's state-dict order.

    Runs the slicer on meta tensors of the stored shapes (from the file headers only), so a
    layout or plan that does not fit the checkpoint fails here, before any weight is read or any
    file is written. Following the pruned model's order makes the shard split the one
    ``save_pretrained`` makes for the in-memory model. A stored buffer the dense model recomputes (the
    ``rotary_emb.inv_freq`` of old checkpoints) is skipped; any other stored tensor the dense model does not
    have is refused, as a load in memory refuses it. A compensation's added output biases have no stored
    source: their names stand in the list instead of a read.
    """
    dense_names = set(dense.state_dict())
    reads: dict[str, _Read] = {}
    unused = []
    for path in files:
        for source_name, info in read_header(path).items():
            if source_name not in dense_names:
                unused.append(source_name)
                continue
            shape = info["shape"]
            _check_pruned_axis(source_name, shape, layout, source)
            result = slicer(source_name, torch.empty(shape, device="meta"))
            if result is None or result[0] in tied:  # a tied lm_head stored anyway: save_pretrained drops it too
                continue
            name, sliced = result
            if name not in expected or name in reads:
                what = "twice" if name in reads else "but the pruned model has no such tensor"
                raise ModelSourceError(f"Streamed surgery would write '{name}' (from '{source_name}') {what}: "
                                       f"the layout or plan does not match the checkpoint in '{source}'.")
            if tuple(sliced.shape) != expected[name]:
                raise ModelSourceError(
                    f"Streamed surgery would write '{name}' with shape {tuple(sliced.shape)}, the pruned model "
                    f"expects {expected[name]}: the layout or plan does not match the checkpoint in '{source}'."
                )
            start, end = info["data_offsets"]
            itemsize = (end - start) // max(math.prod(shape), 1) if slicer.dtype is None else sliced.element_size()
            reads[name] = _Read(name, path, source_name, sliced.numel() * itemsize)
    refuse_mismatch([], unexpected_tensors(unused, dense), str(source))
    added = {name for name, _ in slicer.added()}
    missing = [name for name in expected if name not in reads and name not in added]
    if missing:
        raise ModelSourceError(f"The checkpoint in '{source}' lacks tensors the pruned model needs: {missing}. "
                               "It is incomplete or does not match the layout: download it again.")
    return [reads.get(name, name) for name in expected]


def _read_tensor(read: _Read) -> torch.Tensor:
    """Read one stored tensor.

    ``safe_open`` maps the whole file and returns tensors that alias the mapping, so every page read
    stays resident for as long as the file is open. Opening the file anew for each tensor (cheap: it
    parses only the JSON header) unmaps each input tensor once it has been sliced and written,
    instead of letting a whole input shard accumulate in RAM next to the output shard.
    """
    with safe_open(str(read.file), framework="pt") as handle:
        return handle.get_tensor(read.source_name)


class _ShardWriter:
    """Accumulates tensors and writes a shard whenever the next tensor would exceed ``max_bytes``.

    The split follows ``huggingface_hub.split_torch_state_dict_into_shards`` (the one
    ``save_pretrained`` uses): a tensor larger than the limit gets a shard of its own, otherwise a
    shard is closed when the next tensor does not fit. The number of shards is known only at the
    end, so shards are written under temporary names and renamed by :meth:`finish`.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def make_room(self, nbytes: int) -> None:
        """Write the current shard now if a tensor of ``nbytes`` will not fit in it.

        Called before the tensor is read, so the full shard and the tensor are never in memory together.
        """
        if nbytes <= self.max_bytes and self.current and self.current_bytes + nbytes > self.max_bytes:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.total_size += size
        if size > self.max_bytes:
            self._write({name: tensor})
            return
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor
        self.current_bytes += size

    def flush(self) -> None:
        if self.current:
            self._write(self.current)
        self.current = {}  # drop the references so the shard's memory is freed before the next one
        self.current_bytes = 0

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.directory / f".shard-{len(self.shards):05d}.tmp"
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(tensors)))

    def finish(self, total_parameters: int) -> list[str]:
        """Give the shards transformers' names and write the index; return the weight file names."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.directory / SAFE_WEIGHTS_NAME)
            return [SAFE_WEIGHTS_NAME]
        weight_map: dict[str, str] = {}
        names = []
        for idx, (path, tensors) in enumerate(self.shards):
            filename = f"model-{idx + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / filename)
            weight_map.update(dict.fromkeys(tensors, filename))
            names.append(filename)
        # same content and layout as PreTrainedModel.save_pretrained's index file
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
                 "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(text, encoding="utf-8")
        return names


def _meta_model(config: GPPrunedConfig) -> GPPrunedForCausalLM:
    """The pruned model on the meta device: its expected tensors, without allocating any weights.

    Building it also leaves ``config`` in the state the in-memory path's model construction leaves
    it in, which matters for an identical config.json.
    """
    with torch.device("meta"):
        return GPPrunedForCausalLM(config)


def _generation_config(source: Path, dense_config: Any) -> GenerationConfig:
    """The generation config the dense model would carry after ``from_pretrained(source)``."""
    if (source / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(str(source))
    return GenerationConfig.from_model_config(dense_config)


def _model_dtype(model: GPPrunedForCausalLM, written: dict[str, torch.dtype]) -> torch.dtype:
    """What ``model.dtype`` would be had the written tensors been loaded: the first floating parameter's."""
    for name, _ in model.named_parameters():
        dtype = written.get(name)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return next(iter(written.values()))


def _save_config(staging: Path, config: GPPrunedConfig, model: GPPrunedForCausalLM, dtype: torch.dtype,
                 generation_config: GenerationConfig) -> None:
    """Write config, modeling code and generation config exactly as ``save_pruned`` does.

    Mirrors ``PreTrainedModel.save_pretrained``: record dtype and architecture, copy the modeling
    file (and the config file it imports) with ``auto_map`` entries, then save the configs.
    """
    GPPrunedConfig.register_for_auto_class()
    GPPrunedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config.__dict__.pop("allow_global_per_layer_attribute_access", None)  # as save_pruned: not schema
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    custom_object_save(model, staging, config=config)
    config.save_pretrained(staging)
    generation_config.save_pretrained(staging)


def stream_prune(
    source: str | Path,
    layout: ModelLayout,
    plan: PruningPlan,
    provenance: dict,
    output: Path,
    tokenizer: object | None = None,
    max_shard_size: int | str = "5GB",
    dense_config: Any = None,
    compensation: Compensation | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Apply ``plan`` to the safetensors checkpoint in ``source`` and save the pruned checkpoint to ``output``.

    The result equals ``save_pruned(apply_plan(model, layout, plan, provenance), tokenizer, output)``
    (same tensors, config, modeling files and generation config) but the dense model is never
    loaded: tensors are read one at a time and written in shards of at most ``max_shard_size``
    bytes, each tensor in its stored dtype (floating ones in ``dtype`` when given). ``layout`` must describe the checkpoint
    (:func:`describe_checkpoint` reads it without loading weights). With ``compensation`` its refit
    weights and output biases are written instead of the sliced ones. Writing is atomic: into a
    staging directory that is renamed onto ``output`` when complete and removed on failure.
    """
    source, output = Path(source), Path(output)
    files = source_weight_files(source)
    if dense_config is None:
        dense_config = load_dense_config(source)
    max_bytes = _parse_size(max_shard_size)
    config = pruned_config(dense_config, layout, plan, provenance, compensation)
    model = _meta_model(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}

    dense = dense_meta_model(dense_config)
    reads = _plan_reads(files, layout, TensorSlicer(layout, plan, compensation, dtype), dense, expected, tied, source)
    slicer = TensorSlicer(layout, plan, compensation, dtype)
    generation_config = _generation_config(source, dense_config)

    with staged_directory(output) as staging:
        writer = _ShardWriter(staging, max_bytes)
        written: dict[str, torch.dtype] = {}
        for read in reads:
            if isinstance(read, str):  # written after the stored tensors (the slicer knows which only then)
                continue
            writer.make_room(read.nbytes)
            result = slicer(read.source_name, _read_tensor(read))
            if result is None or result[0] != read.name:  # cannot happen: the slicer looks at names only
                raise RuntimeError(f"TensorSlicer mapped '{read.source_name}' differently for real and meta tensors.")
            written[read.name] = result[1].dtype
            writer.add(read.name, result[1].contiguous())
            del result  # a sliced input is freed now, one passed through when its shard is written
        for name, tensor in slicer.added():
            written[name] = tensor.dtype
            writer.add(name, tensor.contiguous())
        writer.finish(model.num_parameters())
        _save_config(staging, config, model, _model_dtype(model, written), generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
    return output
