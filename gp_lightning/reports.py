"""Human-readable reports written into the run directory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gp_lightning.architecture import ModelLayout
from gp_lightning.config import PruneConfig


def layer_summary_text(summary: pd.DataFrame) -> str:
    lines = [
        f"{'layer':>5}  {'attn groups':>11}  {'mlp channels':>13}  {'params before':>13}  {'params after':>12}  "
        f"{'rate':>6}  status",
    ]
    for row in summary.itertuples():
        lines.append(
            f"{row.layer_idx:>5}  {row.attention_groups_before:>4} -> {row.attention_groups_after:<3}  "
            f"{row.mlp_channels_before:>5} -> {row.mlp_channels_after:<5}  {row.params_before:>13,}  "
            f"{row.params_after:>12,}  {row.layer_rate:>6.1%}  {row.status}"
        )
    return "\n".join(lines) + "\n"


def describe_run(cfg: PruneConfig, layout: ModelLayout, results: dict[str, Any]) -> str:
    def ppl(key: str) -> str:
        value = results.get(key)
        return "not measured" if value is None else f"{value:.4f}"

    return (
        f"gp-lightning global structured pruning\n"
        f"model:              {cfg.model} ({layout.model_type}, {layout.num_layers} layers)\n"
        f"importance method:  {cfg.importance_method}, {cfg.num_samples} x {cfg.seq_len} tokens of {cfg.dataset}\n"
        f"requested ratio:    {cfg.pruning_ratio:.4f} of all parameters\n"
        f"achieved ratio:     {results['achieved_ratio']:.4f} of all parameters "
        f"({results['achieved_ratio_of_prunable']:.4f} of prunable)\n"
        f"parameters:         {results['total_params']:,} -> {results['params_after']:,}\n"
        f"perplexity before:  {ppl('ppl_before')}\n"
        f"perplexity after:   {ppl('ppl_after')}\n"
        f"evaluation:         {results['eval_windows']} windows of {cfg.eval_seq_len} tokens of {cfg.eval_dataset}\n"
        f"corrections:        temperature={cfg.temperature} tau={cfg.tau}\n"
    )
