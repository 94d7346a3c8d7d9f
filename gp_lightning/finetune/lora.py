"""LoRA adapters (peft) on the projections that survived pruning, and what is trainable in each mode.

A pruned model has layers of different widths and may have blocks removed altogether; peft wraps
each remaining ``nn.Linear`` by name, so every adapter takes that layer's own shapes and a removed
block simply has nothing to wrap.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gp_lightning.runtime.errors import ConfigError


def lora_target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name component is in ``targets``."""
    wanted = set(targets)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted and module.weight.numel() > 0]


def add_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: int, dropout: float) -> nn.Module:
    """Wrap ``model`` in a peft model: LoRA on the surviving ``targets``, every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    names = lora_target_names(model, targets)
    if not names:
        present = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora_target_modules {list(targets)} match no linear layer of this model; its "
                          f"projections are {present}.")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of trainable and all parameters (what the run reports and the tests assert)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def merged(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded into its weights (a plain model again)."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if merge is not None else model
