"""Distillation from the dense model: KL divergence between the teacher's and the student's next-token distributions.

``KL(p_teacher || p_student)`` on ``softmax(logits / T)``, times ``T^2`` (so gradients keep their scale
as T changes), summed over the positions whose label counts (labels not -100), in float32. The loss
of ``kd`` is its mean; ``kd+lm`` mixes it with the language-model loss: ``alpha * kd + (1 - alpha) * lm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gp_lightning.finetune.data import IGNORE


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``T^2 KL(teacher || student)`` over the positions that predict a counted label, and their number.

    Logits are ``(batch, length, vocab)``; position t predicts ``labels[:, t + 1]``.
    """
    counted = labels[:, 1:] != IGNORE
    student = student_logits[:, :-1][counted].float() / temperature
    teacher = teacher_logits[:, :-1][counted].float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                  reduction="sum")
    return kl * temperature**2, counted.sum()


def mixed_loss(lm: torch.Tensor, kd: torch.Tensor | None, kind: str, alpha: float) -> torch.Tensor:
    """The objective of ``finetune_loss``: ``lm``, ``kd`` or ``kd+lm`` (``alpha`` weighs the KD term)."""
    if kind == "lm" or kd is None:
        return lm
    if kind == "kd":
        return kd
    return alpha * kd + (1.0 - alpha) * lm
