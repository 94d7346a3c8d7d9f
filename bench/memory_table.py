"""Estimated per-GPU memory of the Taylor calibration pass for Llama-3-8B / 70B under FSDP2 and ZeRO-3,
and what a distillation teacher, the compensation and the width search add.

    python bench/memory_table.py [--seq_len 2048 --micro_batch 1 --precision bf16-true --gpus 8 16 32]

Prints a markdown table (and writes it to ``bench/results/memory_table.md``) of what one GPU holds at
the peak of a calibration step, for each model, strategy and GPU count, plus whole-job aggregates and
the fewest 80 GB GPUs that fit. Everything is arithmetic on the published shapes (read from a meta-device
model, no weights); nothing is run.

Model of the calibration pass
=============================
Calibration is forward + backward of the causal-LM loss over the calibration windows, gradients
accumulated over all batches, and NO optimizer step. Every rank (data parallel over all N GPUs)
processes its own micro-batch of ``micro_batch x seq_len`` tokens. Per GPU:

Shapes and unit costs come from gp-lightning's own ``ModelLayout`` (``describe_checkpoint`` of a
meta-device ``LlamaForCausalLM`` of the published config, ``bench/common.py``), the view the pipeline
prunes by: per layer q/k/v/o (hidden x heads*head_dim, hidden x kv_heads*head_dim twice, heads*head_dim x
hidden) are kv_heads GQA groups, gate/up/down (hidden x intermediate twice, intermediate x hidden) are
intermediate MLP channels; the total is the meta model's parameter count. Outside the units: two RMSNorm
weights per layer (hidden each), the embedding (vocab x hidden), the final norm and an untied lm_head
(vocab x hidden). Llama has no biases. ``tests/test_memory_table.py`` checks the counts against
``LlamaForCausalLM`` built on the meta device.

weights/GPU
    The sharded copy of ALL parameters, 1/N per rank, in the storage dtype of ``--precision``
    (bf16-true: 2 bytes; bf16-mixed and 32-true: float32 master weights, 4 bytes), plus the
    all-gathered (unsharded) parameters in flight, in the compute dtype (bf16 for both bf16 modes:
    FSDP's mixed-precision policy gathers in bf16). The default is bf16-mixed, what distributed
    calibration runs (float32 shards for exact gradient accumulation, bf16 gathers and compute);
    ``--precision bf16-true`` shows what bf16 shards would save.

    * FSDP2 (``fully_shard`` on every decoder block and on the root model): one block is gathered for
      the running forward/backward and the next one is prefetched, so ``--fsdp_blocks_in_flight`` (2)
      blocks. The root group (embedding, final norm, lm_head) is NOT resharded after forward (FSDP2
      skips that for the root, whose parameters backward would gather again at once), so it stays
      unsharded for the whole step: with vocab 128k that is 2 x vocab x hidden parameters, larger than
      the two blocks. Wrapping embedding and lm_head as their own FSDP units would cut it.
    * ZeRO-3 (DeepSpeed defaults, which Lightning's DeepSpeedStrategy does not change): parameters are
      gathered module by module (each Linear / Embedding), prefetching up to
      ``stage3_prefetch_bucket_size`` (5e7) elements ahead while fewer than
      ``stage3_max_live_parameters`` (1e9) are resident, and a gathered parameter is kept (not released)
      when it is used again within ``stage3_max_reuse_distance`` (1e9) elements, which happens at the
      forward/backward turn and for every checkpointed block (recompute, then backward). Assumption:
      the resident gathered parameters are at most max_live + max_reuse_distance elements (2e9 by
      default), and at least the largest single module plus one prefetch bucket. Parameters smaller
      than ``stage3_param_persistence_threshold`` (1e5 elements: the RMSNorm weights) are never
      partitioned and count in full on every rank. Lower both knobs to shrink this term.

grads/GPU
    Only the projection weights of pruning units (q/k/v/o, gate/up/down) get gradients; embedding,
    norms and lm_head have ``requires_grad=False``. Taylor importance needs the gradient of the loss
    over the WHOLE calibration set, so gradients accumulate across batches; they are kept sharded and
    in float32 so the sum is exact: 4 bytes x projection parameters / N. Plus the transient unsharded
    gradient in the compute dtype before it is reduce-scattered: FSDP2, the projection weights of one
    block; ZeRO-3, its reduce bucket (``--zero3_reduce_bucket_size``, Lightning's default 2e8 elements,
    or the largest projection weight if that is larger: a single gradient is never split).
    No optimizer state: calibration never steps, so there are no Adam moments and no second master copy.

activations
    With activation checkpointing on every decoder block (``--activation_checkpointing on``):

    * the input hidden state of every block is kept for the whole step:
      ``layers x micro_batch x seq_len x hidden x dtype bytes``;
    * the rotary cos/sin tables (``2 x tokens x head_dim``), shared by all blocks;
    * the final RMSNorm's float32 copy of its input and its normalized output (lm_head's input);
    * ONE block's recompute working set, i.e. what autograd saves when the block is re-run during
      backward, plus its backward transients. Per token, in compute-dtype elements unless noted:
      input RMSNorm float32 copy (hidden, 4 bytes); normalized input saved by q/k/v (hidden); RoPE'd
      q and k, and v, saved by SDPA (flash / memory-efficient kernels, no seq x seq score matrix), with
      k and v counted at the FULL head count as if repeat_kv expanded them (conservative: SDPA with
      ``enable_gqa`` keeps only kv_heads); attention output saved by SDPA and its contiguous copy saved
      by o_proj (2 x heads*head_dim); softmax log-sum-exp (heads, float32); post-attention RMSNorm
      float32 copy (hidden, 4 bytes) and normalized input saved by gate/up (hidden); MLP gate, up,
      act = silu(gate) and act*up saved for backward (4 x intermediate). Backward transients: three
      intermediate-sized gradients at once (d(act*up), d(act), d(up)) and two residual-stream
      gradients (hidden each).

    With ``--activation_checkpointing off`` every block keeps its saved set for the whole step
    (layers x saved set), plus one block's backward transients. The current ``CalibrationModule``
    does not enable activation checkpointing yet; at 2048 tokens that is the difference between
    1.1 / 3.8 GiB (checkpointed) and 12.8 / 63 GiB (not) of activations per GPU for 8B / 70B.

logits
    ``micro_batch x seq_len x vocab x 4 bytes x 2``: the float32 logits the loss is computed from plus
    their float32 gradient. At vocab 128,256 this is the single largest activation tensor. A chunked
    (or fused linear + cross-entropy) loss that never materializes the full logits would remove it;
    not implemented yet. Lower bound: ``token_loss_sum`` also briefly holds the bf16 logits, a
    contiguous bf16 copy of ``logits[:, :-1]`` and the float32 log-softmax saved by cross-entropy, up to
    about 12 bytes per logit at the forward/loss boundary.

statistics
    The per-unit importance accumulators: one float64 per GQA group (kv_heads per layer) and per MLP
    channel (intermediate per layer), replicated on every rank. Tiny (a few MiB); ``taylor_2nd`` keeps
    a second one (the Fisher term). For plain Taylor the accumulated float32 gradients ARE the
    running statistic (|w * g| is taken after summing g), and they are counted under grads.

Not counted: CUDA context, NCCL buffers, cuBLAS workspaces and allocator fragmentation (together
typically 2-5 GiB); ``--reserve_gib`` (4) is subtracted from the GPU size for the minimum-GPU count.
Perplexity evaluation and the ablation passes of ``temperature`` / ``tau`` are forward-only and need
less than the calibration step.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

try:
    from bench import common
except ModuleNotFoundError:  # `python bench/memory_table.py` without the repository on sys.path
    import common  # type: ignore[no-redef]

if TYPE_CHECKING:
    from gp_lightning.model.layout import LayerLayout, ModelLayout

GIB = 1024**3
GB = 1000**3

Strategy = Literal["FSDP2", "ZeRO-3"]
STRATEGIES: tuple[Strategy, ...] = ("FSDP2", "ZeRO-3")

#: ``--precision``: (bytes of the sharded stored parameters, bytes of gathered parameters and activations).
PRECISIONS: dict[str, tuple[int, int]] = {
    "bf16-true": (2, 2),  # bf16 weights; gradients accumulate in separate float32 buffers
    "bf16-mixed": (4, 2),  # float32 master weights sharded, gathered in bf16 (FSDP MixedPrecision param_dtype)
    "32-true": (4, 4),
}
FP32 = 4
FP64 = 8


class ModelShape:
    """A Llama-style decoder (no biases, identical layers): shapes and unit costs from its ``ModelLayout``.

    The layout is what the pipeline itself prunes by, read from a meta-device ``LlamaForCausalLM`` of the
    published config; built on first use, so ``--help`` does not import torch.
    """

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name
        self.config = dict(config)

    def __repr__(self) -> str:
        return f"ModelShape({self.name!r})"

    @cached_property
    def layout(self) -> ModelLayout:
        layout = common.meta_layout(self.config)
        if len({(la.num_kv_heads, la.queries_per_kv, la.intermediate_size) for la in layout.layers}) != 1:
            raise ValueError(f"{self.name}: the memory model assumes identical decoder layers")
        return layout

    # -- shapes -----------------------------------------------------------------------------------------
    @property
    def layer(self) -> LayerLayout:
        """Layer 0, standing for every layer."""
        return self.layout.layers[0]

    @property
    def hidden(self) -> int:
        return self.layout.hidden_size

    @property
    def layers(self) -> int:
        return self.layout.num_layers

    @property
    def heads(self) -> int:
        return self.layer.num_q_heads

    @property
    def kv_heads(self) -> int:
        return self.layer.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    @property
    def intermediate(self) -> int:
        return self.layer.intermediate_size

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])  # not a pruning shape: the layout does not hold it

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    # -- per layer --------------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        """q, k, v, o projection weights of one layer: its GQA groups."""
        return self.kv_heads * self.layout.attention_group_cost(self.layer)

    @property
    def mlp_params(self) -> int:
        """gate, up, down projection weights of one layer: its MLP channels."""
        return self.intermediate * self.layout.mlp_channel_cost(self.layer)

    @property
    def projection_params_per_layer(self) -> int:
        """Weights of the pruning units of one layer: the only parameters that get gradients."""
        return self.layout.layer_params(self.layer)

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden  # input_layernorm + post_attention_layernorm

    @property
    def block_params(self) -> int:
        return self.projection_params_per_layer + self.norm_params_per_layer

    @property
    def largest_projection(self) -> int:
        return max(self.hidden * self.intermediate, self.hidden * self.heads * self.head_dim)

    # -- whole model ------------------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder blocks: embedding, final norm, lm_head."""
        return self.embedding_params + self.hidden + self.lm_head_params

    @property
    def total_params(self) -> int:
        """Every parameter of the meta-device model (a tied embedding counts once)."""
        return self.layout.total_params

    @property
    def projection_params(self) -> int:
        return self.layout.prunable_params

    @property
    def norm_params(self) -> int:
        return self.layers * self.norm_params_per_layer + self.hidden

    @property
    def units(self) -> int:
        """Pruning units: one per GQA group and one per MLP channel, in every layer."""
        return sum(layer.num_kv_heads + layer.intermediate_size for layer in self.layout.layers)


