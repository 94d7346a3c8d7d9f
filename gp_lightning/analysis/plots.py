"""Plots people would rather see than read: gradient scales per layer and pruning rates per layer.

Built with matplotlib's object API (``Figure``, Agg canvas), so no display or pyplot state is
needed on headless nodes. PNGs are written atomically next to the JSON/CSV they illustrate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gp_lightning.runtime.io import atomic_write


def save_png(figure: Figure, path: Path) -> None:
    # fixed layouts; tight_layout or bbox_inches="tight" would cost extra rendering passes
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))


def pruning_rates_figure(summary: pd.DataFrame, title: str = "Pruning rate per layer") -> Figure:
    """Attention and MLP rate of every layer, side by side, with the layer's overall rate as a line."""
    figure = Figure(figsize=(max(6.0, 0.28 * len(summary) + 2), 3.6))
    axes = figure.add_subplot(1, 1, 1)
    x = summary["layer_idx"].to_numpy()
    axes.bar(x - 0.2, summary["attention_rate"], width=0.4, label="attention (GQA groups)", color="#4C72B0")
    axes.bar(x + 0.2, summary["mlp_rate"], width=0.4, label="MLP (channels)", color="#DD8452")
    axes.plot(x, summary["layer_rate"], color="black", marker=".", linewidth=1, label="layer (parameters)")
    axes.set_xlabel("layer")
    axes.set_ylabel("fraction removed")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.14)  # fixed layout: no layout pass
    return figure


def gradient_analysis_figure(statistics: dict[str, Any], summary: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Three panels: gradient scale per layer (log), its max/min range, and gradient vs importance vs rate."""
    layers = pd.DataFrame(statistics["layers"]).set_index("layer_idx")
    x = layers.index.to_numpy()
    figure = Figure(figsize=(max(7.0, 0.3 * len(x) + 3), 9.0))
    scale, spread, compare = (figure.add_subplot(3, 1, i) for i in (1, 2, 3))
    for key, label in (("mean_abs", "mean |g|"), ("std", "std"), ("l2_norm", "L2 norm")):
        scale.semilogy(x, layers[key].clip(lower=1e-30), marker="o", markersize=3, label=label)
    ratios = statistics.get("ratios", {})
    scale.set_title(f"Gradient scale per layer (mean |g| spread {ratios.get('mean_ratio', float('nan')):.1f}x)")
    scale.legend(fontsize=8)
    # an exactly-zero gradient element would send a log axis to -inf: show at most 12 decades below the max
    floor = (layers["max_abs"] * 1e-12).clip(lower=1e-30)
    spread.fill_between(x, layers["min_abs"].clip(lower=floor), layers["max_abs"].clip(lower=1e-30), alpha=0.3,
                        label="min |g| .. max |g| (floored at max x 1e-12)")
    spread.semilogy(x, layers["max_abs"].clip(lower=1e-30), color="#C44E52", linewidth=1, label="max |g|")
    spread.set_title("Gradient range per layer")
    spread.legend(fontsize=8)
    importance = table.groupby("layer_idx")["importance"].sum().reindex(x).fillna(0.0).to_numpy()
    gradient = layers["mean_abs"].to_numpy()
    rates = summary.set_index("layer_idx")["layer_rate"].reindex(x).fillna(0.0).to_numpy()
    compare.plot(x, gradient / max(gradient.max(), 1e-300), marker="o", markersize=3, label="mean |g| / max")
    compare.plot(x, importance / max(importance.max(), 1e-300), marker="s", markersize=3,
                 label="importance / max")
    compare.bar(x, rates, alpha=0.3, color="gray", label="pruning rate")
    compare.set_ylim(0, 1.05)
    compare.set_title("Normalized gradient vs importance vs pruning rate")
    compare.legend(fontsize=8)
    for axes in (scale, spread, compare):
        axes.set_xlabel("layer")
        axes.grid(alpha=0.3)
        axes.set_xticks(x if len(x) <= 40 else np.arange(0, x.max() + 1, 5))
    figure.subplots_adjust(left=0.08, right=0.98, top=0.96, bottom=0.06, hspace=0.45)  # fixed layout: no layout pass
    return figure


def zero_shot_bars(axes: Any, scores: dict[str, dict[str, float]]) -> None:
    """Grouped bars on ``axes``: one group per zero-shot task (its reported metric), one bar per run."""
    tasks = list(dict.fromkeys(task for run in scores.values() for task in run))
    width = 0.8 / max(len(scores), 1)
    x = np.arange(len(tasks))
    for i, (run, values) in enumerate(scores.items()):
        axes.bar(x + (i - (len(scores) - 1) / 2) * width, [100 * values.get(task, np.nan) for task in tasks],
                 width=width, label=run)
    axes.set_xticks(x)
    axes.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Zero-shot accuracy (lm-eval; each task's reported metric)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)


def finetune_loss_figure(curve: pd.DataFrame) -> Figure:
    """Training loss per logged step and validation loss per epoch (step 0: before training)."""
    figure = Figure(figsize=(7.0, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    if "train_loss" in curve:
        train = curve.dropna(subset=["train_loss"])
        axes.plot(train["step"], train["train_loss"], color="#4C72B0", linewidth=1, label="training loss")
    if "val_loss" in curve:
        val = curve.dropna(subset=["val_loss"])
        axes.plot(val["step"], val["val_loss"], color="#C44E52", marker="o", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title("Recovery fine-tuning")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(alpha=0.3)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.14)  # fixed layout: no layout pass
    return figure


def search_figure(report: dict[str, Any]) -> Figure:
    """``allocation: search``: the best KL per generation against the seeds', and the chosen widths per layer next
    to the seeds' (MLP channels as lines, GQA groups as markers on the right axis)."""
    figure = Figure(figsize=(11.0, 3.8))
    curve, widths = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    history = report["history"]
    curve.plot([h["generation"] + 1 for h in history], [h["fitness"] for h in history], marker=".", color="black",
               label="search (best so far)")
    for (name, seed), color in zip(report["seeds"].items(), ("#4C72B0", "#DD8452"), strict=False):
        curve.axhline(seed["fitness"], color=color, linestyle="--", linewidth=1, label=name)
    curve.set_xlabel("generation")
    curve.set_ylabel("KL(dense || pruned) per token")
    curve.set_title("Fitness on the fitness windows")
    curve.legend(fontsize=8)
    groups = widths.twinx()
    shown = {"chosen": report["chosen"], **report["seeds"]}
    for k, ((name, entry), color) in enumerate(zip(shown.items(), ("black", "#4C72B0", "#DD8452"), strict=False)):
        x = np.arange(len(entry["mlp_channels"]))
        widths.plot(x, entry["mlp_channels"], color=color, linewidth=1.5 if name == "chosen" else 1, label=name)
        groups.plot(x + 0.2 * (k - 1), entry["attention_groups"], color=color, linestyle="none", marker="o",
                    markersize=3)  # side by side, so that equal counts stay visible
    widths.set_xlabel("layer")
    widths.set_ylabel("MLP channels kept (lines)")
    groups.set_ylabel("GQA groups kept (dots)")
    widths.set_title(f"Widths: {report['chosen']['from']} chosen on the held-out windows")
    widths.legend(fontsize=8, loc="lower right")
    groups.yaxis.get_major_locator().set_params(integer=True)
    figure.subplots_adjust(left=0.07, right=0.93, top=0.9, bottom=0.14, wspace=0.32)
    return figure
