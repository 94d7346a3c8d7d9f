"""Held-out perplexity of the models a recipe makes, on windows tokenized once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import evaluation_windows, tokenize
from gp_lightning.evaluation.config import EvaluationWindows
from gp_lightning.evaluation.perplexity import measure_perplexity


@dataclass
class Evaluator:
    """``measure(model, "before")`` puts ``ppl_before`` into ``results`` and ``eval_before_s`` into ``timings``."""

    windows: torch.Tensor | None
    batch_size: int
    precision: str
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def on(cls, config: EvaluationWindows, tokenizer: object, precision: str, needed: bool,
           timings: dict[str, float] | None = None, encoding: str = "utf-8") -> Evaluator:
        """Windows of ``config.eval_dataset`` when ``needed`` (else none: nothing will be measured)."""
        windows = None
        if needed:
            tokens = tokenize(load_text(config.eval_dataset, "evaluation", encoding), tokenizer)
            windows = evaluation_windows(tokens, config.eval_seq_len, config.eval_max_windows)
        return cls(windows, config.eval_batch_size, precision, timings=timings if timings is not None else {})

    @property
    def window_count(self) -> int:
        return 0 if self.windows is None else int(self.windows.shape[0])

    def measure(self, model: nn.Module, key: str) -> float:
        assert self.windows is not None, "no evaluation windows: the recipe did not ask for any"
        return measure_perplexity(model, self.windows, self.batch_size, self.precision, key, self.results,
                                  self.timings)
