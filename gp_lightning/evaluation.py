"""Perplexity on non-overlapping windows (the protocol LLM-Pruner and FLAP report), via torchmetrics."""

from __future__ import annotations

import logging
import time
from typing import Any

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


def measure_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, precision: str, key: str,
                       results: dict[str, Any], timings: dict[str, float]) -> float:
    """Perplexity into ``results["ppl_<key>"]``, its seconds into ``timings["eval_<key>_s"]``, and the run log."""
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size, precision, desc=f"Perplexity ({key})")
    timings[f"eval_{key}_s"] = time.perf_counter() - start
    results[f"ppl_{key}"] = ppl
    logging.getLogger("gp_lightning").info("perplexity %s: %.4f on %d windows of %d tokens", key, ppl, *windows.shape)
    return ppl


def evaluate_checkpoints(checkpoints: list[str], eval_dataset: str, eval_seq_len: int = 128,
                         eval_max_windows: int | None = None, batch_size: int = 8) -> list[dict[str, object]]:
    """Perplexity of several checkpoints (dense or pruned) on the SAME windows, tokenized once."""
    from gp_lightning.data import evaluation_windows, load_text, tokenize
    from gp_lightning.model_source import load_model

    windows = None
    rows: list[dict[str, object]] = []
    for source in checkpoints:
        model, tokenizer = load_model(source)
        if windows is None:
            windows = evaluation_windows(tokenize(load_text(eval_dataset, "evaluation"), tokenizer), eval_seq_len,
                                         eval_max_windows)
        ppl = perplexity(model, windows, batch_size, desc=f"Perplexity ({source})")
        rows.append({"checkpoint": source, "params": sum(p.numel() for p in model.parameters()), "ppl": ppl,
                     "windows": int(windows.shape[0]), "seq_len": eval_seq_len})
        del model
    return rows


def evaluate_main(argv: list[str] | None = None) -> int:
    """``gp-lightning evaluate CKPT [CKPT ...] --eval_dataset X``: perplexity side by side."""
    import argparse
    import sys
    from pathlib import Path

    from gp_lightning.errors import GPLightningError
    from gp_lightning.io import write_json

    parser = argparse.ArgumentParser(prog="gp-lightning evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoints", nargs="+", help="HF directories, hub ids, smollm2-135m, or pruned run/model")
    parser.add_argument("--eval_dataset", default="wikitext2")
    parser.add_argument("--eval_seq_len", type=int, default=128)
    parser.add_argument("--eval_max_windows", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        rows = evaluate_checkpoints(args.checkpoints, args.eval_dataset, args.eval_seq_len, args.eval_max_windows,
                                    args.eval_batch_size)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| checkpoint | params | PPL |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['checkpoint']} | {row['params']:,} | {row['ppl']:.3f} |")
    print(f"({rows[0]['windows']} windows of {args.eval_seq_len} tokens of {args.eval_dataset})")
    if args.json:
        write_json(Path(args.json), rows)
    return 0
