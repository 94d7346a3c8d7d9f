"""Errors a user can act on.

Every error raised for bad input derives from :class:`GPLightningError`, so the entry points can
print the message (which names the problem and the fix) without a traceback.
"""

from __future__ import annotations


class GPLightningError(Exception):
    """Base class of the errors that a user caused and can fix."""


class ConfigError(GPLightningError, ValueError):
    """A config key is unknown, missing or out of range."""


class ModelSourceError(GPLightningError):
    """The model could not be found or loaded."""


class UnsupportedArchitectureError(GPLightningError):
    """The model is not a Llama-style decoder this toolkit knows how to prune."""


class DataError(GPLightningError):
    """The calibration or evaluation text is missing or too short."""


class RunDirectoryError(GPLightningError):
    """The output directory already holds a run and ``--overwrite`` was not given."""


class BudgetError(GPLightningError):
    """The requested pruning budget cannot be met."""


class CheckpointError(GPLightningError):
    """A directory is not the checkpoint the command needs (e.g. not a gp-lightning pruned checkpoint)."""


class CalibrationError(GPLightningError):
    """Calibration produced unusable statistics (NaN/inf gradients, no gradients)."""


def check_config(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise a :class:`ConfigError` that names the key, its value and the rule it breaks."""
    if not ok:
        raise ConfigError(f"Config key '{key}' = {value!r} is invalid: it {rule}.")
