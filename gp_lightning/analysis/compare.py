"""Compare runs side by side: ``gp-lightning compare runs/a runs/b ...`` (or ``python -m gp_lightning.analysis.compare``).

Reads what each run wrote (``evaluation_results.json``, ``config.yaml``, the per-layer summary and
the diagnosis) and prints one markdown row per run: parameters, achieved ratio, perplexity before
and after, the highest per-layer rate and the number of extreme layers. With ``--output DIR`` it
also writes ``comparison.csv``, ``comparison.md`` and ``pruning_rates_overlay.png``.
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

from gp_lightning.analysis.plots import save_png
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
        "ppl_after": results.get("ppl_after"), "max_layer_rate": float(summary["layer_rate"].max()),
        "extreme_layers": len(diagnosis["extreme_layers"]),
    }
    return row, summary


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


def overlay_figure(summaries: dict[str, pd.DataFrame]) -> Figure:
    """Per-layer parameter rate of every run on one axes."""
    figure = Figure(figsize=(8.0, 3.8))
    axes = figure.add_subplot(1, 1, 1)
    for name, summary in summaries.items():
        axes.plot(summary["layer_idx"], summary["layer_rate"], marker=".", label=Path(name).name)
    axes.set_xlabel("layer")
    axes.set_ylabel("fraction of the layer's parameters removed")
    axes.set_ylim(0, 1.02)
    axes.set_title("Pruning rate per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


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
        save_png(overlay_figure(summaries), out / "pruning_rates_overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
