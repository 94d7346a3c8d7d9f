"""The typed fine-tuning config, made of argument groups; every key is a YAML key and a ``train.py`` flag.

Keys that mean the same thing as in :class:`gp_lightning.config.PruneConfig` have the same names and
come from the same groups (model, numerics and processes, run directory), so ``prune.py --finetune``
hands its own values on and a user learns one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gp_lightning.data.config import TextConfig
from gp_lightning.data.mixture import is_mixture
from gp_lightning.evaluation.config import EvaluationWindows
from gp_lightning.model.config import ModelConfig
from gp_lightning.runtime.config import DistributedConfig, GroupedConfig, RunConfig, grouped
from gp_lightning.runtime.errors import check_config

FinetuneMethod = Literal["lora", "full"]
DataFormat = Literal["auto", "text", "instruction"]
PromptFormat = Literal["auto", "chat", "plain"]
Scheduler = Literal["linear", "cosine", "constant"]
FinetuneLoss = Literal["lm", "kd", "kd+lm"]

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
    "cache_dir", "activation_checkpointing", "log_level", "eval_tasks", "eval_num_fewshot", "eval_limit",
)


@dataclass
class FinetuneModelConfig(ModelConfig):
    """Model"""

    model: str = "runs/prune/model"  # the prune run's default output
    """Model to fine-tune: a pruned checkpoint (``runs/x/model``), any local Hugging Face directory, a hub id,
    ``smollm2-135m`` or a ``.gguf`` file."""


@dataclass
class FinetuneDataConfig(TextConfig):
    """Training data"""

    data_format: DataFormat = "auto"
    """``text`` (causal-LM loss on every token of fixed windows), ``instruction`` (prompt + response, loss on
    the response tokens only) or ``auto`` (instruction when the records have ``instruction`` and
    ``output``)."""
    prompt_format: PromptFormat = "auto"
    """Instruction data only. ``chat``: the tokenizer's chat template (user turn = instruction + input,
    assistant turn = output); ``plain``: "Instruction:/Input:/Response:" sections; ``auto``: chat when the
    tokenizer has a template."""
    finetune_samples: int | None = 256
    """Training examples (text windows or instruction records) per epoch, chosen with ``seed`` (null: all
    that the data holds after the validation ones)."""
    val_samples: int = 16
    """Examples of the training data held out for validation loss: it picks the best epoch. They never
    overlap the training examples."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self.val_samples >= 1, "val_samples", self.val_samples, "must be at least 1")
        check_config(not is_mixture(self.dataset), "dataset", self.dataset,
                     "is a list of sources, and fine-tuning reads one: pass one file or hub name (prune.py "
                     "--finetune: set fine-tuning's own dataset in --finetune_config)")
        if self.finetune_samples is not None:
            check_config(self.finetune_samples >= 1, "finetune_samples", self.finetune_samples,
                         "must be at least 1, or null for all the data")


@dataclass
class TrainingConfig:
    """Optimization"""

    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    num_epochs: int = 1
    """Passes over the training examples."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``learning_rate``."""
    lr_scheduler: Scheduler = "linear"
    """Decay after warm-up: ``linear`` or ``cosine`` to 0 at the last step, or ``constant``."""
    max_grad_norm: float = 1.0
    """Gradient clipping by norm (0: off)."""
    log_every_n_steps: int = 5
    """Optimizer steps between logged training-loss points."""

    def __post_init__(self) -> None:
        for key in ("gradient_accumulation_steps", "num_epochs", "log_every_n_steps"):
            check_config(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        check_config(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive (e.g. 1e-4 for LoRA)")
        for key in ("weight_decay", "warmup_steps", "max_grad_norm"):
            check_config(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")


@dataclass
class AdapterConfig:
    """What is trained"""

    finetune_method: FinetuneMethod = "lora"
    """``lora`` (peft adapters on the surviving projections; the base weights are frozen, then merged back)
    or ``full`` (every parameter is trained)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Projection names that get adapters, where they still exist (a block removed by depth pruning has
    none)."""

    def __post_init__(self) -> None:
        for key in ("lora_r", "lora_alpha"):
            check_config(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        check_config(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        check_config(bool(self.lora_target_modules), "lora_target_modules", self.lora_target_modules,
                     f"must name at least one projection (e.g. {list(DEFAULT_LORA_TARGETS)})")


@dataclass
class DistillationConfig:
    """Distillation from the dense model"""

    finetune_loss: FinetuneLoss = "lm"
    """``lm``: next-token cross-entropy on the data. ``kd``: KL divergence to the ``teacher``'s next-token
    distribution (logits computed on the fly, under no_grad, in ``eval_precision``). ``kd+lm``: ``kd_alpha *
    kd + (1 - kd_alpha) * lm``. The validation loss that picks the best epoch is always the ``lm`` loss."""
    teacher: str | None = None
    """The model to distil from (``kd``, ``kd+lm``): the dense model the student was pruned from, with the same
    tokenizer (``prune.py --finetune`` sets it to its ``model``)."""
    kd_temperature: float = 1.0
    """Softmax temperature of both distributions (the KL is scaled by its square)."""
    kd_alpha: float = 0.5
    """Weight of the KD term in ``kd+lm``."""

    def __post_init__(self) -> None:
        check_config(self.kd_temperature > 0, "kd_temperature", self.kd_temperature, "must be positive (1 is plain KD)")
        check_config(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", self.kd_alpha, "must be in [0, 1]")
        check_config(self.finetune_loss == "lm" or bool(self.teacher), "teacher", self.teacher,
                     f"must name the dense model to distil from with finetune_loss: {self.finetune_loss}")


@dataclass
class FinetuneEvaluationConfig(EvaluationWindows):
    """Held-out perplexity and zero-shot accuracy"""

    test_before_finetune: bool = True
    """Measure held-out perplexity before training."""
    test_after_finetune: bool = True
    """Measure held-out perplexity after training (best epoch, merged)."""


@dataclass
class FinetuneOutputConfig(RunConfig):
    """Run directory, seed and console"""

    output: str = "runs/finetune"  # a fine-tune's own default run directory
    """Run directory: merged model (or adapter), logs, loss curve, evaluation results."""
    save_model: bool = True
    """Write the merged model (LoRA folded into the weights) into ``output/model``, in the input's checkpoint
    format (a pruned model stays a pruned checkpoint)."""
    save_adapter_only: bool = False
    """LoRA only: write just the adapter (``output/adapter``, peft format) instead of the merged model."""


@grouped
class FinetuneConfig(GroupedConfig):
    """Recovery fine-tuning of a (pruned) model with LoRA or full fine-tuning."""

    source: FinetuneModelConfig
    data: FinetuneDataConfig
    training: TrainingConfig
    distillation: DistillationConfig
    adapter: AdapterConfig
    evaluation: FinetuneEvaluationConfig
    run: FinetuneOutputConfig
    distributed: DistributedConfig

    def __post_init__(self) -> None:
        check_config(not (self.run.save_adapter_only and self.adapter.finetune_method == "full"), "save_adapter_only",
                     self.run.save_adapter_only, "needs finetune_method: lora (full fine-tuning has no adapter)")
