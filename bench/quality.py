"""Pruning quality at equal size: gp-lightning's global table against simpler allocations and Torch-Pruning.

Why: one global table that lets every GQA group and MLP channel of the model compete is only worth its
machinery if, at the same parameter count, it leaves a better model than the simpler ways to decide what
goes. This script prunes SmolLM2-135M (the embedded default) to the same sizes, 20%, 35% and 50% of ALL
parameters removed, in every way below, and measures every pruned model's perplexity on the same tokens:

- ours (global table, through ``gp_lightning.pipeline.oneshot``): ``taylor`` and ``wanda`` as plain global
  rankings and with the best table settings measured so far (``taylor`` + per-layer log normalization,
  ``wanda`` + per-layer minmax), without compensation; then the compensation after selection, one option at
  a time: FLAP's bias, the least-squares refit of o_proj/down_proj on the dense model's inputs, the same
  layer by layer through the pruned model (sequential), plus the units inside each block chosen by OBS (the
  default), and the default refit on 128 windows instead of 32;
- in-project baselines: a uniform per-layer allocation with Taylor importance (LLM-Pruner style: every
  layer loses the same number of GQA groups and the same number of MLP channels, its lowest-Taylor ones),
  global ``magnitude`` and global ``random``, and a FLAP-style allocation (fluctuation metric, standardized
  per block, selected globally, with FLAP's bias compensation);
- peer: Torch-Pruning, once as its LLM example configures it and once keeping the hidden size with its
  Taylor importance and global ranking, its pruning ratio searched until its parameter count matches.

Every method that calibrates sees the same windows: ``num_samples`` random non-overlapping windows of
``seq_len`` tokens of wikitext-2 ``valid.txt`` chosen with ``seed`` (``gp_lightning.data.calibration_windows``).
Perplexity is measured on the first ``eval_windows`` consecutive non-overlapping 128-token windows of
wikitext-2 ``test.txt``, tokenized once (``gp_lightning.evaluation.perplexity``), all in float32.

Bounded settings, sized for under 30 minutes on 2 idle CPU cores: 32 calibration windows of 128 tokens (the
guides use 128 or more), the first 64 of the 2,438 test windows (8,192 tokens, about 2.6% of the test set),
three ratios, Torch-Pruning's ratio searched to within 1% of our parameter count (at most 5 prunes per row).
Absolute perplexities therefore differ from full-test-set numbers; the comparison is what counts. Perplexity
evaluation dominates the run time (about 35 evaluations); with 128 windows a run took 38 minutes on cores that
other jobs kept busy. On a shared machine use ``--threads 1``: oversubscribed OpenMP threads spin, and with
torch's default two threads the same contention made it about 3.4 times slower.

    python bench/quality.py                       # writes bench/results/quality.md and quality.json
    python bench/quality.py --threads 1           # on a machine other jobs share (see --help)
    python bench/quality.py --ratios 0.2 --eval_windows 32 --no_torch_pruning     # a quick look
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

try:
    from bench import common, recovery
    from bench.ood_texts import ood_texts
except ModuleNotFoundError:  # `python bench/quality.py` without the repository on sys.path
    import common  # type: ignore[no-redef]
    import recovery  # type: ignore[no-redef]
    from ood_texts import ood_texts  # type: ignore[no-redef]

from gp_lightning import __version__ as gp_version
from gp_lightning.calibration.module import token_loss_sum
from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import calibration_windows, evaluation_windows, tokenize
from gp_lightning.evaluation.offline_tasks import build_tasks
from gp_lightning.evaluation.perplexity import perplexity
from gp_lightning.evaluation.zero_shot import evaluate_tasks, reported_scores
from gp_lightning.model.layout import ModelLayout, decoder_layers, describe
from gp_lightning.model.source import load_model
from gp_lightning.pipeline import oneshot
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.greedy import select
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan


@dataclass(frozen=True)
class Ours:
    """A row pruned by the project's own pipeline from a calibrated table."""

    label: str
    method: str  # importance_method
    settings: dict[str, Any] = field(default_factory=dict)  # table transforms
    kind: str = "ours"


LAYER_LOG = {"normalization": "log", "normalization_level": "layer"}
LAYER_MINMAX = {"normalization": "minmax", "normalization_level": "layer"}
NONE = {"compensation": "none"}  # the kept weights stay the dense ones
DEFAULT = "taylor + least squares, sequential, OBS within layer, refit chosen on held-out windows (the default)"
SEARCH = "the default, allocation: search (width search, default settings)"
PIPELINE_ROWS = (
    Ours("taylor, no compensation", "taylor", NONE),
    Ours("wanda, no compensation", "wanda", NONE),
    Ours("taylor + layer log, no compensation", "taylor", {**LAYER_LOG, **NONE}),
    Ours("wanda + layer minmax, no compensation", "wanda", {**LAYER_MINMAX, **NONE}),
    Ours("taylor + bias compensation (FLAP's)", "taylor", {"compensation": "bias"}),
    Ours("taylor + least squares, one shot (dense inputs)", "taylor", {"sequential": False, "within_layer": "score"}),
    Ours("taylor + least squares, sequential", "taylor", {"within_layer": "score"}),
    Ours(DEFAULT, "taylor"),
    Ours("the default without held-out windows (the default before 2026-12-05)", "taylor", {"compensation_holdout": 0}),
    Ours("the default, within_layer: score (the table's units, not OBS's)", "taylor", {"within_layer": "score"}),
    Ours("the default, refit on 128 windows", "taylor", {"compensation_samples": 128}),
    Ours("the default, allocation: uniform_per_layer (stock class)", "taylor", {"allocation": "uniform_per_layer"}),
    Ours(SEARCH, "taylor", {"allocation": "search"}),
    Ours("wanda + layer minmax + the default compensation", "wanda", LAYER_MINMAX),
    Ours("magnitude (global)", "magnitude", NONE, kind="baseline"),
    Ours("random (global)", "random", NONE, kind="baseline"),
)


