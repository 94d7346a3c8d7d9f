"""Diagnosis of a selection: which layers were pruned to extremes, why, and which config keys would help.

Global Taylor pruning inherits each layer's gradient scale. A layer whose gradients are 1000x
smaller than the others' looks unimportant as a whole and is emptied, which is the failure the
pruning guides warn about (Mistral-7B layers 2-4 losing 90-99% of their MLP). This module turns the
selection and the gradient statistics into findings with a severity, and recommendations that
name real config keys (checked against :class:`~gp_lightning.config.PruneConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

#: Gradient spread (max/min of the per-layer mean |g|) above which the scales are a problem.
SPREAD_HIGH, SPREAD_MEDIUM = 1000.0, 100.0


def _recommend(key: str, value: Any, reason: str) -> dict[str, Any]:
    from gp_lightning.config import PruneConfig

    known = {f.name for f in dataclasses.fields(PruneConfig)}
    assert key in known, f"recommendation names unknown config key {key!r}"
    return {"key": key, "value": value, "reason": reason}


def diagnose(summary: pd.DataFrame, table: pd.DataFrame, gradient_statistics: dict[str, Any] | None,
             extreme_rate: float = 0.9, num_layers: int | None = None) -> dict[str, Any]:
    """Findings for one run. ``summary`` is the per-layer summary, ``table`` the ranked global table."""
    num_layers = num_layers or len(summary)
    importance = table.groupby("layer_idx")["importance"].sum()
    share = importance / importance.sum()
    grads = {row["layer_idx"]: row for row in (gradient_statistics or {}).get("layers", [])}
    extreme = []
    for row in summary.itertuples():
        rate = max(row.layer_rate, row.attention_rate, row.mlp_rate)
        if rate > extreme_rate:
            g = grads.get(row.layer_idx, {})
            extreme.append({
                "layer_idx": int(row.layer_idx), "layer_rate": float(row.layer_rate),
                "attention_rate": float(row.attention_rate), "mlp_rate": float(row.mlp_rate),
                "importance_share": float(share.get(row.layer_idx, 0.0)),
                "gradient_mean_abs": g.get("mean_abs"), "gradient_l2_norm": g.get("l2_norm"),
            })
    issues: list[dict[str, Any]] = []
    recommendations: list[dict[str, Any]] = []
    ratios = (gradient_statistics or {}).get("ratios", {})
    spread = ratios.get("mean_ratio")
    if spread is not None and spread == spread and spread > SPREAD_MEDIUM:
        means = {layer: row["mean_abs"] for layer, row in grads.items()}
        low = sorted(means, key=means.get)[: max(1, len(extreme))]
        issues.append({
            "kind": "gradient_scale_spread", "severity": "high" if spread > SPREAD_HIGH else "medium",
            "message": f"per-layer mean |gradient| spans {spread:.0f}x (layers {low} lowest): their units look "
                       "unimportant because of scale, not function", "layers": low,
        })
        recommendations.append(_recommend(
            "normalization", "log", "rescales each layer's importance to a common range before the global ranking"))
        recommendations.append(_recommend(
            "normalization_level", "layer", "layer level keeps a layer's attention/MLP cost balance; block level "
            "also removes the spread but makes attention groups look cheap per parameter"))
        if spread > SPREAD_HIGH:
            recommendations.append(_recommend(
                "seq_len", 128, "shorter windows give better-conditioned gradients when some layers' vanish"))
            recommendations.append(_recommend(
                "dataset", "c4", "calibrate on other (or more representative) text if the spread persists"))
    if extreme:
        layers = [e["layer_idx"] for e in extreme]
        many = len(extreme) >= max(3, round(0.1 * num_layers))
        issues.append({
            "kind": "extreme_layers", "severity": "high" if many else "medium",
            "message": f"{len(extreme)} layer(s) lost more than {extreme_rate:.0%} of a block or of the layer",
            "layers": layers,
        })
        recommendations.append(_recommend(
            "temperature", 1.0, "rescales each block to its measured skip-ablation loss, so blocks the model needs "
            "keep their units whatever their gradient scale"))
        recommendations.append(_recommend("max_rate", 0.8, "caps what any layer can lose"))
    early = max(2, round(0.1 * num_layers))
    early_hit = [e["layer_idx"] for e in extreme if e["layer_idx"] < early]
    if early_hit:
        issues.append({
            "kind": "early_layers_over_pruned", "severity": "critical",
            "message": f"early layers {early_hit} were pruned beyond {extreme_rate:.0%}; early layers feed every "
                       "later one and are the most damaging to lose", "layers": early_hit,
        })
        recommendations.append(_recommend("early_layers", early, f"treat the first {early} layers as early"))
        recommendations.append(_recommend("early_layer_max_rate", 0.3, "and cap what they can lose"))
    unique = {r["key"]: r for r in recommendations}
    return {"extreme_rate": extreme_rate, "extreme_layers": extreme, "gradient_ratios": ratios,
            "issues": issues, "recommendations": list(unique.values())}
