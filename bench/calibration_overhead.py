"""Overhead of Lightning-based Taylor calibration against a plain PyTorch forward+backward loop.

Calibration runs the model under a Lightning Trainer (``run_calibration``). This script checks that the
Trainer costs little over the bare loop it replaces: on the same model and the same windows it times
(a) a plain loop of ``token_loss_sum / total_target_tokens`` + ``backward`` with gradients accumulating,
and (b) ``run_calibration(..., CalibrationConfig("taylor"), DistributedConfig(accelerator="cpu"),
precision="32-true")``. Each method runs in its own subprocess (this script, re-spawned with the hidden
``--_worker`` flag, ``bench/common.py``) so that each has its own peak RSS. Results are printed and
written as markdown, with the ratios calibration/plain against the goals.

    python bench/calibration_overhead.py [--num_samples 16 --seq_len 128 --batch_size 4 --repeats 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

try:
    from bench import common
except ModuleNotFoundError:  # `python bench/calibration_overhead.py` without the repository on sys.path
    import common  # type: ignore[no-redef]

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gp_lightning.model.layout import ModelLayout

METHODS = ("plain", "calibration")
#: ``bench/speed.py`` section 5 also times the compensation step in these workers (not part of this report).
COMPENSATION = "compensation"
#: ... and section 7 the width search (``allocation: search``, default settings) of a 35% budget.
SEARCH = "search"
SEARCH_RATIO = 0.35
TIME_GOAL = 1 / 0.9  # calibration/plain wall time: Lightning keeps >= 90% of the plain loop's throughput
MEMORY_GOAL = 1.05  # calibration/plain peak RSS
Runs = dict[str, list[common.Row]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    common.add_calibration_arguments(parser, num_samples=16)
    parser.add_argument("--repeats", type=int, default=1, help="subprocess runs per method (medians reported)")
    common.add_output(parser, "calibration_overhead.md")
    common.add_worker_arguments(parser, choices=(*METHODS, COMPENSATION, SEARCH))
    return parser.parse_args(argv)


def _calibrate(method: str, model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int) -> int:
    """Run ``method`` once; the number of parameters that got gradients."""
    from gp_lightning.calibration.config import CalibrationConfig
    from gp_lightning.calibration.module import token_loss_sum
    from gp_lightning.calibration.run import run_calibration
    from gp_lightning.runtime.config import DistributedConfig

    if method == COMPENSATION:
        return _compensate(model, layout, windows, batch_size)
    if method == SEARCH:
        return _search(model, layout, windows, batch_size)
    if method == "plain":
        total_target_tokens = windows[:, 1:].numel()
        for batch in windows.split(batch_size):
            loss = token_loss_sum(model, batch) / total_target_tokens
            loss.backward()
        grad_params = sum(p.numel() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
        return grad_params
    with tempfile.TemporaryDirectory(prefix="calib-bench-") as root:
        run_calibration(model, layout, windows, batch_size, CalibrationConfig(importance_method="taylor"),
                        DistributedConfig(accelerator="cpu"), precision="32-true", run_dir=root, progress=False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _compensate(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int) -> int:
    """The default compensation (least squares, sequential, OBS) of a 20% plan on the same windows; the plan is
    selected from a data-free magnitude table before the clock starts, in :func:`worker`."""
    from gp_lightning.compensation.config import CompensationConfig
    from gp_lightning.compensation.run import compensate

    plan = model.gp_bench_plan
    result = compensate(model, layout, plan, windows, CompensationConfig(), batch_size)
    return sum(w.numel() for w in result.weights.values())


def _search(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, batch_size: int) -> int:
    """The width search with its default settings on the same windows, seeded from the magnitude table's plans (made
    before the clock starts, in :func:`worker`); the window passes its fitness ran."""
    from gp_lightning.compensation.config import CompensationConfig
    from gp_lightning.search.config import SearchConfig
    from gp_lightning.search.run import SearchInputs, search_allocation
    from gp_lightning.search.step import seeds

    table, config, target = model.gp_bench_table, model.gp_bench_selection, model.gp_bench_target
    starts = seeds(table, layout, config, model.gp_bench_plan, target)
    search = SearchConfig()
    with tempfile.TemporaryDirectory(prefix="search-bench-") as root:  # its Grams on disk, as in a run
        inputs = SearchInputs(model, layout, table, starts, windows[: -search.search_windows],
                              windows[-search.search_windows :], target, config, CompensationConfig(), search,
                              batch_size, state_path=Path(root) / "search_state.safetensors")
        return int(search_allocation(inputs).report["window_passes"])


def _magnitude_plan(model: nn.Module, layout: ModelLayout, ratio: float) -> None:
    """A plan of ``ratio`` from magnitude importance (no data), kept on the model with its table for
    :func:`_compensate` and :func:`_search`."""
    from gp_lightning.calibration.baselines import magnitude_importance
    from gp_lightning.selection.config import SelectionConfig
    from gp_lightning.selection.greedy import check_budget, select
    from gp_lightning.table.build import build_table, by_score

    table = by_score(build_table(layout, magnitude_importance(model, layout)))
    config = SelectionConfig(pruning_ratio=ratio)
    model.gp_bench_table, model.gp_bench_selection = table, config
    model.gp_bench_target = check_budget(layout, config)
    model.gp_bench_plan = select(table, layout, config).plan


def worker(method: str, spec: common.Row) -> common.Row:
    """Load model and windows, run one method once: the figures of that run."""
    import torch

    from gp_lightning.data.sources import load_text
    from gp_lightning.data.windows import calibration_windows, tokenize
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model
    from gp_lightning.search.config import SearchConfig

    torch.manual_seed(common.SEED)
    model, tokenizer = load_model(spec["model"], dtype=torch.float32)
    layout = describe(model)
    extra = SearchConfig().search_windows if method == SEARCH else 0  # the search's own windows, after the refit's
    windows = calibration_windows(tokenize(load_text(str(common.VALID), "calibration"), tokenizer),
                                  spec["num_samples"] + extra, spec["seq_len"], common.SEED)
    if method in (COMPENSATION, SEARCH):
        _magnitude_plan(model, layout, SEARCH_RATIO if method == SEARCH else 0.2)
    loaded_rss, loaded_peak = common.proc_status_mib("VmRSS"), common.peak_rss_mib()

    start, cpu_start, load_start = time.perf_counter(), common.cpu_seconds(), os.getloadavg()[0]
    steal_start = common.steal_seconds()
    grad_params = _calibrate(method, model, layout, windows, spec["batch_size"])
    seconds, cpu = time.perf_counter() - start, common.cpu_seconds() - cpu_start
    return {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "steal_seconds": common.steal_seconds() - steal_start,
        "loadavg": max(load_start, os.getloadavg()[0]),
        "loaded_rss_mib": loaded_rss,
        "loaded_peak_mib": loaded_peak,
        "peak_rss_mib": common.peak_rss_mib(),
        "grad_params": grad_params,
        "total_params": common.count_params(model),
        "threads": torch.get_num_threads(),
        "windows_checksum": int(windows.sum()),
    }


WORKERS: dict[str, Callable[[common.Row], common.Row]] = {method: partial(worker, method)
                                                          for method in (*METHODS, COMPENSATION, SEARCH)}


def measure(args: argparse.Namespace, env: Mapping[str, str] | None = None,
            methods: tuple[str, ...] = METHODS) -> Runs:
    """``args.repeats`` worker runs per method, in alternating order; each run with its order and the load."""
    spec = {key: getattr(args, key) for key in ("model", "num_samples", "seq_len", "batch_size")}
    runs: Runs = {method: [] for method in methods}
    for order, (repeat, method) in enumerate(common.alternating(methods, args.repeats)):
        common.log(f"calibration overhead, {method} run {repeat + 1}/{args.repeats}")
        before = common.loadavg()
        result = common.run_worker(__file__, method, spec, env)
        runs[method].append({**result, "order": order, "load_before": before, "load_after": common.loadavg()})
    return runs


def median_of(runs: list[common.Row], key: str) -> float:
    return common.median([run[key] for run in runs])


def report(args: argparse.Namespace, runs: Runs) -> str:
    """The markdown report: medians per method, the ratios against the goals, every run."""
    first = runs["plain"][0]
    checksums = {run["windows_checksum"] for method_runs in runs.values() for run in method_runs}
    lines = [
        "# Calibration overhead: Lightning `run_calibration` vs plain PyTorch loop",
        "",
        f"Settings: model `{args.model}`, {args.num_samples} samples x seq_len {args.seq_len}, batch size "
        f"{args.batch_size}, fp32 on CPU, torch threads {first['threads']}, {args.repeats} subprocess run(s) per "
        f"method (medians), text `{common.VALID.name}` (wikitext-2), seed {common.SEED}, "
        f"same windows in every run: {'yes' if len(checksums) == 1 else 'NO'}.",
        "",
        "| method | seconds | s/sample | peak RSS MiB | peak-over-loaded MiB | CPU seconds | load avg | params with grad |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, dict[str, float]] = {}
    for method in METHODS:
        seconds, peak = median_of(runs[method], "seconds"), median_of(runs[method], "peak_rss_mib")
        over = common.median([run["peak_rss_mib"] - run["loaded_rss_mib"] for run in runs[method]])
        cpu, load = median_of(runs[method], "cpu_seconds"), max(run["loadavg"] for run in runs[method])
        figures[method] = {"seconds": seconds, "peak": peak, "over": over, "cpu": cpu}
        grads = runs[method][0]["grad_params"] / 1e6
        total = runs[method][0]["total_params"] / 1e6
        per_sample = seconds / args.num_samples
        lines.append(f"| {method} | {seconds:.2f} | {per_sample:.3f} | {peak:.0f} | {over:.0f} | {cpu:.1f} | {load:.2f} | "
                     f"{grads:.1f}M / {total:.1f}M |")
    time_ratio = figures["calibration"]["seconds"] / figures["plain"]["seconds"]
    mem_ratio = figures["calibration"]["peak"] / figures["plain"]["peak"]
    over_ratio = figures["calibration"]["over"] / figures["plain"]["over"]
    cpu_ratio = figures["calibration"]["cpu"] / figures["plain"]["cpu"]
    lines += [
        "",
        "| ratio calibration/plain | value | goal | met |",
        "|---|---:|---:|---|",
        f"| time | {time_ratio:.3f} | <= {TIME_GOAL:.3f} | {'yes' if time_ratio <= TIME_GOAL else 'NO'} |",
        f"| peak RSS | {mem_ratio:.3f} | <= {MEMORY_GOAL:.2f} | {'yes' if mem_ratio <= MEMORY_GOAL else 'NO'} |",
        f"| peak-over-loaded | {over_ratio:.3f} | (info) | |",
        f"| CPU seconds | {cpu_ratio:.3f} | (info) | |",
        "",
        "Peak-over-loaded = peak RSS minus the RSS right after model load and windowing. Seconds are wall time of "
        "the measured section only (not model load); CPU seconds are user+sys of the worker over that section; "
        "load avg is the highest 1-minute load average seen at its start or end (above the thread count means other "
        "processes competed for the cores and the wall times are not clean). The plain loop keeps "
        "`requires_grad` as the model loads it (all parameters); the calibration's Taylor callback gives "
        "gradients to the projection weights of pruning units only.",
        "",
    ]
    every_run = [run for method_runs in runs.values() for run in method_runs]
    lines += ["Individual runs (in the order they ran; steal: CPU seconds the hypervisor gave other guests during "
              "the run, both vCPUs together):", "",
              "| method | seconds | CPU seconds | peak RSS MiB | load avg | steal s |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {run['method']} | {run['seconds']:.2f} | {run['cpu_seconds']:.1f} | {run['peak_rss_mib']:.0f} | "
              f"{run['loadavg']:.2f} | {run['steal_seconds']:.1f} |"
              for run in sorted(every_run, key=lambda run: run["order"])]
    lines.append("")
    load_peaks = [run for run in every_run if run["loaded_peak_mib"] >= run["peak_rss_mib"]]
    if load_peaks:
        lines += [f"Warning: in {len(load_peaks)} run(s) the peak RSS was reached while loading the model, not while "
                  "calibrating; peak RSS there measures loading.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if common.serve_worker(args, WORKERS):
        return
    common.publish(report(args, measure(args)), args.output)


if __name__ == "__main__":
    main()
