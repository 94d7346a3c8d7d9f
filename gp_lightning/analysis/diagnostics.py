"""Diagnosis of a selection: which layers were pruned to extremes, why, and which config keys would help.

Global Taylor pruning inherits each layer's gradient scale. A layer whose gradients are 1000x
smaller than the others' looks unimportant as a whole and is emptied, which is the failure the
pruning guides warn about (Mistral-7B layers 2-4 losing 90-99% of their MLP). This module turns the
selection and the gradient statistics into findings with a severity, and recommendations that
name real config keys (a test checks them against the pruning config).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

#: Gradient spread (max/min of the per-layer mean |g|) above which the scales are a problem.
SPREAD_HIGH, SPREAD_MEDIUM = 1000.0, 100.0


def _recommend(key: str, value: Any, reason: str) -> dict[str, Any]:
    """A recommendation names a real config key (tests check every key diagnose can name against the config)."""
    return {"key": key, "value": value, "reason": reason}


def _extreme_layers(summary: pd.DataFrame, share: pd.Series, grads: dict[int, dict[str, Any]],
                    extreme_rate: float) -> list[dict[str, Any]]:
    """Layers (or one of their blocks) that lost more than ``extreme_rate``, with their share and gradients."""
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
    return extreme


def _spread_findings(spread: float | None, grads: dict[int, dict[str, Any]], extreme_count: int
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A per-layer gradient scale spanning orders of magnitude, and the keys that counter it."""
    if spread is None or spread != spread or spread <= SPREAD_MEDIUM:
        return [], []
    means = {layer: row["mean_abs"] for layer, row in grads.items()}
    low = sorted(means, key=means.get)[: max(1, extreme_count)]
    issues = [{
        "kind": "gradient_scale_spread", "severity": "high" if spread > SPREAD_HIGH else "medium",
        "message": f"per-layer mean |gradient| spans {spread:.0f}x (layers {low} lowest): their units look "
                   "unimportant because of scale, not function", "layers": low,
    }]
    recommendations = [
        _recommend("normalization", "log", "rescales each layer's importance to a common range before the global "
                   "ranking"),
        _recommend("normalization_level", "layer", "layer level keeps a layer's attention/MLP cost balance; block "
                   "level also removes the spread but makes attention groups look cheap per parameter"),
    ]
    if spread > SPREAD_HIGH:
        recommendations.append(_recommend(
            "seq_len", 128, "shorter windows give better-conditioned gradients when some layers' vanish"))
        recommendations.append(_recommend(
            "dataset", "c4", "calibrate on other (or more representative) text if the spread persists"))
    return issues, recommendations


def _extreme_findings(extreme: list[dict[str, Any]], extreme_rate: float, num_layers: int
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Over-pruned layers (worst when they are early ones), and the keys that protect them."""
    if not extreme:
        return [], []
    layers = [e["layer_idx"] for e in extreme]
    many = len(extreme) >= max(3, round(0.1 * num_layers))
    issues = [{
        "kind": "extreme_layers", "severity": "high" if many else "medium",
        "message": f"{len(extreme)} layer(s) lost more than {extreme_rate:.0%} of a block or of the layer",
        "layers": layers,
    }]
    recommendations = [
        _recommend("temperature", 1.0, "rescales each block to its measured skip-ablation loss, so blocks the model "
                   "needs keep their units whatever their gradient scale"),
        _recommend("max_rate", 0.8, "caps what any layer can lose"),
    ]
    early = max(2, round(0.1 * num_layers))
    early_hit = [layer for layer in layers if layer < early]
    if early_hit:
        issues.append({
            "kind": "early_layers_over_pruned", "severity": "critical",
            "message": f"early layers {early_hit} were pruned beyond {extreme_rate:.0%}; early layers feed every "
                       "later one and are the most damaging to lose", "layers": early_hit,
        })
        recommendations.append(_recommend("early_layers", early, f"treat the first {early} layers as early"))
        recommendations.append(_recommend("early_layer_max_rate", 0.3, "and cap what they can lose"))
    return issues, recommendations


def diagnose(summary: pd.DataFrame, table: pd.DataFrame, gradient_statistics: dict[str, Any] | None,
             extreme_rate: float = 0.9, num_layers: int | None = None) -> dict[str, Any]:
    """Findings for one run. ``summary`` is the per-layer summary, ``table`` the ranked global table."""
    num_layers = num_layers or len(summary)
    importance = table.groupby("layer_idx")["importance"].sum()
    grads = {row["layer_idx"]: row for row in (gradient_statistics or {}).get("layers", [])}
    extreme = _extreme_layers(summary, importance / importance.sum(), grads, extreme_rate)
    ratios = (gradient_statistics or {}).get("ratios", {})
    spread_issues, spread_recommendations = _spread_findings(ratios.get("mean_ratio"), grads, len(extreme))
    extreme_issues, extreme_recommendations = _extreme_findings(extreme, extreme_rate, num_layers)
    unique = {r["key"]: r for r in spread_recommendations + extreme_recommendations}
    return {"extreme_rate": extreme_rate, "extreme_layers": extreme, "gradient_ratios": ratios,
            "issues": spread_issues + extreme_issues, "recommendations": list(unique.values())}
