"""Human-readable reports written into the run directory."""

from __future__ import annotations

from typing import Any, Protocol

import pandas as pd

from gp_lightning.calibration.config import CalibrationConfig
from gp_lightning.data.config import DataConfig
from gp_lightning.evaluation.config import EvaluationConfig
from gp_lightning.model.config import ModelConfig
from gp_lightning.model.layout import ModelLayout
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.table.config import TableConfig


class PruneSettings(Protocol):
    """The groups of a pruning config that its description reads."""

    source: ModelConfig
    data: DataConfig
    calibration: CalibrationConfig
    table: TableConfig
    selection: SelectionConfig
    evaluation: EvaluationConfig


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


def describe_run(cfg: PruneSettings, layout: ModelLayout, results: dict[str, Any]) -> str:
    """``description.txt``: the run on one page."""
    def ppl(key: str) -> str:
        value = results.get(key)
        return "not measured" if value is None else f"{value:.4f}"

    t, data = cfg.table, cfg.data
    source = (f"read from {t.from_table}" if t.from_table else
              f"{cfg.calibration.importance_method}, {data.num_samples} x {data.seq_len} tokens of {data.dataset}")
    lines = [
        "gp-lightning global structured pruning",
        f"model:              {cfg.source.model} ({layout.model_type}, {layout.num_layers} layers)",
        f"importance:         {source}",
        f"table transforms:   clip [{t.clip_percentile_low}, {t.clip_percentile_high}] percentiles, "
        f"normalization={t.normalization} ({t.normalization_level}), temperature={t.temperature}, tau={t.tau}, "
        f"layer_depth_weight={t.layer_depth_weight}",
        f"constraints:        {cfg.selection.describe()}",
    ]
    if results.get("table_only"):
        lines += [f"table only:         {results['units']:,} units ranked, nothing pruned",
                  f"perplexity (dense): {ppl('ppl_before')}"]
        return "\n".join(lines) + "\n"
    lines += [
        f"requested ratio:    {cfg.selection.pruning_ratio:.4f} of all parameters",
        f"achieved ratio:     {results['achieved_ratio']:.4f} of all parameters "
        f"({results['achieved_ratio_of_prunable']:.4f} of prunable)",
        f"parameters:         {results['total_params']:,} -> {results['params_after']:,}",
        f"perplexity before:  {ppl('ppl_before')}",
        f"perplexity after:   {ppl('ppl_after')}",
        f"evaluation:         {results['eval_windows']} windows of {cfg.evaluation.eval_seq_len} tokens of "
        f"{cfg.evaluation.eval_dataset}",
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
