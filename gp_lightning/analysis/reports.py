"""Human-readable reports written into the run directory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gp_lightning.model.layout import ModelLayout


def layer_summary_text(summary: pd.DataFrame) -> str:
    lines = [
        f"{'layer':>5}  {'attn groups':>11}  {'mlp channels':>13}  {'params before':>13}  {'params after':>12}  "
        f"{'attn':>6}  {'mlp':>6}  {'layer':>6}  {'imp. share':>10}  status",
    ]
    for row in summary.itertuples():
        lines.append(
            f"{row.layer_idx:>5}  {row.attention_groups_before:>4} -> {row.attention_groups_after:<3}  "
            f"{row.mlp_channels_before:>5} -> {row.mlp_channels_after:<5}  {row.params_before:>13,}  "
            f"{row.params_after:>12,}  {row.attention_rate:>6.1%}  {row.mlp_rate:>6.1%}  {row.layer_rate:>6.1%}  "
            f"{row.importance_share:>10.2%}  {row.status}"
        )
    return "\n".join(lines) + "\n"


def describe_run(settings: dict[str, Any], constraints: str, layout: ModelLayout, results: dict[str, Any]) -> str:
    """``description.txt``: the run on one page (``settings``: the run's flat config keys)."""
    def ppl(key: str) -> str:
        value = results.get(key)
        return "not measured" if value is None else f"{value:.4f}"

    c = settings
    source = (f"read from {c['from_table']}" if c["from_table"] else
              f"{c['importance_method']}, {c['num_samples']} x {c['seq_len']} tokens of {c['dataset']}")
    lines = [
        "gp-lightning global structured pruning",
        f"model:              {c['model']} ({layout.model_type}, {layout.num_layers} layers)",
        f"importance:         {source}",
        f"table transforms:   clip [{c['clip_percentile_low']}, {c['clip_percentile_high']}] percentiles, "
        f"normalization={c['normalization']} ({c['normalization_level']}), temperature={c['temperature']}, "
        f"tau={c['tau']}, layer_depth_weight={c['layer_depth_weight']}",
        f"constraints:        {constraints}",
    ]
    if results.get("table_only"):
        lines += [f"table only:         {results['units']:,} units ranked, nothing pruned",
                  f"perplexity (dense): {ppl('ppl_before')}"]
        return "\n".join(lines) + "\n"
    lines += [
        f"requested ratio:    {c['pruning_ratio']:.4f} of all parameters",
        f"achieved ratio:     {results['achieved_ratio']:.4f} of all parameters "
        f"({results['achieved_ratio_of_prunable']:.4f} of prunable)",
        f"parameters:         {results['total_params']:,} -> {results['params_after']:,}",
        f"perplexity before:  {ppl('ppl_before')}",
        f"perplexity after:   {ppl('ppl_after')}",
        f"evaluation:         {results['eval_windows']} windows of {c['eval_seq_len']} tokens of {c['eval_dataset']}",
    ]
    return "\n".join(lines) + "\n"


def pruning_comparison(layout: ModelLayout, summary: pd.DataFrame, total_after: int) -> dict[str, Any]:
    """Per-layer shapes and parameters before and after, for ``analysis/pruning_comparison.json``."""
    layers = []
    for layer, row in zip(layout.layers, summary.itertuples(), strict=True):
        def shape(groups: int, channels: int, qpk: int = layer.queries_per_kv) -> dict[str, int]:
            return {"num_key_value_heads": groups, "num_attention_heads": groups * qpk, "intermediate_size": channels}

        layers.append({
            "layer_idx": layer.index, "status": row.status,
            "before": shape(row.attention_groups_before, row.mlp_channels_before),
            "after": shape(row.attention_groups_after, row.mlp_channels_after),
            "params_before": int(row.params_before), "params_after": int(row.params_after),
        })
    return {"total_params_before": layout.total_params, "total_params_after": total_after,
            "prunable_params_before": int(summary["params_before"].sum()),
            "prunable_params_after": int(summary["params_after"].sum()), "layers": layers}