@dataclass(frozen=True)
class PeerSettings:
    """How Torch-Pruning is configured for one row."""

    label: str
    taylor: bool  # GroupTaylorImportance (gradients of the calibration loss) or group L2 magnitude
    global_pruning: bool
    keep_hidden: bool  # embeddings ignored: the hidden size (residual width) is never pruned
    round_to: int | None
    first_guess: float  # the ratio search starts at this multiple of the target (measured once; searched anyway)


TP_ROWS = (
    PeerSettings("Torch-Pruning, its LLM example (magnitude, per layer, hidden pruned)", taylor=False,
                 global_pruning=False, keep_hidden=False, round_to=4, first_guess=0.6),
    PeerSettings("Torch-Pruning, global Taylor, hidden kept", taylor=True, global_pruning=True, keep_hidden=True,
                 round_to=None, first_guess=1.65),
)


@dataclass
class Row:
    target: float
    method: str
    kind: str  # dense | ours | baseline | peer
    params: int | None
    ppl: float | None
    seconds: float
    detail: str = ""
    ood: dict[str, float] = field(default_factory=dict)  # perplexity on each out-of-domain text
    zero_shot: dict[str, float] = field(default_factory=dict)  # accuracy on each offline lm-eval task


@dataclass
class Bench:
    """What every row shares: the dense model (never modified), the windows, the results so far."""

    args: argparse.Namespace
    work: Path
    model: nn.Module
    layout: ModelLayout
    cal: torch.Tensor
    test: torch.Tensor
    dense_params: int
    ood: dict[str, torch.Tensor]  # out-of-domain windows by text name
    tokenizer: Any = None
    tasks: str | None = None  # the offline zero-shot tasks' folder (gp-lightning build-tasks), or None
    rows: list[Row] = field(default_factory=list)
    tables: dict[str, Path] = field(default_factory=dict)
    raw: dict[str, pd.DataFrame] = field(default_factory=dict)
    calibration_s: dict[str, float] = field(default_factory=dict)
    compensation_s: dict[str, float] = field(default_factory=dict)  # by row label and ratio
    search_s: dict[str, float] = field(default_factory=dict)  # the search row's, by ratio
    notes: list[str] = field(default_factory=list)
    max_load: float = 0.0

    def target_params(self, ratio: float) -> int:
        """The parameter count every method aims at: the dense count minus ``ratio`` of it (the pipeline's budget)."""
        return self.dense_params - round(ratio * self.dense_params)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    common.add_calibration_arguments(parser, num_samples=32)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5],
                        help="fractions of ALL parameters to remove")
    parser.add_argument("--eval_windows", type=int, default=64, help="first N 128-token windows of test.txt")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=common.SEED)
    common.add_threads(parser, None, "this process")
    parser.add_argument("--no_torch_pruning", action="store_true", help="skip the Torch-Pruning rows")
    parser.add_argument("--no_ood", action="store_true", help="skip the out-of-domain texts (bench/ood_texts.py)")
    parser.add_argument("--zero_shot_items", type=int, default=100,
                        help="items of each offline zero-shot task (gp-lightning build-tasks on test.txt) per row; 0: none")
    parser.add_argument("--only", default=None,
                        help="run only the pipeline rows whose label contains this text (and dense; no baselines, "
                             "no peers): for adding rows without rerunning everything")
    parser.add_argument("--tp_tolerance", type=float, default=0.01,
                        help="Torch-Pruning's parameter count must be within this fraction of ours")
    parser.add_argument("--tp_max_trials", type=int, default=5, help="Torch-Pruning ratio search: prunes per row")
    common.add_output(parser, "quality.md")
    parser.add_argument("--json", type=Path, default=None,
                        help="rows as JSON (default: --output with .json; '' to skip)")
    return parser.parse_args(argv)


def note_load(bench: Bench) -> None:
    bench.max_load = max(bench.max_load, common.loadavg()[0])


def add_row(bench: Bench, row: Row) -> None:
    bench.rows.append(row)
    note_load(bench)
    params = "-" if row.params is None else f"{row.params:,}"
    ppl = "-" if row.ppl is None else f"{row.ppl:,.2f}"
    ood = "".join(f", {name} {value:,.2f}" for name, value in row.ood.items())
    common.log(f"{row.target:.0%} {row.method}: params {params}, PPL {ppl}{ood} ({row.seconds:.0f} s) {row.detail}")


