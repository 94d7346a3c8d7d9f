"""``gp-lightning export-gguf``: a GGUF that llama.cpp runs, per-layer shapes included (the ``deci`` architecture;
a model whose layers are all alike is written as plain ``llama``, which every GGUF runtime reads).

Streamed: the header lists every tensor's shape first, then tensors are read from the safetensors
files one at a time, converted and appended, so the peak memory is about one tensor. The file is
written under a temporary name and renamed at the end.

Conversions llama.cpp expects: q/k projections (and their biases) are permuted from Hugging Face's
half-split RoPE layout to the interleaved one of llama.cpp's "normal" RoPE; output biases of a block
(``self_attn_output_bias``, ``mlp_output_bias``) are added to the ``attn_output`` / ``ffn_down`` biases.
Norms and biases stay float32; with ``q8_0`` a matrix whose rows are not a multiple of 32 is written
as f16 (as llama.cpp's own converter does).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from gp_lightning.export.gguf_layers import LayerPlan, ModelPlan, plan_model, read_config, rope_keys
from gp_lightning.export.gguf_vocab import add_vocab
from gp_lightning.model.weights import source_weight_files
from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.errors import GPLightningError, ModelSourceError
from gp_lightning.runtime.io import atomic_write

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHES = ("auto", "deci", "llama")


@dataclass(frozen=True)
class GGUFExport:
    """What was written."""

    path: Path
    outtype: str
    tensors: int
    bytes: int
    seconds: float
    layers: int
    arch: str  # deci | llama


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, columns)
    make: Callable[[], np.ndarray]  # float32 values


class _Weights:
    """Tensors of a safetensors checkpoint by name, read one at a time."""

    def __init__(self, model_dir: Path) -> None:
        self.files: dict[str, Path] = {}
        for path in source_weight_files(model_dir):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self.files[name] = path

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ModelSourceError(f"the checkpoint has no tensor '{name}', which its config implies")
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name).float().numpy()


def _permute(values: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half layout of q/k rows to llama.cpp's interleaved pairs (rows of each head reordered)."""
    rows = values.shape[0]
    tail = values.shape[1:]
    return values.reshape(heads, 2, rows // heads // 2, *tail).swapaxes(1, 2).reshape(rows, *tail)


def _llama3_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
    """Llama-3.1's per-frequency RoPE divisors (``rope_freqs.weight``), from its published formula."""
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    original = float(params["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    divisors = np.where(wavelen < original / high, 1.0,
                        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


def _tensor_plan(plan: ModelPlan, weights: _Weights) -> list[_Tensor]:
    hidden, hd = plan.hidden, plan.head_dim
    out: list[_Tensor] = [_Tensor("token_embd.weight", (int(plan.config["vocab_size"]), hidden),
                                  lambda: weights.get("model.embed_tokens.weight"))]
    theta, kind, params = rope_keys(plan.config)
    if kind == "llama3":
        out.append(_Tensor("rope_freqs.weight", (hd // 2,), lambda: _llama3_factors(params, hd, theta)))
    for new, layer in enumerate(plan.layers):
        out += _layer_tensors(new, layer, plan, weights)
    out.append(_Tensor("output_norm.weight", (hidden,), lambda: weights.get("model.norm.weight")))
    if not plan.tied:
        out.append(_Tensor("output.weight", (int(plan.config["vocab_size"]), hidden),
                           lambda: weights.get("lm_head.weight")))
    return out


def _summed(weights: _Weights, *names: str, size: int) -> Callable[[], np.ndarray]:
    """The sum of the named vectors the checkpoint has (a block's bias plus its output bias)."""
    present = [n for n in names if n in weights]
    return lambda: sum((weights.get(n) for n in present), np.zeros(size, dtype=np.float32))


def _zeros(*shape: int) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(shape, dtype=np.float32)


def _layer_tensors(new: int, layer: LayerPlan, plan: ModelPlan, weights: _Weights) -> list[_Tensor]:
    src, blk = f"model.layers.{layer.source}", f"blk.{new}"
    out = _attention_tensors(src, blk, layer, plan, weights) if layer.heads else []
    return out + (_mlp_tensors(src, blk, layer, plan, weights) if layer.ff else [])


def _attention_tensors(src: str, blk: str, layer: LayerPlan, plan: ModelPlan, weights: _Weights) -> list[_Tensor]:
    hidden, q, kv = plan.hidden, layer.heads * plan.head_dim, layer.kv_heads * plan.head_dim
    a = f"{src}.self_attn"
    if not layer.attention:  # one zero KV group: adds nothing but its bias
        return [_Tensor(f"{blk}.attn_norm.weight", (hidden,), lambda: np.ones(hidden, dtype=np.float32)),
                _Tensor(f"{blk}.attn_q.weight", (q, hidden), _zeros(q, hidden)),
                _Tensor(f"{blk}.attn_k.weight", (kv, hidden), _zeros(kv, hidden)),
                _Tensor(f"{blk}.attn_v.weight", (kv, hidden), _zeros(kv, hidden)),
                _Tensor(f"{blk}.attn_output.weight", (hidden, q), _zeros(hidden, q)),
                _Tensor(f"{blk}.attn_output.bias", (hidden,), _summed(weights, f"{src}.self_attn_output_bias", size=hidden))]
    out = [_Tensor(f"{blk}.attn_norm.weight", (hidden,), lambda: weights.get(f"{src}.input_layernorm.weight")),
           _Tensor(f"{blk}.attn_q.weight", (q, hidden), lambda: _permute(weights.get(f"{a}.q_proj.weight"), layer.heads)),
           _Tensor(f"{blk}.attn_k.weight", (kv, hidden),
                   lambda: _permute(weights.get(f"{a}.k_proj.weight"), layer.kv_heads)),
           _Tensor(f"{blk}.attn_v.weight", (kv, hidden), lambda: weights.get(f"{a}.v_proj.weight"))]
    if f"{a}.q_proj.bias" in weights:
        out += [_Tensor(f"{blk}.attn_q.bias", (q,), lambda: _permute(weights.get(f"{a}.q_proj.bias"), layer.heads)),
                _Tensor(f"{blk}.attn_k.bias", (kv,), lambda: _permute(weights.get(f"{a}.k_proj.bias"), layer.kv_heads)),
                _Tensor(f"{blk}.attn_v.bias", (kv,), lambda: weights.get(f"{a}.v_proj.bias"))]
    out.append(_Tensor(f"{blk}.attn_output.weight", (hidden, q), lambda: weights.get(f"{a}.o_proj.weight")))
    if f"{a}.o_proj.bias" in weights or layer.attn_out_bias:
        out.append(_Tensor(f"{blk}.attn_output.bias", (hidden,),
                           _summed(weights, f"{a}.o_proj.bias", f"{src}.self_attn_output_bias", size=hidden)))
    return out


def _mlp_tensors(src: str, blk: str, layer: LayerPlan, plan: ModelPlan, weights: _Weights) -> list[_Tensor]:
    hidden, ff, m = plan.hidden, layer.ff, f"{src}.mlp"
    if not layer.mlp:  # one zero channel: silu(0) * 0 adds nothing but the bias
        return [_Tensor(f"{blk}.ffn_norm.weight", (hidden,), lambda: np.ones(hidden, dtype=np.float32)),
                _Tensor(f"{blk}.ffn_gate.weight", (1, hidden), _zeros(1, hidden)),
                _Tensor(f"{blk}.ffn_up.weight", (1, hidden), _zeros(1, hidden)),
                _Tensor(f"{blk}.ffn_down.weight", (hidden, 1), _zeros(hidden, 1)),
                _Tensor(f"{blk}.ffn_down.bias", (hidden,), _summed(weights, f"{src}.mlp_output_bias", size=hidden))]
    out = [_Tensor(f"{blk}.ffn_norm.weight", (hidden,), lambda: weights.get(f"{src}.post_attention_layernorm.weight"))]
    for name, proj in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj")):
        out.append(_Tensor(f"{blk}.{name}.weight", (ff, hidden), lambda proj=proj: weights.get(f"{m}.{proj}.weight")))
        if f"{m}.{proj}.bias" in weights:
            out.append(_Tensor(f"{blk}.{name}.bias", (ff,), lambda proj=proj: weights.get(f"{m}.{proj}.bias")))
    out.append(_Tensor(f"{blk}.ffn_down.weight", (hidden, ff), lambda: weights.get(f"{m}.down_proj.weight")))
    if f"{m}.down_proj.bias" in weights or layer.mlp_out_bias:
        out.append(_Tensor(f"{blk}.ffn_down.bias", (hidden,),
                           _summed(weights, f"{m}.down_proj.bias", f"{src}.mlp_output_bias", size=hidden)))
    return out


def _storage(outtype: str, shape: tuple[int, ...]) -> str:
    """The type one tensor is stored in: vectors stay f32; q8_0 needs rows of whole 32-blocks."""
    if len(shape) == 1 or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and shape[-1] % 32:
        return "f16"
    return outtype


def _qtype(kind: str) -> object:
    """The gguf block type of a quantized storage kind (bf16, q8_0); f32/f16 are plain numpy dtypes."""
    import gguf

    return {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]


def _encode(values: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32)
    if kind == "f32":
        return values
    if kind == "f16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values, _qtype(kind))


def _nbytes(shape: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], np.dtype, int]:
    import gguf

    count = math.prod(shape)
    if kind == "f32":
        return shape, np.dtype(np.float32), 4 * count
    if kind == "f16":
        return shape, np.dtype(np.float16), 2 * count
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, _qtype(kind))
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype ALL_F32, MOSTLY_F16/Q8_0/BF16


def _architecture(plan: ModelPlan, arch: str) -> str:
    """``llama`` (every runtime that reads GGUF runs it) when every layer has the same widths and no placeholder,
    else ``deci`` (per-layer arrays)."""
    shapes = {(x.heads, x.kv_heads, x.ff) for x in plan.layers}
    uniform = len(shapes) == 1 and not any(x.attention_placeholder or x.mlp_placeholder for x in plan.layers)
    uniform = uniform and len(plan.layers) == int(plan.config["num_hidden_layers"]) and plan.layers[0].heads > 0
    if arch == "auto":
        return "llama" if uniform else "deci"
    if arch == "llama" and not uniform:
        raise ModelSourceError("--arch llama needs every layer to have the same widths (allocation: uniform_per_layer); "
                               "this checkpoint's layers differ: use --arch deci (or auto)")
    return arch


def _add_hparams(writer: object, plan: ModelPlan, context_length: int | None, name: str, outtype: str,
                 arch: str) -> None:
    config = plan.config
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(2)
    writer.add_context_length(int(context_length or config["max_position_embeddings"]))
    writer.add_embedding_length(plan.hidden)
    writer.add_block_count(len(plan.layers))
    writer.add_vocab_size(int(config["vocab_size"]))
    first = plan.layers[0]
    if arch == "llama":  # one width for every layer
        writer.add_head_count(first.heads)
        writer.add_head_count_kv(first.kv_heads)
        writer.add_feed_forward_length(first.ff)
    else:
        writer.add_head_count([layer.heads for layer in plan.layers])
        writer.add_head_count_kv([layer.kv_heads for layer in plan.layers])
        writer.add_feed_forward_length([layer.ff for layer in plan.layers])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    theta, kind, params = rope_keys(config)
    writer.add_rope_freq_base(theta)
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def export_gguf(model_dir: str | Path, output: str | Path, outtype: str = "f16", tokenizer_dir: str | Path | None = None,
                context_length: int | None = None, arch: str = "auto") -> GGUFExport:
    """Write ``model_dir`` (a gp_pruned or dense llama/mistral/qwen2 checkpoint) as a GGUF: llama.cpp's ``deci``
    architecture for per-layer widths, plain ``llama`` for uniform ones (``arch="auto"``)."""
    import gguf

    if outtype not in OUTTYPES:
        raise GPLightningError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    if arch not in ARCHES:
        raise GPLightningError(f"--arch {arch}: expected one of {', '.join(ARCHES)}")
    model_dir, output = Path(model_dir), Path(output)
    started = time.perf_counter()
    plan = plan_model(read_config(model_dir), context_length)
    arch = _architecture(plan, arch)
    weights = _Weights(model_dir)
    tensors = _tensor_plan(plan, weights)
    name = plan.config.get("_name_or_path") or model_dir.resolve().name

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_hparams(writer, plan, context_length, str(name), outtype, arch)
        add_vocab(writer, Path(tokenizer_dir or model_dir), int(plan.config["vocab_size"]))
        kinds = []
        for t in tensors:
            kind = _storage(outtype, t.shape)
            byte_shape, dtype, nbytes = _nbytes(t.shape, kind)
            raw = None if kind in ("f32", "f16") else _qtype(kind)
            writer.add_tensor_info(t.name, byte_shape, dtype, nbytes, raw_dtype=raw)
            kinds.append(kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm.auto import tqdm

        for t, kind in tqdm(list(zip(tensors, kinds, strict=True)), desc="GGUF", unit="tensor", leave=False):
            values = t.make()
            if tuple(values.shape) != t.shape:
                raise ModelSourceError(f"tensor for {t.name} has shape {tuple(values.shape)}, the config implies {t.shape}")
            writer.write_tensor_data(_encode(values, kind))
        writer.close()

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, write)
    seconds = time.perf_counter() - started
    log.info("Wrote %s (%s, %s architecture, %d layers, %.1f MB) in %.1f s", output, outtype, arch, len(plan.layers),
             output.stat().st_size / 1e6, seconds)
    return GGUFExport(output, outtype, len(tensors), output.stat().st_size, seconds, len(plan.layers), arch)


def main(argv: list[str]) -> int:
    """``gp-lightning export-gguf MODEL_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]``."""
    parser = argparse.ArgumentParser(prog="gp-lightning export-gguf",
                                     description="Write a checkpoint as a GGUF for llama.cpp (deci architecture).")
    parser.add_argument("model_dir", help="a pruned run's model/ or a dense llama/mistral/qwen2 HF directory")
    parser.add_argument("output", help="the .gguf file to write (replaced atomically)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16", help="matrix storage (norms and biases stay f32)")
    parser.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: MODEL_DIR)")
    parser.add_argument("--arch", choices=ARCHES, default="auto",
                        help="llama.cpp architecture: deci (per-layer widths), llama (uniform layers only), auto")
    parser.add_argument("--context_length", type=int, default=None,
                        help="context length written (default: max_position_embeddings)")
    args = parser.parse_args(argv)
    try:
        run_manifest.require_complete(args.model_dir, "export-gguf")
        if Path(args.output).is_dir():
            raise GPLightningError(f"{args.output} is a directory: name the .gguf file to write (e.g. "
                                   f"{Path(args.output) / 'model.gguf'}).")
        done = export_gguf(args.model_dir, args.output, args.outtype, args.tokenizer, args.context_length, args.arch)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{done.path} ({done.outtype}, {done.arch}, {done.layers} layers, {done.bytes / 1e6:.1f} MB, "
          f"{done.seconds:.1f} s)")
    return 0
