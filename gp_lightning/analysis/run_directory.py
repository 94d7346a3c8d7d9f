"""The analysis step and the one writer of a pruning run's files.

:func:`analyze` turns a selection into what its user reads (per-layer summary, diagnosis, plots);
:class:`PruneRunWriter` puts every artefact of the run into its directory, each file atomically,
under the names docs/run-directory.md lists. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from gp_lightning.analysis.diagnostics import diagnose
from gp_lightning.analysis.plots import gradient_analysis_figure, pruning_rates_figure, save_png, search_figure
from gp_lightning.analysis.reports import layer_summary_text
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.io import write_checksum, write_csv, write_json, write_text
from gp_lightning.selection.result import Selection, layer_summary
from gp_lightning.table.transforms import OrderedTable

log = logging.getLogger("gp_lightning")


@dataclass
class Analysis:
    """What a selection tells: the per-layer summary, the diagnosis, and the figures of both."""

    summary: pd.DataFrame
    diagnosis: dict[str, Any]
    figures: dict[str, Figure]
    seconds: float

    @property
    def extreme_layers(self) -> list[int]:
        return [e["layer_idx"] for e in self.diagnosis["extreme_layers"]]


def analyze(layout: ModelLayout, selection: Selection, ordered: OrderedTable, gradient_statistics: dict | None,
            extreme_rate: float) -> Analysis:
    """Per-layer summary, diagnosis (extreme layers, recommendations) and plots of one selection."""
    start = time.perf_counter()
    summary = layer_summary(layout, selection.plan, ordered.table)
    diagnosis = diagnose(summary, ordered.table, gradient_statistics, extreme_rate, layout.num_layers)
    figures = {"pruning_rates.png": pruning_rates_figure(summary)}
    if gradient_statistics:
        figures["gradient_analysis.png"] = gradient_analysis_figure(gradient_statistics, summary, ordered.table)
    for issue in diagnosis["issues"]:
        log.warning("diagnosis (%s): %s", issue["severity"], issue["message"])
    if diagnosis["recommendations"]:
        log.warning("recommended: %s (see analysis/gradient_diagnosis.json)",
                    ", ".join(f"{r['key']}: {r['value']}" for r in diagnosis["recommendations"]))
    return Analysis(summary, diagnosis, figures, time.perf_counter() - start)


class PruneRunWriter:
    """Every file of a pruning run, by artefact; nothing is written on ranks other than 0."""

    def __init__(self, run_dir: Path, rank: int = 0) -> None:
        self.run_dir = run_dir
        self.enabled = rank == 0

    def gradient_statistics(self, statistics: dict[str, Any] | None) -> None:
        if self.enabled and statistics is not None:
            write_json(self.run_dir / "analysis" / "gradient_statistics.json", statistics)

    def table(self, ordered: OrderedTable) -> None:
        if self.enabled:
            write_csv(self.run_dir / "global_group_table.csv", ordered.table)
            write_checksum(self.run_dir / "global_group_table.csv")
            write_json(self.run_dir / "table_transforms.json", ordered.report)

    def selection(self, selection: Selection, analysis: Analysis) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        write_csv(self.run_dir / "groups_to_prune.csv", selection.pruned)
        write_text(self.run_dir / "pruning_plan.json", selection.plan.to_json())
        write_csv(self.run_dir / "analysis" / "pruning_summary_by_layer.csv", analysis.summary)
        write_text(self.run_dir / "analysis" / "pruning_summary_by_layer.txt", layer_summary_text(analysis.summary))
        write_json(self.run_dir / "analysis" / "gradient_diagnosis.json", analysis.diagnosis)
        for name, figure in analysis.figures.items():
            save_png(figure, self.run_dir / "visualization" / name)
        analysis.seconds += time.perf_counter() - start

    def compensation(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.run_dir / "analysis" / "compensation.json", summary)

    def search(self, report: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.run_dir / "analysis" / "search.json", report)
            save_png(search_figure(report), self.run_dir / "visualization" / "search.png")

    def comparison(self, comparison: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.run_dir / "analysis" / "pruning_comparison.json", comparison)

    def results(self, results: dict[str, Any], description: str | None = None) -> None:
        if not self.enabled:
            return
        write_json(self.run_dir / "evaluation_results.json", results)
        if description is not None:
            write_text(self.run_dir / "description.txt", description)


@dataclass
class PruneResults:
    """``evaluation_results.json`` of a pruning run (the keys ``compare`` and docs/run-directory.md describe)."""

    selection: Selection
    params_after: int  # counted on the real pruned model (emptied blocks also lose their norms)
    output_bias_params: int  # of which the blocks' own output biases (kept from a skipped block, or compensation's)
    measured: dict[str, Any]  # ppl_before / ppl_after / importance_details
    eval_dataset: str
    eval_seq_len: int
    eval_windows: int
    precision: str
    eval_precision: str
    extreme_layers: list[int]
    timings: dict[str, float]
    finetune: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            **self.selection.summary(),
            "params_after": self.params_after,
            "output_bias_params": self.output_bias_params,
            "achieved_ratio_actual": 1 - self.params_after / self.selection.total_params,
            **self.measured,
            "eval_dataset": self.eval_dataset,
            "eval_seq_len": self.eval_seq_len,
            "eval_windows": self.eval_windows,
            "precision": self.precision,
            "eval_precision": self.eval_precision,
            "extreme_layers": self.extreme_layers,
            "timings_s": self.timings,
        }
        if self.finetune is not None:
            out["finetune"] = self.finetune
        return out