def measured(bench: Bench, target: float, method: str, kind: str, build: Callable[[], tuple[nn.Module, str]]) -> None:
    """Build a pruned model, measure it on the test windows, record the row (a failure becomes a row too)."""
    start = time.perf_counter()
    try:
        model, detail = build()
        ppl = perplexity(model, bench.test, bench.args.eval_batch_size, desc=f"PPL {method} {target:.0%}")
        ood = {name: perplexity(model, windows, bench.args.eval_batch_size, desc=f"PPL {name} {method} {target:.0%}")
               for name, windows in bench.ood.items()}
        row = Row(target, method, kind, common.count_params(model), ppl, time.perf_counter() - start, detail, ood,
                  zero_shot(bench, model))
        del model
    except Exception as exc:  # a method that cannot do it is a result, not the end of the benchmark
        traceback.print_exc()
        row = Row(target, method, kind, None, None, time.perf_counter() - start, f"failed: {type(exc).__name__}: {exc}")
    add_row(bench, row)


def zero_shot(bench: Bench, model: nn.Module) -> dict[str, float]:
    """Accuracy on the first ``--zero_shot_items`` items of each offline task (lm-eval; nothing without tasks)."""
    if bench.tasks is None:
        return {}
    summary = evaluate_tasks(model, bench.tokenizer, bench.tasks, limit=bench.args.zero_shot_items,
                             batch_size=bench.args.eval_batch_size)
    return {name: value for name, (_, value) in reported_scores(summary).items() if value is not None}


# -- ours: the pipeline ---------------------------------------------------------------------------------

def pipeline_args(bench: Bench) -> dict[str, Any]:
    a = bench.args
    return {"model": a.model, "dataset": str(common.VALID), "eval_dataset": str(common.TEST), "num_samples": a.num_samples,
            "seq_len": a.seq_len, "batch_size": a.batch_size, "seed": a.seed, "precision": "32-true",
            "eval_precision": "32-true", "overwrite": True, "test_before_prune": False}


def calibrate(bench: Bench, method: str) -> None:
    """Calibrate once per importance method (``table_only``); every ratio and setting reuses the table."""
    start = time.perf_counter()
    result = oneshot(**pipeline_args(bench), importance_method=method, table_only=True,
                     output=str(bench.work / f"table-{method}"))
    bench.tables[method] = result.run_dir / "global_group_table.csv"
    bench.raw[method] = result.table
    bench.calibration_s[method] = time.perf_counter() - start
    common.log(f"calibrated {method} in {bench.calibration_s[method]:.1f} s")


def ours(bench: Bench, variant: Ours, ratio: float) -> tuple[nn.Module, str]:
    slug = "".join(c if c.isalnum() else "-" for c in variant.label)
    result = oneshot(**pipeline_args(bench), importance_method=variant.method, from_table=str(bench.tables[variant.method]),
                     pruning_ratio=ratio, test_after_prune=False, save_model=False,
                     output=str(bench.work / f"{slug}-{ratio}"), **variant.settings)
    assert result.pruned_model is not None and result.selection is not None
    plan = result.selection.plan
    one_group = sum(1 for lp in plan.layers if len(lp.keep_groups) <= 1)
    timings = result.evaluation["timings_s"]
    seconds, searched = timings.get("compensation_s"), timings.get("search_s")
    if seconds is not None:
        bench.compensation_s[f"{variant.label} {ratio:.0%}"] = seconds
    if searched is not None:
        bench.search_s[f"{ratio:.0%}"] = searched
    refit = "" if seconds is None else f", compensation {seconds:.0f} s"
    search = "" if searched is None else f", search {searched:.0f} s"
    return result.pruned_model, f"{one_group} layers left with 1 GQA group{refit}{search}"


# -- in-project baselines built from the project's plan, selection and surgery --------------------------

def uniform_plan(layout: ModelLayout, table: pd.DataFrame, ratio: float) -> tuple[PruningPlan, str]:
    """LLM-Pruner-style allocation: every layer loses the same share of its GQA groups and the same number of
    MLP channels (the lowest Taylor importance of that layer), so that the model loses ``ratio`` of all params.

    With 3 GQA groups per layer the group share moves in thirds, so it is the third nearest to the share of
    prunable parameters the budget needs; the channel count then makes up the rest of the budget.
    """
    target = round(ratio * layout.total_params)
    share = target / layout.prunable_params
    groups = {layer.index: min(round(share * layer.num_kv_heads), layer.num_kv_heads - 1) for layer in layout.layers}
    attention = sum(groups[layer.index] * layout.attention_group_cost(layer) for layer in layout.layers)
    per_channel = sum(layout.mlp_channel_cost(layer) for layer in layout.layers)
    channels = math.ceil(max(target - attention, 0) / per_channel)
    channels = min(channels, min(layer.intermediate_size for layer in layout.layers) - 1)
    remove_groups: dict[int, set[int]] = {}
    remove_channels: dict[int, set[int]] = {}
    for layer in layout.layers:
        rows = table[table["layer_idx"] == layer.index]
        attn = rows[rows["group_type"] == "attention"].nsmallest(groups[layer.index], "importance_raw")
        mlp = rows[rows["group_type"] == "mlp"].nsmallest(channels, "importance_raw")
        remove_groups[layer.index] = set(attn["group_idx"].astype(int))
        remove_channels[layer.index] = set(mlp["group_idx"].astype(int))
    layer0 = layout.layers[0]
    detail = (f"every layer: {groups[0]}/{layer0.num_kv_heads} GQA groups, {channels}/{layer0.intermediate_size} "
              f"MLP channels ({channels / layer0.intermediate_size:.1%})")
    return PruningPlan.from_removals(layout, remove_groups, remove_channels), detail


