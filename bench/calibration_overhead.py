"""Overhead of Lightning-based Taylor calibration against a plain PyTorch forward+backward loop.

Calibration runs the model under a Lightning Trainer (``run_calibration``). This script checks that the
Trainer costs little over the bare loop it replaces: on the same model and the same windows it times
(a) a plain loop of ``token_loss_sum / total_target_tokens`` + ``backward`` with gradients accumulating,
and (b) ``run_calibration(precision="32-true", accelerator="cpu")``. Each method runs in its own
subprocess (this script, re-spawned with the hidden ``--_worker`` flag) so that each has its own peak
RSS. Results are printed and written as markdown, with the ratios calibration/plain against the goals.

    python bench/calibration_overhead.py [--num_samples 16 --seq_len 128 --batch_size 4 --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gp_lightning.runtime.io import write_text

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SEED = 42
METHODS = ("plain", "calibration")
TIME_GOAL = 1 / 0.9  # calibration/plain wall time: Lightning keeps >= 90% of the plain loop's throughput
MEMORY_GOAL = 1.05  # calibration/plain peak RSS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, HF directory or hub id")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="subprocess runs per method (medians reported)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "calibration_overhead.md",
                        help="markdown file (default: bench/results/calibration_overhead.md in the repo)")
    parser.add_argument("--_worker", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> None:
    """Load model and windows, run one method once, print one JSON line of figures."""
    import torch

    from gp_lightning.calibration.module import token_loss_sum
    from gp_lightning.calibration.run import run_calibration
    from gp_lightning.data.sources import load_text
    from gp_lightning.data.windows import calibration_windows, tokenize
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model

    torch.manual_seed(SEED)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    layout = describe(model)
    windows = calibration_windows(tokenize(load_text(str(TEXT), "calibration"), tokenizer), args.num_samples,
                                  args.seq_len, SEED)
    loaded_rss, loaded_peak = current_rss_mib(), peak_rss_mib()
    total_target_tokens = windows[:, 1:].numel()

    start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    if args._worker == "plain":
        for batch in windows.split(args.batch_size):
            loss = token_loss_sum(model, batch) / total_target_tokens
            loss.backward()
        grad_params = sum(p.numel() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    else:
        with tempfile.TemporaryDirectory(prefix="calib-bench-") as root:
            run_calibration(model, layout, windows, args.batch_size, precision="32-true", accelerator="cpu",
                            default_root_dir=root, progress=False)
        grad_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start

    print(json.dumps({
        "method": args._worker,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "loadavg": max(load_start, os.getloadavg()[0]),
        "loaded_rss_mib": loaded_rss,
        "loaded_peak_mib": loaded_peak,
        "peak_rss_mib": peak_rss_mib(),
        "grad_params": grad_params,
        "total_params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "windows_checksum": int(windows.sum()),
    }))


def run_worker(args: argparse.Namespace, method: str) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", method, "--model", args.model,
           "--num_samples", str(args.num_samples), "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"worker '{method}' failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"worker '{method}' printed no result:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> str:
    first = runs["plain"][0]
    checksums = {run["windows_checksum"] for method_runs in runs.values() for run in method_runs}
    lines = [
        "# Calibration overhead: Lightning `run_calibration` vs plain PyTorch loop",
        "",
        f"Settings: model `{args.model}`, {args.num_samples} samples x seq_len {args.seq_len}, batch size "
        f"{args.batch_size}, fp32 on CPU, torch threads {first['threads']}, {args.repeats} subprocess run(s) per "
        f"method (medians), text `{TEXT.name}` (wikitext-2), seed {SEED}, "
        f"same windows in every run: {'yes' if len(checksums) == 1 else 'NO'}.",
        "",
        "| method | seconds | s/sample | peak RSS MiB | peak-over-loaded MiB | CPU seconds | load avg | params with grad |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, dict[str, float]] = {}
    for method in METHODS:
        seconds, peak = median_of(runs[method], "seconds"), median_of(runs[method], "peak_rss_mib")
        over = statistics.median(run["peak_rss_mib"] - run["loaded_rss_mib"] for run in runs[method])
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
    lines += ["Individual runs (in the order they ran):", "", "| method | seconds | CPU seconds | peak RSS MiB | load avg |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {run['method']} | {run['seconds']:.2f} | {run['cpu_seconds']:.1f} | {run['peak_rss_mib']:.0f} | "
              f"{run['loadavg']:.2f} |" for run in sorted(every_run, key=lambda run: run["order"])]
    lines.append("")
    load_peaks = [run for run in every_run if run["loaded_peak_mib"] >= run["peak_rss_mib"]]
    if load_peaks:
        lines += [f"Warning: in {len(load_peaks)} run(s) the peak RSS was reached while loading the model, not while "
                  "calibrating; peak RSS there measures loading.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Through a temporary file in the same directory and a rename (``gp_lightning.runtime.io``)."""
    write_text(path, text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return
    runs: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]  # alternate, so drift does not favour one side
        for method in order:
            print(f"[{repeat + 1}/{args.repeats}] {method} ...", file=sys.stderr, flush=True)
            runs[method].append({**run_worker(args, method), "order": sum(map(len, runs.values()))})
    text = report(args, runs)
    print(text)
    write_atomic(args.output, text)


if __name__ == "__main__":
    main()
