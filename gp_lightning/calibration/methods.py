"""The importance methods, and which of them runs under which strategy: the one capability table.

Every check of a method against a strategy (and of statistics checkpoints against a strategy) is
:func:`check_capability`; the config calls it before anything runs, :func:`run_calibration` again
for callers that skip the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gp_lightning.runtime.config import StrategyName
from gp_lightning.runtime.errors import ConfigError

ImportanceMethod = Literal["taylor", "taylor_2nd", "wanda", "magnitude", "random"]
METHODS: tuple[str, ...] = get_args(ImportanceMethod)
ALL_STRATEGIES: tuple[str, ...] = get_args(StrategyName)


@dataclass(frozen=True)
class Capability:
    """What a method needs and where it runs."""

    needs_data: bool  # runs calibration text through the model
    backward: bool  # needs gradients (forward + backward passes)
    strategies: tuple[str, ...] = ALL_STRATEGIES
    refusal: str = ""  # why the other strategies cannot run it


CAPABILITIES: dict[str, Capability] = {
    "taylor": Capability(needs_data=True, backward=True),
    "taylor_2nd": Capability(needs_data=True, backward=True, strategies=("auto", "ddp"),
                             refusal="its per-pass gradients exist only before they are synchronized, which only ddp "
                                     "exposes (use strategy: ddp, or importance_method: taylor)"),
    "wanda": Capability(needs_data=True, backward=False),
    "magnitude": Capability(needs_data=False, backward=False),
    "random": Capability(needs_data=False, backward=False),
}
#: Strategies whose statistics can be saved every N batches and resumed (checkpoint_every / resume).
STATISTICS_CHECKPOINT_STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")


def needs_calibration_data(method: str) -> bool:
    return CAPABILITIES[method].needs_data


def check_capability(method: str, strategy: str, statistics_checkpoints: bool = False) -> None:
    """Refuse a method/strategy (or checkpoint/strategy) combination that cannot run, saying why."""
    if method not in CAPABILITIES:
        raise ConfigError(f"Unknown importance_method {method!r}; known: {', '.join(METHODS)}.")
    capability = CAPABILITIES[method]
    if capability.needs_data and strategy not in capability.strategies:
        raise ConfigError(f"Config key 'strategy' = {strategy!r} cannot run importance_method {method!r}: "
                          f"{capability.refusal}.")
    if statistics_checkpoints and capability.needs_data and strategy not in STATISTICS_CHECKPOINT_STRATEGIES:
        raise ConfigError(f"Config key 'strategy' = {strategy!r} has no statistics checkpoints (checkpoint_every / "
                          f"resume) yet: use {' or '.join(s for s in STATISTICS_CHECKPOINT_STRATEGIES if s != 'auto')}.")