def uniform(bench: Bench, ratio: float) -> tuple[nn.Module, str]:
    plan, detail = uniform_plan(bench.layout, bench.raw["taylor"], ratio)
    return apply_plan(bench.model, bench.layout, plan, {"base_model": bench.args.model, "bench": "uniform"}), detail


Moments = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def input_moments(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int) -> Moments:
    """Per input feature of every ``o_proj`` and ``down_proj``: mean and variance over all calibration tokens."""
    sums: dict[tuple[int, str], list[torch.Tensor]] = {}

    def hook(key: tuple[int, str]) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            acc = sums.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64) for _ in range(2)])
            acc[0] += x.sum(dim=0)
            acc[1] += x.square().sum(dim=0)
        return record

    handles = []
    for layer, module in zip(layout.layers, decoder_layers(model), strict=True):
        handles.append(module.self_attn.o_proj.register_forward_pre_hook(hook((layer.index, "attention"))))
        handles.append(module.mlp.down_proj.register_forward_pre_hook(hook((layer.index, "mlp"))))
    try:
        model.eval()
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = windows.numel()
    moments: Moments = {}
    for key, (total, squares) in sums.items():
        mean = total / tokens
        moments[key] = (mean, (squares / tokens - mean.square()).clamp(min=0.0))
    return moments


