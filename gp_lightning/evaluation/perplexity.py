"""Perplexity on non-overlapping windows (the protocol LLM-Pruner and FLAP report), via torchmetrics."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from gp_lightning.runtime.precision import autocast


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


def measure_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, precision: str, key: str,
                       results: dict[str, Any], timings: dict[str, float]) -> float:
    """Perplexity into ``results["ppl_<key>"]``, its seconds into ``timings["eval_<key>_s"]``, and the run log."""
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size, precision, desc=f"Perplexity ({key})")
    timings[f"eval_{key}_s"] = time.perf_counter() - start
    results[f"ppl_{key}"] = ppl
    logging.getLogger("gp_lightning").info("perplexity %s: %.4f on %d windows of %d tokens", key, ppl, *windows.shape)
    return ppl


