"""Perplexity on non-overlapping windows (the protocol LLM-Pruner and FLAP report), via torchmetrics."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from gp_lightning.precision import autocast


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, precision: str = "32-true",
               desc: str = "Perplexity") -> float:
    """Perplexity of ``model`` over ``windows`` (each window predicts its tokens 2..n)."""
    model.eval()
    device = next(model.parameters()).device
    # one process evaluates all windows (rank 0 in a distributed run): no cross-rank sync
    metric = Perplexity(sync_on_compute=False).to(device)
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        with autocast(precision, device):
            logits = model(input_ids=batch, use_cache=False).logits
        metric.update(logits[:, :-1].float(), batch[:, 1:])
    return float(metric.compute())
