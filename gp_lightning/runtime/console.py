"""What the console shows: progress bars, gp-lightning's own log lines and real warnings.

Third-party libraries print lines that say nothing to a pruning user (Lightning's accelerator
summary and cloud-logger tip, DeepSpeed's CPU fallback note, lm-eval's notes on a model handed over
in memory, deprecations inside Lightning).
Each one is listed here by logger (or warning module) and message, and hidden by exactly that
pattern; anything else they print still shows. ``log_level: debug`` (``-v``) hides nothing.
Calibration runs its Lightning loop in eval mode and without an optimizer on purpose; the two
warnings Lightning gives about that are hidden around calibration only (:func:`calibration_warnings`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator

from gp_lightning.runtime.config import LogLevel

#: (logger name, message pattern): informational lines of other libraries that carry nothing for our users.
HARMLESS_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", r"(GPU|TPU|HPU) available: "),
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
    ("lightning.pytorch.utilities.rank_zero", r"`Trainer\.(fit|validate)` stopped: `max_epochs=\d+` reached"),
    ("lightning.pytorch.utilities.rank_zero", r"Loading `train_dataloader` to estimate number of stepping batches"),
    ("DeepSpeed", r"Setting accelerator to CPU\. If you have GPU or other accelerator"),
    # lm-eval on the model in memory that gp-lightning hands it (zero-shot evaluation): intended, and 0-shot is asked
    ("lm_eval.models.huggingface", r"`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", r"Passed an already-initialized model through `pretrained`"),
    ("lm_eval.evaluator", r"Overwriting default num_fewshot of \S+ from None to 0$"),
    # lm-eval's own task YAMLs (boolq) leave a metric's aggregation to lm-eval's default: mean, higher is better
    ("lm_eval.api.task", r"\[Task: \S+\] metric \S+ is defined, but (aggregation|higher_is_better) is not\. using "
                         r"default"),
)

#: (warning module pattern, message pattern): deprecations raised inside third-party code, not by ours.
HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"lightning\.pytorch\.utilities\._pytree", r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),  # read by peft
)

#: Lightning's warnings about how calibration runs its loop (eval mode, no optimizer): intended there.
CALIBRATION_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"lightning\.pytorch\.core\.optimizer", r"`LightningModule\.configure_optimizers` returned `None`"),
    (r"lightning\.pytorch\.loops\.fit_loop", r"Found \d+ module\(s\) in eval mode at the start of training"),
)

_state = {"quiet": True}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (redirections and captures see it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the stream StreamHandler writes to
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _harmless_filters() -> dict[str, _DropMessages]:
    by_logger: dict[str, list[str]] = {}
    for name, pattern in HARMLESS_LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    return {name: _DropMessages(patterns) for name, patterns in by_logger.items()}


_FILTERS = _harmless_filters()


def configure_console(level: LogLevel = "info", rank: int = 0) -> None:
    """Send gp-lightning's log lines to stderr at ``level`` (other ranks: warnings only); hide known noise.

    With ``debug`` nothing of other libraries is hidden.
    """
    logger = logging.getLogger("gp_lightning")
    numeric = logging.DEBUG if level == "debug" else getattr(logging, level.upper())
    logger.setLevel(min(numeric, logging.INFO))  # the run's training.log always gets INFO
    if not any(getattr(h, "gp_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.gp_console = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("[gp-lightning] %(message)s" if rank == 0 else
                                               f"[gp-lightning rank {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    for handler in logger.handlers:
        if getattr(handler, "gp_console", False):
            handler.setLevel(numeric if rank == 0 else max(numeric, logging.WARNING))
    set_quiet(level != "debug")


def set_quiet(quiet: bool) -> None:
    """Hide (True) or show (False) the known-harmless lines of other libraries."""
    _state["quiet"] = quiet
    for name, drop in _FILTERS.items():
        target = logging.getLogger(name)
        if quiet and drop not in target.filters:
            target.addFilter(drop)
        elif not quiet and drop in target.filters:
            target.removeFilter(drop)
    patterns = {message for _, message in HARMLESS_WARNINGS}
    warnings.filters[:] = [f for f in warnings.filters if getattr(f[1], "pattern", None) not in patterns]
    if quiet:
        for module, message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)


@contextlib.contextmanager
def calibration_warnings() -> Iterator[None]:
    """Around a calibration loop: hide Lightning's warnings about eval mode and the missing optimizer."""
    with warnings.catch_warnings():
        if _state["quiet"]:
            for module, message in CALIBRATION_WARNINGS:
                warnings.filterwarnings("ignore", message=message, module=module)
        yield


set_quiet(True)
