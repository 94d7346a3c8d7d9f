"""Compare runs side by side: ``gp-lightning compare runs/a runs/b ...`` (or ``python -m gp_lightning.analysis.compare``).

Reads what each run wrote (``evaluation_results.json``, ``config.yaml``, the per-layer summary and
the diagnosis, and ``evaluation/zero_shot.json`` where the run has one) and prints one markdown row
per run: parameters, achieved ratio, perplexity before and after, the zero-shot accuracy of each
task (its reported metric) and their average, the highest per-layer rate and the number of extreme
layers. With ``--output DIR`` it also writes ``comparison.csv``, ``comparison.md`` and
``pruning_rates_overlay.png`` (with zero-shot results: a second panel of them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure

from gp_lightning.analysis.plots import save_png, zero_shot_bars
from gp_lightning.evaluation.zero_shot import reported_scores
from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.errors import DataError, GPLightningError
from gp_lightning.runtime.io import write_csv, write_text


def _read_run(run: Path) -> tuple[dict, pd.DataFrame]:
    run_manifest.require_complete(run, "compare")
    results_path = run / "evaluation_results.json"
    if not results_path.is_file():
        raise DataError(f"{run} is not a finished gp-lightning run (no evaluation_results.json).")
    results = json.loads(results_path.read_text())
    if results.get("table_only"):
        raise DataError(f"{run} is a --table_only run: it pruned nothing to compare.")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    summary = pd.read_csv(run / "analysis" / "pruning_summary_by_layer.csv")
    diagnosis_path = run / "analysis" / "gradient_diagnosis.json"
    diagnosis = json.loads(diagnosis_path.read_text()) if diagnosis_path.is_file() else {"extreme_layers": []}
    row = {
        "run": str(run), "model": config.get("model"), "method": config.get("importance_method"),
        "normalization": f"{config.get('normalization', 'none')}/{config.get('normalization_level', '-')}",
        "params_before": results["total_params"], "params_after": results["params_after"],
        "ratio": results["achieved_ratio"], "ppl_before": results.get("ppl_before"),
        "ppl_after": results.get("ppl_after"), **_zero_shot_columns(run),
        "max_layer_rate": float(summary["layer_rate"].max()), "extreme_layers": len(diagnosis["extreme_layers"]),
    }
    return row, summary


def _zero_shot_columns(run: Path) -> dict[str, float | None]:
    """``"<task> <metric>"`` -> the run's zero-shot accuracy (fraction), and ``zero-shot avg``; {} without any."""
    path = run / "evaluation" / "zero_shot.json"
    if not path.is_file():
        return {}
    written = json.loads(path.read_text(encoding="utf-8"))
    checkpoints = written.get("checkpoints", [written])  # a run's, or gp-lightning evaluate --output's of one model
    scores = reported_scores(checkpoints[0] if len(checkpoints) == 1 else written)
    return {("zero-shot avg" if name == "average" else f"{name} {metric}"): value
            for name, (metric, value) in scores.items()}


def compare_runs(runs: Sequence[str | Path]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    rows, summaries = [], {}
    for run in runs:
        try:
            row, summary = _read_run(Path(run))
        except (OSError, ValueError, KeyError) as exc:  # a file of the run missing, cut short or edited
            what = f"lacks {exc.filename}" if isinstance(exc, OSError) and exc.filename else f"has a damaged file ({exc!r})"
            raise DataError(f"{run} {what}: it is not a whole run directory of prune.py; rerun its command (the same "
                            "settings redo it) or leave it out.") from exc
        rows.append(row)
        summaries[row["run"]] = summary
    return pd.DataFrame(rows), summaries


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def overlay_figure(summaries: dict[str, pd.DataFrame], table: pd.DataFrame | None = None) -> Figure:
    """Per-layer parameter rate of every run on one axes; below it, when ``table`` has zero-shot columns, each
    run's zero-shot accuracy per task."""
    scores = _zero_shot_scores(table)
    figure = Figure(figsize=(8.0, 7.2 if scores else 3.8))
    axes = figure.add_subplot(2 if scores else 1, 1, 1)
    for name, summary in summaries.items():
        axes.plot(summary["layer_idx"], summary["layer_rate"], marker=".", label=Path(name).name)
    axes.set_xlabel("layer")
    axes.set_ylabel("fraction of the layer's parameters removed")
    axes.set_ylim(0, 1.02)
    axes.set_title("Pruning rate per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if scores:
        zero_shot_bars(figure.add_subplot(2, 1, 2), scores)
    figure.tight_layout()
    return figure


def _zero_shot_scores(table: pd.DataFrame | None) -> dict[str, dict[str, float]]:
    """Run name -> zero-shot column -> accuracy, for the runs and columns that have one."""
    if table is None:
        return {}
    columns = [c for c in table.columns if " " in c]  # "<task> <metric>", "zero-shot avg": the other keys have none
    return {Path(row["run"]).name: {c: float(row[c]) for c in columns if pd.notna(row[c])}
            for _, row in table.iterrows() if any(pd.notna(row[c]) for c in columns)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gp-lightning compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories written by prune.py")
    parser.add_argument("--output", help="also write comparison.csv/.md and pruning_rates_overlay.png here")
    args = parser.parse_args(argv)
    try:
        if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
            raise DataError(f"--output {args.output} is a file: compare writes three files into a directory; "
                            "name a directory (a new one is made).")
        table, summaries = compare_runs(args.runs)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(table)
    print(markdown, end="")
    if args.output:
        out = Path(args.output)
        write_csv(out / "comparison.csv", table)
        write_text(out / "comparison.md", markdown)
        save_png(overlay_figure(summaries, table), out / "pruning_rates_overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
