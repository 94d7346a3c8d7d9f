"""Export: the pruned-checkpoint format (config + modeling shipped in the checkpoint) and its I/O.

:func:`register_auto_classes` registers ``gp_pruned`` with the transformers Auto classes, so inside
the project ``AutoModelForCausalLM.from_pretrained(path)`` works without ``trust_remote_code``.
The classes are imported on first use, so commands that only handle files start without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GPPrunedConfig", "GPPrunedForCausalLM", "register_auto_classes"]


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``gp_pruned`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gp_lightning.export.configuration_gp_pruned import GPPrunedConfig
    from gp_lightning.export.modeling_gp_pruned import GPPrunedForCausalLM

    try:
        AutoConfig.register(GPPrunedConfig.model_type, GPPrunedConfig)
        AutoModelForCausalLM.register(GPPrunedConfig, GPPrunedForCausalLM)
    except ValueError:  # already registered
        pass


def __getattr__(name: str) -> Any:
    if name == "GPPrunedConfig":
        from gp_lightning.export.configuration_gp_pruned import GPPrunedConfig

        return GPPrunedConfig
    if name == "GPPrunedForCausalLM":
        from gp_lightning.export.modeling_gp_pruned import GPPrunedForCausalLM

        return GPPrunedForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
