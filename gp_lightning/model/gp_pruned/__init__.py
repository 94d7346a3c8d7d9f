"""The gp_pruned architecture: a Llama/Mistral/Qwen2 decoder whose layers differ in width or skip blocks.

``configuration_gp_pruned.py`` and ``modeling_gp_pruned.py`` are copied into every pruned checkpoint
(they import only torch and transformers); :mod:`.revision` tells which copy a checkpoint ships.
:func:`register_auto_classes` lets ``AutoModelForCausalLM.from_pretrained`` load pruned checkpoints
inside the project without ``trust_remote_code``. The classes are imported on first use, so commands
that only handle files start without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GPPrunedConfig", "GPPrunedForCausalLM", "register_auto_classes"]


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``gp_pruned`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gp_lightning.model.gp_pruned.configuration_gp_pruned import GPPrunedConfig
    from gp_lightning.model.gp_pruned.modeling_gp_pruned import GPPrunedForCausalLM

    try:
        AutoConfig.register(GPPrunedConfig.model_type, GPPrunedConfig)
        AutoModelForCausalLM.register(GPPrunedConfig, GPPrunedForCausalLM)
    except ValueError:  # already registered
        pass


def __getattr__(name: str) -> Any:
    if name == "GPPrunedConfig":
        from gp_lightning.model.gp_pruned.configuration_gp_pruned import GPPrunedConfig

        return GPPrunedConfig
    if name == "GPPrunedForCausalLM":
        from gp_lightning.model.gp_pruned.modeling_gp_pruned import GPPrunedForCausalLM

        return GPPrunedForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