def standardize(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std()


def flap_table(model: nn.Module, layout: ModelLayout, moments: Moments) -> pd.DataFrame:
    """FLAP's fluctuation metric, standardized within each block, as a table the project's ``select`` ranks.

    MLP channel i: variance of down_proj's input feature i times ||W_down[:, i]||^2. Attention: the same per
    o_proj input feature, standardized over the layer's features, then averaged over each GQA group's features
    (all query heads of the group). ``score`` is the standardized metric itself, not per parameter: FLAP ranks
    units by it and counts their cost only against the budget, which is what ``select`` does with ``cost``.
    """
    parts = []
    for layer, module in zip(layout.layers, decoder_layers(model), strict=True):
        for kind, proj, units, cost in (
            ("attention", module.self_attn.o_proj, layer.num_kv_heads, layout.attention_group_cost(layer)),
            ("mlp", module.mlp.down_proj, layer.intermediate_size, layout.mlp_channel_cost(layer)),
        ):
            metric = moments[(layer.index, kind)][1] * proj.weight.detach().double().square().sum(dim=0)
            score = standardize(metric).view(units, -1).mean(dim=1)
            parts.append(pd.DataFrame({
                "layer_idx": layer.index, "group_type": kind, "group_idx": range(units), "cost": cost,
                "importance_raw": metric.view(units, -1).sum(dim=1).numpy(), "importance": score.numpy(),
                "score": score.numpy(),
            }))
    return pd.concat(parts, ignore_index=True)


@torch.no_grad()
def compensate_bias(pruned: nn.Module, dense: nn.Module, layout: ModelLayout, plan: PruningPlan,
                    moments: Moments) -> None:
    """FLAP's bias compensation: each removed input feature j of o_proj/down_proj is replaced by its mean over
    the calibration tokens, folded into a new output bias ``W[:, removed] @ mean[removed]``."""
    for layer, lp, before, after in zip(layout.layers, plan.layers, decoder_layers(dense), decoder_layers(pruned),
                                        strict=True):
        width = layer.queries_per_kv * layer.head_dim
        kept_features = [g * width + i for g in lp.keep_groups for i in range(width)]
        for kind, dense_proj, owner, name, kept, features in (
            ("attention", before.self_attn.o_proj, after.self_attn, "o_proj", kept_features, layer.num_kv_heads * width),
            ("mlp", before.mlp.down_proj, after.mlp, "down_proj", lp.keep_channels, layer.intermediate_size),
        ):
            removed = sorted(set(range(features)) - set(kept))
            if not removed or owner is None:
                continue
            index = torch.tensor(removed, dtype=torch.long)
            mean = moments[(layer.index, kind)][0]
            bias = dense_proj.weight.double().index_select(1, index) @ mean.index_select(0, index)
            old = getattr(owner, name)
            new = nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
            new.weight.copy_(old.weight)
            new.bias.copy_(bias.to(old.weight.dtype) + (old.bias if old.bias is not None else 0))
            setattr(owner, name, new)


def flap(bench: Bench, moments: Moments, ratio: float) -> tuple[nn.Module, str]:
    table = flap_table(bench.model, bench.layout, moments)
    selection = select(table, bench.layout, SelectionConfig(pruning_ratio=ratio, min_attention_groups=1, min_mlp_channels=1))
    pruned = apply_plan(bench.model, bench.layout, selection.plan, {"base_model": bench.args.model, "bench": "flap"})
    compensate_bias(pruned, bench.model, bench.layout, selection.plan, moments)
    attn = sum(len(lp.keep_groups) for lp in selection.plan.layers)
    return pruned, f"{attn}/{sum(la.num_kv_heads for la in bench.layout.layers)} GQA groups kept"


# -- peer: Torch-Pruning ---------------------------------------------------------------------------------

def tp_base(bench: Bench) -> nn.Module:
    """A copy of the dense model Torch-Pruning can trace, holding the gradient of the mean calibration token loss.

    Its dependency walk does not end while the KV cache is on, and it fails on a reshape under sdpa attention;
    eager attention computes the same function.
    """
    model = copy.deepcopy(bench.model)
    model.config.use_cache = False
    model.config._attn_implementation = "eager"
    model.eval()
    model.zero_grad(set_to_none=True)
    total = bench.cal[:, 1:].numel()
    for batch in bench.cal.split(bench.args.batch_size):
        (token_loss_sum(model, batch) / total).backward()
    return model


def tp_prune(base: nn.Module, settings: PeerSettings, ratio: float, example: torch.Tensor) -> nn.Module:
    """Prune a copy of ``base`` with Torch-Pruning at its ``ratio`` (its channel ratio and its head ratio, as its
    LLM example sets both), then update what HF attention reads from its attributes."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    for mine, theirs in zip(model.parameters(), base.parameters(), strict=True):
        mine.grad = None if theirs.grad is None or not settings.taylor else theirs.grad.clone()
    heads: dict[nn.Module, int] = {}
    for layer in decoder_layers(model):
        attn = layer.self_attn
        heads[attn.q_proj] = attn.q_proj.out_features // attn.head_dim
        heads[attn.k_proj] = attn.k_proj.out_features // attn.head_dim
        heads[attn.v_proj] = attn.v_proj.out_features // attn.head_dim
    importance = (tp.importance.GroupTaylorImportance() if settings.taylor
                  else tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"))
    ignored: list[nn.Module] = [model.lm_head]
    if settings.keep_hidden:
        ignored.append(model.get_input_embeddings())
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example, importance=importance, global_pruning=settings.global_pruning,
        pruning_ratio=ratio, ignored_layers=ignored, num_heads=heads, prune_num_heads=True,
        prune_head_dims=False,  # head dims would have to be pruned inside RoPE too
        head_pruning_ratio=ratio, round_to=settings.round_to,
    )
    pruner.step()
    del pruner
    model.zero_grad(set_to_none=True)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        q, kv = attn.q_proj.out_features, attn.k_proj.out_features
        if q % kv or kv != attn.v_proj.out_features or q != attn.o_proj.in_features:
            raise RuntimeError(f"Torch-Pruning left attention shapes HF cannot run: q {q}, k {kv}, "
                               f"v {attn.v_proj.out_features}, o_proj in {attn.o_proj.in_features}")
        attn.num_key_value_groups = q // kv
    embedding = model.get_input_embeddings()
    model.config.hidden_size = embedding.embedding_dim
    if base.lm_head.weight is base.get_input_embeddings().weight and model.lm_head.weight is not embedding.weight:
        # pruning the hidden size slices the tied tensor twice (as embedding rows and as lm_head columns), which
        # leaves two equal copies; tie them again, as save_pretrained + from_pretrained would
        if not torch.equal(model.lm_head.weight, embedding.weight):
            raise RuntimeError("Torch-Pruning pruned the tied embedding and lm_head differently")
        model.lm_head.weight = embedding.weight
    return model


def tp_shape(model: nn.Module) -> str:
    layers = list(decoder_layers(model))
    q = sorted({la.self_attn.q_proj.out_features // la.self_attn.head_dim for la in layers})
    kv = sorted({la.self_attn.k_proj.out_features // la.self_attn.head_dim for la in layers})
    mlp = [la.mlp.gate_proj.out_features for la in layers]
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    return (f"hidden {model.get_input_embeddings().embedding_dim}, query heads/layer {q}, KV heads/layer {kv}, "
            f"MLP channels {min(mlp)}-{max(mlp)}, embeddings {'tied' if tied else 'UNTIED (two copies)'}")


def tp_matched(bench: Bench, base: nn.Module, settings: PeerSettings, ratio: float,
               found: dict[str, tuple[float, int]]) -> tuple[nn.Module, str]:
    """Search Torch-Pruning's ratio until its parameter count is within ``tp_tolerance`` of ours.

    The count is a step function of the ratio (whole channels, heads, rounding) and need not be monotone, so
    the search keeps a bracket (regula falsi, with bisection when it stalls) and returns the closest model. The
    first guess scales the ratio found for the previous target (``found``: ratio, parameters removed) by the
    parameters to remove.
    """
    target = bench.target_params(ratio)
    wanted = bench.dense_params - target
    tolerance = bench.args.tp_tolerance * target
    example = bench.cal[:1]
    r = min(ratio * settings.first_guess, 0.95)
    if settings.label in found:
        previous, removed = found[settings.label]
        r = min(previous * wanted / removed, 0.95)
    best: tuple[int, float, nn.Module, int] | None = None
    above: tuple[float, int] | None = None  # a ratio that left too many parameters
    below: tuple[float, int] | None = None  # one that left too few
    trials: list[str] = []
    for _ in range(bench.args.tp_max_trials):
        model = tp_prune(base, settings, r, example)
        params = common.count_params(model)
        trials.append(f"{r:.4f}->{params / 1e6:.2f}M")
        common.log(f"  Torch-Pruning ratio {r:.4f}: {params:,} params (target {target:,})")
        if best is None or abs(params - target) < best[0]:
            best = (abs(params - target), r, model, params)
        del model
        if abs(params - target) <= tolerance:
            break
        if params > target:
            above = (r, params) if above is None or r > above[0] else above
        else:
            below = (r, params) if below is None or r < below[0] else below
        if above is not None and below is not None:
            (r1, p1), (r2, p2) = above, below
            guess = r1 + (p1 - target) * (r2 - r1) / (p1 - p2)
            middle = (r1 + r2) / 2
            r = guess if min(r1, r2) + 0.1 * abs(r2 - r1) < guess < max(r1, r2) - 0.1 * abs(r2 - r1) else middle
        else:
            removed = bench.dense_params - params
            r = min(max(r * wanted / removed, 1e-3) if removed > 0 else 2 * r, 0.95)
    assert best is not None
    found[settings.label] = (best[1], bench.dense_params - best[3])
    model = best[2]
    return model, f"TP ratio {best[1]:.4f} ({len(trials)} prunes: {', '.join(trials)}); {tp_shape(model)}"


# -- report -----------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    found = {"gp-lightning": gp_version, "python": sys.version.split()[0]}
    for package in ("torch", "transformers", "torch-pruning"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def report(bench: Bench, wall_s: float, loads: tuple[float, float], started: str) -> str:
    a = bench.args
    dense = next(row for row in bench.rows if row.kind == "dense")
    assert dense.ppl is not None
    v = versions()
    lines = [
        "# Pruning quality at equal size: SmolLM2-135M",
        "",
        f"Command: `{common.command_line(__file__, a.argv)}` (run from the repository root). Date: {started}. "
        f"Wall time: {wall_s / 60:.1f} min for the whole script. Load average (1 min) at start {loads[0]:.2f}, "
        f"highest seen {bench.max_load:.2f}, at end {loads[1]:.2f} on {os.cpu_count()} CPU cores "
        "(the cores were shared with other jobs, so wall times may be inflated; quality numbers are not affected).",
        "",
        f"Settings: model `{a.model}` ({bench.dense_params:,} parameters, float32, CPU, {torch.get_num_threads()} "
        f"torch threads). Calibration: "
        f"{a.num_samples} windows x {a.seq_len} tokens of wikitext-2 `valid.txt`, seed {a.seed}, batch size "
        f"{a.batch_size}, the same windows for every method that calibrates. Perplexity: the first "
        f"{bench.test.shape[0]} non-overlapping windows of {bench.test.shape[1]} tokens of wikitext-2 `test.txt` "
        f"({bench.test.numel():,} tokens, tokenized once, the same for every row). Ratio = achieved fraction of "
        "ALL parameters removed (embeddings count in the total; a tied embedding counts once).",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Calibration time per table (s): " + ", ".join(f"{m} {s:.0f}" for m, s in bench.calibration_s.items()) + ".",
        "",
        compensation_cost(bench),
        "",
        *table_lines(bench, dense),
    ]
    lines += ["", "Per row (what was pruned, how long pruning + evaluation took):", ""]
    for row in bench.rows:
        if row.kind != "dense":
            lines.append(f"- {row.target:.0%} {row.method}: {row.seconds:.0f} s; {row.detail}")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in bench.notes] + [""]
    saved = recovery.saved_section()  # bench/recovery.py's rows, kept in the one table
    return "\n".join(lines + ([saved] if saved else []))


def table_lines(bench: Bench, dense: Row) -> list[str]:
    """The results table: in domain (PPL and its ratio to dense), then each out-of-domain text (PPL, x dense)."""
    names, tasks = list(dense.ood), list(dense.zero_shot)
    lines = ["| target | method | kind | params | ratio | PPL | PPL / dense |" + "".join(f" {n} (x dense) |" for n in names)
             + "".join(f" {t} acc |" for t in tasks),
             "|---:|---|---|---:|---:|---:|---:|" + "---:|" * (len(names) + len(tasks))]
    for row in sorted(bench.rows, key=lambda r: r.target):  # dense first, then by ratio, in the order run
        if row.params is None or row.ppl is None or dense.ppl is None:
            lines.append(f"| {row.target:.0%} | {row.method} | {row.kind} | - | - | failed | - |"
                         + " - |" * (len(names) + len(tasks)))
            continue
        achieved = 1 - row.params / bench.dense_params
        ood = "".join(f" {row.ood[n]:,.2f} ({row.ood[n] / dense.ood[n]:,.2f}) |" if n in row.ood else " - |"
                      for n in names)
        accuracy = "".join(f" {row.zero_shot[t]:.1%} |" if t in row.zero_shot else " - |" for t in tasks)
        lines.append(f"| {row.target:.0%} | {row.method} | {row.kind} | {row.params:,} | {achieved:.2%} | "
                     f"{row.ppl:,.2f} | {row.ppl / dense.ppl:,.2f} |{ood}{accuracy}")
    return lines


def compensation_cost(bench: Bench) -> str:
    """The default compensation's and the search's time against the Taylor calibration's (same windows and process)."""
    calibration = bench.calibration_s.get("taylor")
    seconds = {key: value for key, value in bench.compensation_s.items() if key.startswith(DEFAULT)}
    if not calibration:
        return "Compensation time: no Taylor calibration was run."
    parts = [f"{key.removeprefix(DEFAULT).strip()} {value:.0f} s ({value / calibration:.2f}x)"
             for key, value in seconds.items()]
    searched = [f"{ratio} {value:.0f} s ({value / calibration:.2f}x)" for ratio, value in bench.search_s.items()]
    return (f"Against the Taylor calibration's {calibration:.0f} s on the same 32 windows: compensation of the "
            f"default (least squares, sequential, OBS, held-out choice) {', '.join(parts) or 'not run'}; search of "
            f"`{SEARCH}` (before its compensation) {', '.join(searched) or 'not run'}.")


NOTES = [
    "ours: `oneshot(table_only=True)` calibrates once per importance method; every ratio and table setting is "
    "then a `from_table` run of the same pipeline (selection, compensation, surgery) on the same windows, with "
    "the default selection constraints "
    "(every layer keeps at least 1 GQA group and 1 MLP channel). `layer log` = `normalization: log, "
    "normalization_level: layer`; `layer minmax` likewise. Plain global wanda without normalization "
    "collapses at every ratio (earlier measurements traced it to the early layers, whose wanda scores are smaller "
    "in scale, being emptied first).",
    "uniform (LLM-Pruner style): from the same Taylor table, each layer loses its lowest-importance units; with 3 "
    "GQA groups per layer the attention share can only move in thirds, so it is the third nearest the budget's "
    "share and the MLP channel count (the same in every layer) makes up the rest. LLM-Pruner itself also leaves "
    "the first and last layers alone and prunes within a layer range; not done here.",
    "FLAP-style: fluctuation metric (variance of the input feature over the calibration tokens x squared norm of "
    "its weight column) on o_proj and down_proj inputs of the dense model, standardized within each block "
    "(attention of a layer over its o_proj features, then averaged per GQA group; MLP of a layer over its "
    "channels), ranked globally by the standardized value, budget counted in parameters by the project's "
    "`select`; removed features are replaced by their calibration mean folded into a new o_proj/down_proj bias "
    "(FLAP's bias compensation, adding 576 parameters per compensated projection).",
    "magnitude / random: the project's data-free baselines through the same global pipeline "
    "(sum |w| per unit; random scores uniform per parameter, seeded).",
    "Table settings tried before choosing the rows (outside this script: 32 calibration windows, first 32 test "
    "windows, 35% removed): taylor 204, + layer log 219, + layer minmax 234, + layer zscore 245, + "
    "clip_percentile_high 99 + layer log 32,679; wanda + layer minmax 638, wanda + layer log 10,978. At 20% "
    "(16 windows, 64 test windows) layer log had been best for taylor (105.5 vs 116.7) and block-level "
    "normalization destructive (39,874). taylor_2nd + layer log gave the taylor + layer log model to 0.1% "
    "(the second-order term is tiny), so it is not a row; plain taylor_2nd gave the plain taylor model to the "
    "digit at 20/35/50% (112.52 / 223.23 / 676.61) in the run before compensation, so it is no longer a row either.",
    "compensation (`compensation`, `sequential`, `within_layer`, `compensation_samples`; "
    "`analysis/compensation.json` of each run has the relative output error of every refit projection): "
    "`one shot` refits every o_proj/down_proj on the dense model's inputs; `sequential` walks the layers in order "
    "through the already pruned and refit ones; `OBS within layer` keeps the table's per-block counts and lets "
    "the refit's structured OBS error choose which units go. The added output biases count in `params`.",
]

TP_NOTES = [
    "Torch-Pruning: traced with `use_cache=False` (otherwise its dependency walk does not end) and eager attention "
    "(under sdpa it fails on a reshape); after pruning each attention's `num_key_value_groups` is set from the "
    "pruned q/k widths (HF's eager attention reads it to repeat the KV heads) and `config.hidden_size` from the "
    "embedding width. Pruning the hidden size slices the tied embedding/lm_head tensor twice and leaves two "
    "equal copies (134.5M would count 28.3M twice); they are tied again before counting, as saving and reloading "
    "would. Its ratio is searched (regula falsi on its `pruning_ratio`, which it also uses as "
    "`head_pruning_ratio`, as its LLM example does) until its parameter count is within 1% of ours; exact "
    "counts are in the table.",
    "Torch-Pruning cannot remove a GQA group: with GQA it removes query heads only (`prune_num_heads`), the same "
    "number per KV head, and leaves k_proj/v_proj whole. With per-layer (local) ratios it removes one query head "
    "per KV group up to ratio 1/3; above that it wants two per KV group, which would leave as many query as KV "
    "heads, its GQA check then no longer clears the k/v part of the group, and the whole attention group is "
    "silently skipped. With `global_pruning=True` it never removes heads: its global head budget counts 3 heads "
    "per layer (the KV heads) but ranks 9 query-head scores per layer, so it asks for more heads than it allows "
    "and every attention group is refused. Its global rows therefore prune MLP channels only.",
    "'its LLM example' follows Torch-Pruning's examples/LLMs/prune_llm.py settings: group L2 magnitude "
    "importance, per-layer ratios, lm_head ignored, heads pruned, head dims kept, round_to 4, and the hidden size "
    "pruned with the same ratio (as users get it by default). 'global Taylor, hidden kept' ignores the "
    "embedding (so the residual width, norms and lm_head keep 576), uses `GroupTaylorImportance` (default mean "
    "normalization per group) on the gradient of the mean token loss over the same calibration windows, and ranks "
    "all channels globally.",
]


def quiet() -> None:
    """Lightning's info lines and known-harmless warnings would drown the progress of some 35 evaluations."""
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def load_inputs(args: argparse.Namespace
                ) -> tuple[nn.Module, Any, ModelLayout, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The dense model, its layout, the calibration windows, the test windows and the out-of-domain windows (the
    first ``eval_windows`` of each text of ``bench/ood_texts.py``): the same for every row."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    model.eval()
    cal = calibration_windows(tokenize(load_text(str(common.VALID), "calibration"), tokenizer), args.num_samples,
                              args.seq_len, args.seed)
    test = evaluation_windows(tokenize(load_text(str(common.TEST), "evaluation"), tokenizer), 128, args.eval_windows)
    ood = {name: evaluation_windows(tokenize(load_text(str(path), "evaluation"), tokenizer), 128, args.eval_windows)
           for name, path in ({} if args.no_ood else ood_texts()).items()}
    return model, tokenizer, describe(model), cal, test, ood


def project_rows(bench: Bench) -> None:
    """Dense, ours (one calibration per importance method), uniform and FLAP-style rows."""
    ratios = bench.args.ratios
    measured(bench, 0.0, "dense", "dense", lambda: (bench.model, ""))
    rows = [v for v in PIPELINE_ROWS if bench.args.only is None or bench.args.only in v.label]
    for method in dict.fromkeys(variant.method for variant in rows):
        calibrate(bench, method)
    for variant in rows:
        for ratio in ratios:
            measured(bench, ratio, variant.label, variant.kind, lambda v=variant, r=ratio: ours(bench, v, r))
    if bench.args.only is not None:
        bench.notes.append(f"Only the pipeline rows containing '{bench.args.only}' were run (--only).")
        return
    for ratio in ratios:
        measured(bench, ratio, "uniform per layer (Taylor, LLM-Pruner style)", "baseline",
                 lambda r=ratio: uniform(bench, r))
    moments_start = time.perf_counter()
    moments = input_moments(bench.model, bench.layout, bench.cal, bench.args.batch_size)
    bench.calibration_s["flap (forward)"] = time.perf_counter() - moments_start
    for ratio in ratios:
        measured(bench, ratio, "FLAP-style (fluctuation, block-standardized, bias comp.)", "baseline",
                 lambda r=ratio, m=moments: flap(bench, m, r))


def peer_rows(bench: Bench) -> None:
    """Torch-Pruning's rows, or a note saying why there are none."""
    if bench.args.no_torch_pruning:
        bench.notes.append("Torch-Pruning rows skipped (--no_torch_pruning).")
        return
    if versions()["torch-pruning"] == "not installed":
        bench.notes.append("Torch-Pruning rows skipped: not installed (`pip install -e .[bench]`).")
        return
    bench.notes += TP_NOTES
    grads_start = time.perf_counter()
    base = tp_base(bench)
    bench.calibration_s["torch-pruning gradients"] = time.perf_counter() - grads_start
    found: dict[str, tuple[float, int]] = {}
    for settings in TP_ROWS:
        for ratio in bench.args.ratios:
            measured(bench, ratio, settings.label, "peer", lambda s=settings, r=ratio: tp_matched(bench, base, s, r, found))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = argv
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    start, load_start = time.perf_counter(), common.loadavg()[0]
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, layout, cal, test, ood = load_inputs(args)
    with tempfile.TemporaryDirectory(prefix="gp-quality-") as work:
        tasks = None
        if args.zero_shot_items:
            build_tasks(common.TEST, Path(work) / "tasks")
            tasks = str(Path(work) / "tasks")
        bench = Bench(args, Path(work), model, layout, cal, test, common.count_params(model), ood, tokenizer, tasks,
                      notes=list(NOTES))
        project_rows(bench)
        if args.only is None:
            peer_rows(bench)
    wall = time.perf_counter() - start
    note_load(bench)
    text = report(bench, wall, (load_start, common.loadavg()[0]), started)
    data = {"command": common.command_line(__file__, argv), "date": started, "wall_s": wall,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "versions": versions(), "dense_params": bench.dense_params, "calibration_s": bench.calibration_s,
            "rows": [asdict(row) for row in bench.rows]}
    json_path = args.output.with_suffix(".json") if args.json is None else args.json
    json_path = json_path if str(json_path) not in ("", ".") else None  # Path("") is Path(".")
    common.publish(text, args.output, data, json_path)
    common.log(f"done in {wall / 60:.1f} min: {args.output}")


if __name__ == "__main__":
    main()
