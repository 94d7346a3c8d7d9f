"""The evaluation group: which held-out text, cut how, measured when; which zero-shot tasks after."""

from __future__ import annotations

from dataclasses import dataclass

from gp_lightning.runtime.config import Precision
from gp_lightning.runtime.errors import check_config


@dataclass
class EvaluationWindows:
    """Perplexity evaluation"""

    eval_dataset: str = "wikitext2"
    """Perplexity text, same forms as ``dataset`` (hub datasets: the test/validation split; never the text a model
    trains on; without hub access, e.g. a WikiText-2 copy's ``test.txt``)."""
    eval_seq_len: int = 128
    """Tokens per non-overlapping perplexity window (128 as LLM-Pruner and FLAP report)."""
    eval_max_windows: int | None = None
    """Evaluate on the first N windows only (null: the whole text)."""
    eval_batch_size: int = 8
    """Windows per evaluation forward pass."""
    eval_precision: Precision = "auto"
    """Numerics of perplexity and zero-shot evaluation (same choices as ``precision``)."""
    eval_tasks: str | None = None
    """Zero-shot accuracy of the model the run makes, through lm-evaluation-harness (rank 0): comma-separated lm-eval
    task or group names, ``llm-pruner`` (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
    openbookqa), or paths of task YAML files or folders of them (``gp-lightning build-tasks`` writes two that
    need no hub). Results in ``evaluation/zero_shot.json`` and ``.md`` (null: no zero-shot evaluation)."""
    eval_num_fewshot: int = 0
    """Examples shown before each zero-shot question (0: zero-shot, as LLM-Pruner reports)."""
    eval_limit: int | None = None
    """Score only the first N items of each zero-shot task (null: all; partial scores are not the published ones)."""

    def __post_init__(self) -> None:
        check_config(self.eval_seq_len >= 2, "eval_seq_len", self.eval_seq_len, "must be at least 2 tokens")
        check_config(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be at least 1")
        if self.eval_max_windows is not None:
            check_config(self.eval_max_windows >= 1, "eval_max_windows", self.eval_max_windows,
                         "must be at least 1, or null for the whole text")
        check_config(self.eval_num_fewshot >= 0, "eval_num_fewshot", self.eval_num_fewshot, "must be 0 or more")
        if self.eval_limit is not None:
            check_config(self.eval_limit >= 1, "eval_limit", self.eval_limit, "must be at least 1, or null for all items")


@dataclass
class EvaluationConfig(EvaluationWindows):
    """Evaluation: perplexity and zero-shot accuracy"""

    test_before_prune: bool = True
    """Measure perplexity of the dense model."""
    test_after_prune: bool = True
    """Measure perplexity of the pruned model."""
