"""Export: the pruned-checkpoint format (config + modeling shipped in the checkpoint) and its I/O.

Importing this package registers ``gp_pruned`` with the transformers Auto classes, so inside the
project ``AutoModelForCausalLM.from_pretrained(path)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from gp_lightning.export.configuration_gp_pruned import GPPrunedConfig
from gp_lightning.export.modeling_gp_pruned import GPPrunedForCausalLM

try:
    AutoConfig.register(GPPrunedConfig.model_type, GPPrunedConfig)
    AutoModelForCausalLM.register(GPPrunedConfig, GPPrunedForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass

__all__ = ["GPPrunedConfig", "GPPrunedForCausalLM"]