LLAMA3_8B = ModelShape("Llama-3-8B", common.LLAMA3["Llama-3-8B"])
LLAMA3_70B = ModelShape("Llama-3-70B", common.LLAMA3["Llama-3-70B"])
MODELS: tuple[ModelShape, ...] = (LLAMA3_8B, LLAMA3_70B)


@dataclass(frozen=True)
class Settings:
    """The calibration step and the strategy knobs the estimate depends on."""

    seq_len: int = 2048
    micro_batch: int = 1
    precision: str = "bf16-mixed"
    activation_checkpointing: bool = True
    fsdp_blocks_in_flight: int = 2
    zero3_prefetch_bucket_size: int = 50_000_000
    zero3_max_live_parameters: int = 1_000_000_000
    zero3_max_reuse_distance: int = 1_000_000_000
    zero3_param_persistence_threshold: int = 100_000
    zero3_reduce_bucket_size: int = 200_000_000

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def stored_bytes(self) -> int:
        """Bytes per element of the sharded stored parameters."""
        return PRECISIONS[self.precision][0]

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of gathered parameters, activations and transient gradients."""
        return PRECISIONS[self.precision][1]


@dataclass(frozen=True)
class Estimate:
    """Bytes one GPU holds at the peak of a calibration step."""

    model: ModelShape
    strategy: Strategy
    gpus: int
    weights_sharded: int
    weights_in_flight: int
    grads_sharded: int
    grads_transient: int
    activations: int
    logits: int
    statistics: int

    @property
    def weights(self) -> int:
        return self.weights_sharded + self.weights_in_flight

    @property
    def grads(self) -> int:
        return self.grads_sharded + self.grads_transient

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.activations + self.logits + self.statistics


# -- the terms -------------------------------------------------------------------------------------
def weight_bytes(model: ModelShape, strategy: Strategy, gpus: int, s: Settings) -> tuple[int, int]:
    """(sharded, in flight) parameter bytes per GPU."""
    if strategy == "FSDP2":
        sharded = math.ceil(model.total_params / gpus) * s.stored_bytes
        in_flight = (s.fsdp_blocks_in_flight * model.block_params + model.root_params) * s.compute_bytes
        return sharded, in_flight
    persistent = model.norm_params if model.hidden < s.zero3_param_persistence_threshold else 0
    sharded = math.ceil((model.total_params - persistent) / gpus) * s.stored_bytes + persistent * s.stored_bytes
    largest_module = max(model.embedding_params, model.lm_head_params, model.largest_projection)
    live = max(s.zero3_max_live_parameters + s.zero3_max_reuse_distance, largest_module + s.zero3_prefetch_bucket_size)
    return sharded, min(live, model.total_params) * s.compute_bytes


def gradient_bytes(model: ModelShape, strategy: Strategy, gpus: int, s: Settings) -> tuple[int, int]:
    """(sharded float32 accumulators, transient unsharded gradient) bytes per GPU."""
    sharded = math.ceil(model.projection_params / gpus) * FP32
    if strategy == "FSDP2":
        transient = model.projection_params_per_layer
    else:
        transient = max(s.zero3_reduce_bucket_size, model.largest_projection)
    return sharded, transient * s.compute_bytes


def block_saved_elements_per_token(model: ModelShape, s: Settings) -> int:
    """Bytes per token autograd saves inside one decoder block for its backward."""
    a = s.compute_bytes
    attention = (
        model.hidden * FP32  # input RMSNorm: float32 copy of its input
        + model.hidden * a  # normalized input, saved by q/k/v_proj for their weight gradients
        + 3 * model.heads * model.head_dim * a  # RoPE'd q, k and v saved by SDPA (k, v at full head count)
        + 2 * model.heads * model.head_dim * a  # SDPA output and o_proj's contiguous input
        + model.heads * FP32  # log-sum-exp of the flash / memory-efficient kernel
    )
    mlp = (
        model.hidden * FP32  # post-attention RMSNorm float32 copy
        + model.hidden * a  # normalized input, saved by gate/up_proj
        + 4 * model.intermediate * a  # gate, up, silu(gate), silu(gate) * up
    )
    return attention + mlp


def block_backward_transient_per_token(model: ModelShape, s: Settings) -> int:
    """Bytes per token of gradients alive at once while one block runs backward."""
    return (3 * model.intermediate + 2 * model.hidden) * s.compute_bytes


def activation_bytes(model: ModelShape, s: Settings) -> int:
    """Activation bytes per GPU (independent of the GPU count: every rank runs its own micro-batch)."""
    t, a = s.tokens, s.compute_bytes
    rope = 2 * t * model.head_dim * a
    final_norm = t * model.hidden * (FP32 + a)
    block = t * block_saved_elements_per_token(model, s)
    transient = t * block_backward_transient_per_token(model, s)
    # checkpointing: every block's input, and one block's saved set during its recompute; without it: every block's set
    stored = model.layers * t * model.hidden * a + block if s.activation_checkpointing else model.layers * block
    return stored + transient + rope + final_norm


def logits_bytes(model: ModelShape, s: Settings) -> int:
    """float32 logits and their gradient."""
    return s.tokens * model.vocab * FP32 * 2


def statistics_bytes(model: ModelShape) -> int:
    return model.units * FP64


def estimate(model: ModelShape, strategy: Strategy, gpus: int, s: Settings) -> Estimate:
    weights_sharded, weights_in_flight = weight_bytes(model, strategy, gpus, s)
    grads_sharded, grads_transient = gradient_bytes(model, strategy, gpus, s)
    return Estimate(model, strategy, gpus, weights_sharded, weights_in_flight, grads_sharded, grads_transient,
                    activation_bytes(model, s), logits_bytes(model, s), statistics_bytes(model))


def min_gpus(model: ModelShape, strategy: Strategy, s: Settings, budget: int, limit: int = 4096) -> int | None:
    """Fewest GPUs whose per-GPU total fits ``budget`` bytes (None if not even ``limit`` GPUs do)."""
    for gpus in range(1, limit + 1):
        if estimate(model, strategy, gpus, s).total <= budget:
            return gpus
    return None


# -- output -----------------------------------------------------------------------------------------
def gib(value: int, digits: int = 2) -> str:
    return f"{value / GIB:.{digits}f}"


def mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def header(s: Settings, command: str) -> list[str]:
    """Title, the command that reproduces the table, and the settings it depends on."""
    return [
        "# Estimated per-GPU memory of the calibration pass (Llama-3-8B / 70B)",
        "",
        f"Produced by: `{command}`",
        "",
        f"Settings: seq_len {s.seq_len}, micro-batch {s.micro_batch} ({s.tokens:,} tokens per GPU per step), "
        f"precision {s.precision} (stored parameters {s.stored_bytes} B, gathered parameters and activations "
        f"{s.compute_bytes} B), activation checkpointing {'on' if s.activation_checkpointing else 'off'}, "
        f"FSDP2 blocks in flight {s.fsdp_blocks_in_flight}, ZeRO-3 max_live {s.zero3_max_live_parameters:.0e} + "
        f"max_reuse_distance {s.zero3_max_reuse_distance:.0e} elements, prefetch bucket "
        f"{s.zero3_prefetch_bucket_size:.0e}, reduce bucket {s.zero3_reduce_bucket_size:.0e}. "
        "Model and assumptions: the docstring of `bench/memory_table.py`.",
        "",
    ]


def parameter_rows() -> list[str]:
    lines = [
        "## Parameters (counted from the published shapes)",
        "",
        "| model | total | with grad (q/k/v/o, gate/up/down) | per block | embedding + lm_head + final norm "
        "| pruning units | statistics (float64) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        lines.append(f"| {m.name} | {m.total_params:,} | {m.projection_params:,} | {m.block_params:,} "
                     f"| {m.root_params:,} | {m.units:,} | {mib(statistics_bytes(m))} |")
    return lines


def per_gpu_rows(estimates: Sequence[Estimate]) -> list[str]:
    """What one GPU holds, by term, then the weights and grads split into sharded and transient parts."""
    lines = [
        "",
        "## Per GPU (GiB)",
        "",
        "| model | strategy | GPUs | weights/GPU | grads/GPU | activations | logits | statistics | total |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        lines.append(f"| {e.model.name} | {e.strategy} | {e.gpus} | {gib(e.weights)} | {gib(e.grads)} "
                     f"| {gib(e.activations)} | {gib(e.logits)} | {gib(e.statistics, 4)} | **{gib(e.total)}** |")
    lines += [
        "",
        "Breakdown: weights/GPU = sharded + gathered in flight; grads/GPU = sharded float32 accumulators + one "
        "unsharded gradient before reduce-scatter.",
        "",
        "| model | strategy | GPUs | weights sharded | weights in flight | grads sharded (fp32) | grads transient |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        lines.append(f"| {e.model.name} | {e.strategy} | {e.gpus} | {gib(e.weights_sharded)} "
                     f"| {gib(e.weights_in_flight)} | {gib(e.grads_sharded)} | {gib(e.grads_transient)} |")
    return lines


def whole_job_rows(estimates: Sequence[Estimate]) -> list[str]:
    lines = [
        "",
        "## Whole job (GiB, summed over all GPUs)",
        "",
        "| model | strategy | GPUs | weights | grads | activations | logits | statistics | total |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        n = e.gpus
        lines.append(f"| {e.model.name} | {e.strategy} | {n} | {gib(n * e.weights)} | {gib(n * e.grads)} "
                     f"| {gib(n * e.activations)} | {gib(n * e.logits)} | {gib(n * e.statistics, 3)} "
                     f"| {gib(n * e.total)} |")
    return lines


def min_gpu_rows(s: Settings, gpu_gb: float, reserve_gib: float, gpus_per_node: int) -> list[str]:
    """The fewest GPUs of ``gpu_gb`` that fit, and the fewest whole nodes."""
    budget = int(gpu_gb * GB - reserve_gib * GIB)
    lines = [
        "",
        f"## Minimum number of {gpu_gb:g} GB GPUs",
        "",
        f"A GPU of {gpu_gb:g} GB ({gpu_gb * GB / GIB:.2f} GiB) minus {reserve_gib:g} GiB reserved for the CUDA "
        f"context, NCCL buffers and fragmentation leaves {gib(budget)} GiB per GPU. Whole nodes of "
        f"{gpus_per_node} GPUs in the last columns.",
        "",
        "| model | strategy | sharded state, whole job | min GPUs | per GPU there | whole job there "
        f"| min nodes of {gpus_per_node} | per GPU there |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        for strat in STRATEGIES:
            sharded = weight_bytes(m, strat, 1, s)[0] + gradient_bytes(m, strat, 1, s)[0]
            fewest = min_gpus(m, strat, s, budget)
            if fewest is None:
                lines.append(f"| {m.name} | {strat} | {gib(sharded)} | none up to 4096 | | | | |")
                continue
            at_min = estimate(m, strat, fewest, s)
            nodes = math.ceil(fewest / gpus_per_node)
            at_nodes = estimate(m, strat, nodes * gpus_per_node, s)
            lines.append(f"| {m.name} | {strat} | {gib(sharded)} | {fewest} | {gib(at_min.total)} "
                         f"| {gib(fewest * at_min.total)} | {nodes} ({nodes * gpus_per_node} GPUs) "
                         f"| {gib(at_nodes.total)} |")
    return lines


def notes(s: Settings, gpus: int) -> list[str]:
    lines = ["", "## Notes", ""]
    for m in MODELS:
        e = estimate(m, "FSDP2", gpus, s)
        block_peak = s.tokens * max(block_saved_elements_per_token(m, s), block_backward_transient_per_token(m, s))
        share = e.logits / (e.activations + e.logits)
        lines.append(
            f"- {m.name}: logits {gib(e.logits)} GiB are {share:.0%} of activations + logits, the largest single "
            f"activation tensor (one block's whole recompute working set is {gib(block_peak)} GiB, one checkpointed "
            f"hidden state {gib(s.tokens * m.hidden * s.compute_bytes)} GiB). A chunked loss (lm_head + cross-entropy over "
            "slices of the sequence, never materializing all logits) would remove most of it: not implemented yet."
        )
    lines += [
        "- Statistics are one float64 per GQA group and per MLP channel, replicated on every rank: MiB, not GiB. "
        "taylor_2nd doubles them (Fisher term).",
        "- No optimizer state: calibration never steps. Training with Adam would add 12 bytes per trainable parameter "
        "(float32 master + two moments), sharded.",
        "- Not counted: CUDA context, NCCL buffers, workspaces, fragmentation (the reserve above), and the model "
        "loading path (a rank that materializes the whole model on CPU before sharding needs host RAM, not GPU memory).",
        "",
    ]
    return lines


#: ``search_windows``'s default.
SEARCH_WINDOWS = 24


# -- after calibration: distillation teacher, compensation and search --------------------------------------------
def teacher_bytes(model: ModelShape, gpus: int, s: Settings) -> tuple[int, int, int]:
    """A KD fine-tune's extra bytes per GPU under FSDP2: (teacher shards, teacher gathered in flight, KD loss).

    The teacher is the dense model, frozen, sharded like the student (``fully_shard`` per block and root) in
    the compute dtype (its ``eval_precision``: no float32 master copy, no gradients, no optimizer state). Its
    forward runs under no_grad, so of its activations only one block's transients live at a time (counted in
    the KD term's margin, not here). The loss holds, per logit: the teacher's logits (compute dtype), their
    float32 copy and log-softmax, and the student's float32 copy, log-softmax and its gradient (6 x 4 bytes;
    the student's own logits and their gradient are in the calibration table's ``logits``).
    """
    a = s.compute_bytes
    sharded = math.ceil(model.total_params / gpus) * a
    in_flight = (s.fsdp_blocks_in_flight * model.block_params + model.root_params) * a
    return sharded, in_flight, s.tokens * model.vocab * (a + 6 * FP32)


def teacher_rows(s: Settings, gpu_counts: Sequence[int]) -> list[str]:
    lines = [
        "",
        "## Distillation teacher (fine-tune with finetune_loss kd or kd+lm, FSDP2, GiB per GPU)",
        "",
        "What the dense teacher adds to a fine-tune of the pruned student: its bf16 shards, its gathered blocks "
        f"and root group, and the KD loss tensors for {s.tokens:,} tokens per GPU (`teacher_bytes`).",
        "",
        "| model | GPUs | teacher shards | teacher in flight | KD loss tensors | added by the teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        for gpus in gpu_counts:
            sharded, in_flight, loss = teacher_bytes(m, gpus, s)
            lines.append(f"| {m.name} | {gpus} | {gib(sharded)} | {gib(in_flight)} | {gib(loss)} "
                         f"| **{gib(sharded + in_flight + loss)}** |")
    return lines


def compensation_bytes(model: ModelShape, windows_per_rank: int, s: Settings) -> dict[str, int]:
    """Host bytes per rank of the sequential compensation, with its layers read from disk one at a time.

    The largest system is down_proj's: n = intermediate + 1 (the constant column). Its Gram sum is float32
    (4 n^2); the float64 solve holds the kept part of it twice (the indexed copy and its damped copy) and its
    Cholesky factor, and OBS its float64 Cholesky and float32 inverse: at most 32 n^2 bytes at once. The
    hidden states of the rank's windows are kept entering, inside and leaving the layer (3 x), and the inputs
    captured at down_proj (intermediate wide); one decoder layer's weights are resident.
    """
    n, tokens, a = model.intermediate + 1, windows_per_rank * s.seq_len, s.compute_bytes
    return {"gram": 4 * n * n, "solve": 32 * n * n, "hidden": 3 * tokens * model.hidden * a,
            "captured": tokens * model.intermediate * a, "layer": model.block_params * a}


def compensation_rows(s: Settings, windows: int, gpu_counts: Sequence[int]) -> list[str]:
    lines = [
        "",
        f"## Compensation (least squares, sequential, offloaded layers; {windows} windows of {s.seq_len} tokens, "
        "GiB of host memory per rank)",
        "",
        "Statistics of one layer at a time (`compensation_bytes`): statistics of all layers at once would be "
        "the Gram column times the number of layers.",
        "",
        "| model | ranks | windows per rank | Gram (float32) | solve (float64) | hidden states | down_proj inputs "
        "| one layer | total | all layers' Grams at once |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        for ranks in gpu_counts:
            per_rank = math.ceil(windows / ranks)
            b = compensation_bytes(m, per_rank, s)
            lines.append(f"| {m.name} | {ranks} | {per_rank} | {gib(b['gram'])} | {gib(b['solve'])} | "
                         f"{gib(b['hidden'])} | {gib(b['captured'])} | {gib(b['layer'])} | **{gib(sum(b.values()))}** "
                         f"| {gib(m.layers * b['gram'], 0)} |")
    return lines


def search_bytes(model: ModelShape, ranks: int, windows: int, s: Settings) -> dict[str, int]:
    """Bytes of ``allocation: search`` per rank (host memory) and on disk.

    Every rank holds the dense model (compute dtype) and, for its share of the ``windows`` search windows, the
    dense next-token probabilities (float16, tokens x vocab); the variant cache holds at most ``search_cache_mb``
    (its default, 1 GiB). The Grams of every layer's o_proj and down_proj inputs (float32, the variants are refit on
    them) are on disk, one layer's in memory at a time (as the compensation's).
    """
    n, m = model.intermediate + 1, model.heads * model.head_dim + 1
    per_rank = math.ceil(windows / ranks)
    return {"model": model.total_params * s.compute_bytes, "reference": per_rank * s.seq_len * model.vocab * 2,
            "cache": 2**30, "one_layer_grams": 4 * (n * n + m * m), "disk": model.layers * 4 * (n * n + m * m)}


def search_rows(s: Settings, windows: int, gpu_counts: Sequence[int]) -> list[str]:
    lines = [
        "",
        f"## Width search (allocation: search; {windows} search windows of {s.seq_len} tokens, GiB per rank)",
        "",
        "The layer-variant database is the Grams its variants are refit on: on disk, one file per layer, read one at "
        "a time (`search_bytes`). Every rank also holds the dense model for its fitness passes: the search is for "
        "models one process holds (not with `compensation_offload`).",
        "",
        "| model | ranks | dense model | reference probabilities | variant cache | one layer's Grams | total in memory "
        "| database on disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        for ranks in gpu_counts:
            b = search_bytes(m, ranks, windows, s)
            memory = sum(value for key, value in b.items() if key != "disk")
            lines.append(f"| {m.name} | {ranks} | {gib(b['model'])} | {gib(b['reference'])} | {gib(b['cache'])} | "
                         f"{gib(b['one_layer_grams'])} | **{gib(memory)}** | {gib(b['disk'], 0)} |")
    return lines


def render(s: Settings, gpu_counts: Sequence[int], gpu_gb: float, reserve_gib: float, gpus_per_node: int,
           command: str, compensation_windows: int = 128) -> str:
    estimates = [estimate(m, strat, n, s) for m in MODELS for strat in STRATEGIES for n in gpu_counts]
    lines = [*header(s, command), *parameter_rows(), *per_gpu_rows(estimates), *whole_job_rows(estimates),
             *min_gpu_rows(s, gpu_gb, reserve_gib, gpus_per_node), *teacher_rows(s, gpu_counts),
             *compensation_rows(s, compensation_windows, gpu_counts), *search_rows(s, SEARCH_WINDOWS, gpu_counts),
             *notes(s, gpu_counts[0])]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per calibration window (default 2048)")
    parser.add_argument("--micro_batch", type=int, default=1, help="windows per forward/backward pass per GPU")
    parser.add_argument("--precision", "--dtype", dest="precision", choices=sorted(PRECISIONS), default="bf16-mixed",
                        help="bf16-true: bf16 parameters; bf16-mixed (default): float32 master parameters gathered "
                             "and computed in bf16; 32-true: float32 everywhere")
    parser.add_argument("--activation_checkpointing", choices=("on", "off"), default="on",
                        help="checkpoint every decoder block (default on)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32], help="GPU counts (default 8 16 32)")
    parser.add_argument("--fsdp_blocks_in_flight", type=int, default=2, help="gathered blocks: running + prefetched")
    parser.add_argument("--zero3_max_live_parameters", type=float, default=1e9, help="DeepSpeed default 1e9 elements")
    parser.add_argument("--zero3_max_reuse_distance", type=float, default=1e9, help="DeepSpeed default 1e9 elements")
    parser.add_argument("--zero3_prefetch_bucket_size", type=float, default=5e7, help="DeepSpeed default 5e7 elements")
    parser.add_argument("--zero3_reduce_bucket_size", type=float, default=2e8, help="Lightning's DeepSpeed default")
    parser.add_argument("--gpu_gb", type=float, default=80.0, help="GPU memory in GB (1e9 bytes) for the minimum count")
    parser.add_argument("--reserve_gib", type=float, default=4.0, help="per-GPU memory not available to tensors")
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--compensation_windows", type=int, default=128,
                        help="calibration windows of the compensation, split over the ranks (default 128)")
    common.add_output(parser, "memory_table.md")
    args = parser.parse_args(argv)
    for key in ("seq_len", "micro_batch", "fsdp_blocks_in_flight", "gpus_per_node"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    if min(args.gpus) < 1:
        parser.error("--gpus must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        seq_len=args.seq_len, micro_batch=args.micro_batch, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing == "on",
        fsdp_blocks_in_flight=args.fsdp_blocks_in_flight,
        zero3_prefetch_bucket_size=int(args.zero3_prefetch_bucket_size),
        zero3_max_live_parameters=int(args.zero3_max_live_parameters),
        zero3_max_reuse_distance=int(args.zero3_max_reuse_distance),
        zero3_reduce_bucket_size=int(args.zero3_reduce_bucket_size),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    text = render(settings_from(args), args.gpus, args.gpu_gb, args.reserve_gib, args.gpus_per_node,
                  common.command_line(__file__, argv), args.compensation_windows)
    common.publish(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
