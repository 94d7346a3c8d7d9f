"""The typed fine-tuning config: fields are YAML keys and ``train.py`` flags at once.

Keys that mean the same thing as in :class:`gp_lightning.config.PruneConfig` have the same names
(``dataset``, ``eval_dataset``, ``seq_len``, ``output``, ``overwrite``, ``precision``, ``strategy``,
...), so ``prune.py --finetune`` hands its own values on and a user learns one vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from gp_lightning.runtime.console import LogLevel
from gp_lightning.runtime.errors import check_config as _check
from gp_lightning.runtime.launch import StrategyName

FinetuneMethod = Literal["lora", "full"]
DataFormat = Literal["auto", "text", "instruction"]
PromptFormat = Literal["auto", "chat", "plain"]
Scheduler = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "bf16-mixed", "bf16-true", "32-true"]

#: The projections of a Llama-style layer; LoRA goes on those that survived pruning.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Spellings of the recovery guides (LLM-Pruner's post-training script, peft examples).
FINETUNE_FLAG_ALIASES: dict[str, str] = {
    "--base_model": "--model",
    "--model_name_or_path": "--model",
    "--prune_model": "--model",
    "--output_dir": "--output",
    "--data_path": "--dataset",
    "--lr": "--learning_rate",
    "--epochs": "--num_epochs",
    "--micro_batch_size": "--batch_size",
    "--lora_target_module": "--lora_target_modules",
}

#: Keys whose meaning is shared with the prune config (``prune.py --finetune`` passes them on).
SHARED_WITH_PRUNE = (
    "tokenizer", "trust_remote_code", "dataset", "seq_len", "eval_dataset", "eval_seq_len", "eval_max_windows",
    "eval_batch_size", "precision", "eval_precision", "accelerator", "strategy", "devices", "num_nodes", "seed",
    "cache_dir", "activation_checkpointing", "log_level",
)


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning of a (pruned) model with LoRA or full fine-tuning.

    Attributes:
        model: Model to fine-tune: a pruned checkpoint (``runs/x/model``), any local Hugging Face
            directory, a hub id, ``smollm2-135m`` or a ``.gguf`` file.
        tokenizer: Tokenizer source when it differs from ``model``.
        trust_remote_code: Passed to ``from_pretrained`` for hub models that need it.
        output: Run directory: merged model (or adapter), logs, loss curve, evaluation results.
        overwrite: Replace the results of an earlier run in ``output``.
        finetune_method: ``lora`` (peft adapters on the surviving projections; the base weights are
            frozen, then merged back) or ``full`` (every parameter is trained).
        dataset: Training data: ``wikitext2``, ``c4`` (hub), a local ``.txt``/``.parquet`` of plain
            text, or a ``.jsonl`` of either ``{"text": ...}`` or alpaca-style
            ``{"instruction", "input", "output"}`` records.
        data_format: ``text`` (causal-LM loss on every token of fixed windows), ``instruction``
            (prompt + response, loss on the response tokens only) or ``auto`` (instruction when the
            jsonl records have ``instruction`` and ``output``).
        prompt_format: Instruction data only. ``chat``: the tokenizer's chat template (user turn =
            instruction + input, assistant turn = output); ``plain``: "Instruction:/Input:/Response:"
            sections; ``auto``: chat when the tokenizer has a template.
        finetune_samples: Training examples (text windows or instruction records) per epoch, chosen
            with ``seed`` (None: all that the data holds after the validation ones).
        val_samples: Examples of the training data held out for validation loss: it picks the best
            epoch. They never overlap the training examples.
        seq_len: Tokens per training window (text) or maximum tokens per example (instruction).
        batch_size: Examples per optimizer micro-step on each process.
        gradient_accumulation_steps: Micro-steps per optimizer step.
        num_epochs: Passes over the training examples.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear warm-up from 0 to ``learning_rate``.
        lr_scheduler: Decay after warm-up: ``linear`` or ``cosine`` to 0 at the last step, or ``constant``.
        max_grad_norm: Gradient clipping by norm (0: off).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Projection names that get adapters, where they still exist (a block
            removed by depth pruning has none).
        eval_dataset: Held-out perplexity text (never the training text), same forms as ``dataset``.
        eval_seq_len: Tokens per non-overlapping perplexity window.
        eval_max_windows: Evaluate on the first N windows only (None: the whole text).
        eval_batch_size: Windows per evaluation forward pass.
        test_before_finetune: Measure held-out perplexity before training.
        test_after_finetune: Measure held-out perplexity after training (best epoch, merged).
        save_model: Write the merged model (LoRA folded into the weights) into ``output/model``,
            in the input's checkpoint format (a pruned model stays a pruned checkpoint).
        save_adapter_only: LoRA only: write just the adapter (``output/adapter``, peft format) instead
            of the merged model.
        log_every_n_steps: Optimizer steps between logged training-loss points.
        precision: Training numerics: ``auto`` (bf16-mixed where the hardware computes bf16
            natively, else float32), ``bf16-mixed``, ``bf16-true`` or ``32-true``.
        eval_precision: Numerics of perplexity evaluation (same choices).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        strategy: ``auto`` (one process, or DDP when a launcher started several), ``ddp``, ``fsdp``
            (FSDP2 per decoder layer), or ``deepspeed`` (ZeRO-3 through Lightning; GPUs only).
        devices: Processes per node (``auto``: what the launcher started, else 1).
        num_nodes: Number of nodes.
        activation_checkpointing: Recompute each decoder layer's activations in backward (less
            memory, about a third more compute).
        seed: Seed for data selection, shuffling and adapter initialization.
        log_level: Console detail: ``info`` (progress bars, gp-lightning's log lines, real warnings),
            ``debug`` (also every line other libraries print; ``-v``), ``warning`` or ``error``.
        cache_dir: Where the embedded model is cached.
    """

    model: str = "runs/prune/model"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    output: str = "runs/finetune"
    overwrite: bool = False
    finetune_method: FinetuneMethod = "lora"
    dataset: str = "wikitext2"
    data_format: DataFormat = "auto"
    prompt_format: PromptFormat = "auto"
    finetune_samples: int | None = 256
    val_samples: int = 16
    seq_len: int = 128
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: Scheduler = "linear"
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    eval_dataset: str = "wikitext2"
    eval_seq_len: int = 128
    eval_max_windows: int | None = None
    eval_batch_size: int = 8
    test_before_finetune: bool = True
    test_after_finetune: bool = True
    save_model: bool = True
    save_adapter_only: bool = False
    log_every_n_steps: int = 5
    precision: Precision = "auto"
    eval_precision: Precision = "auto"
    accelerator: str = "auto"
    strategy: StrategyName = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = 1
    activation_checkpointing: bool = False
    seed: int = 42
    cache_dir: str | None = None
    log_level: LogLevel = "info"

    def __post_init__(self) -> None:
        for key in ("batch_size", "gradient_accumulation_steps", "num_epochs", "eval_batch_size", "lora_r",
                    "lora_alpha", "log_every_n_steps", "num_nodes", "val_samples"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        for key in ("seq_len", "eval_seq_len"):
            _check(getattr(self, key) >= 2, key, getattr(self, key), "must be at least 2 tokens")
        if self.finetune_samples is not None:
            _check(self.finetune_samples >= 1, "finetune_samples", self.finetune_samples,
                   "must be at least 1, or null for all the data")
        if self.eval_max_windows is not None:
            _check(self.eval_max_windows >= 1, "eval_max_windows", self.eval_max_windows,
                   "must be at least 1, or null for the whole text")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive (e.g. 1e-4 for LoRA)")
        for key in ("weight_decay", "warmup_steps", "max_grad_norm"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(bool(self.lora_target_modules), "lora_target_modules", self.lora_target_modules,
               f"must name at least one projection (e.g. {list(DEFAULT_LORA_TARGETS)})")
        _check(not (self.save_adapter_only and self.finetune_method == "full"), "save_adapter_only",
               self.save_adapter_only, "needs finetune_method: lora (full fine-tuning has no adapter)")
        _check(self.devices == "auto" or int(self.devices) >= 1, "devices", self.devices, "must be at least 1, or auto")
        _check(bool(self.model), "model", self.model, "must name a model")
        _check(bool(self.output), "output", self.output, "must name a run directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

