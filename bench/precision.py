"""Which precision calibrates fastest on this CPU: the measurement behind ``auto`` (runtime/machine.py).

``auto`` gives a one-process CPU run ``bf16-true`` where the CPU computes bf16 natively, and a distributed
or sharded CPU run (which needs float32 parameters) ``32-true`` rather than ``bf16-mixed``. This script
times Taylor calibration of the same windows under each precision, each run in its own subprocess
(``bench/common.py`` workers) in alternating order, and prints each precision's time as a ratio to
``32-true`` measured in the same script, with the machine kind it ran on.

    python bench/precision.py [--num_samples 8 --seq_len 128 --batch_size 4 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

try:
    from bench import common
except ModuleNotFoundError:  # `python bench/precision.py` without the repository on sys.path
    import common  # type: ignore[no-redef]

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    common.add_calibration_arguments(parser, num_samples=8)
    parser.add_argument("--repeats", type=int, default=3, help="subprocess runs per precision (medians reported)")
    common.add_threads(parser, None, "each calibration")
    common.add_output(parser, "precision.md")
    common.add_worker_arguments(parser, choices=PRECISIONS)
    return parser.parse_args(argv)


def worker(precision: str, spec: common.Row) -> common.Row:
    """Load the model in the precision's dtype and calibrate the windows once (Taylor): the seconds of that."""
    import torch

    from gp_lightning.calibration.config import CalibrationConfig
    from gp_lightning.calibration.run import run_calibration
    from gp_lightning.data.sources import load_text
    from gp_lightning.data.windows import calibration_windows, tokenize
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model
    from gp_lightning.runtime.config import DistributedConfig
    from gp_lightning.runtime.machine import detect
    from gp_lightning.runtime.precision import load_dtype

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model, tokenizer = load_model(spec["model"], dtype=load_dtype(precision))
    windows = calibration_windows(tokenize(load_text(str(common.VALID), "calibration"), tokenizer), spec["num_samples"],
                                  spec["seq_len"], common.SEED)
    start, cpu_start = time.perf_counter(), common.cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as root:
        run_calibration(model, describe(model), windows, spec["batch_size"], CalibrationConfig("taylor"),
                        DistributedConfig(accelerator="cpu"), precision=precision, run_dir=root, progress=False)
    return {"precision": precision, "seconds": time.perf_counter() - start, "cpu_seconds": common.cpu_seconds() - cpu_start,
            "loadavg": os.getloadavg()[0], "threads": torch.get_num_threads(), "machine": detect().kind}


WORKERS: dict[str, Callable[[common.Row], common.Row]] = {p: partial(worker, p) for p in PRECISIONS}


def report(args: argparse.Namespace, runs: dict[str, list[common.Row]]) -> str:
    base = common.median([run["seconds"] for run in runs["32-true"]])
    first = runs["32-true"][0]
    lines = ["# Calibration time by precision (Taylor, CPU)", "",
             f"Machine kind `{first['machine']}`, torch threads {first['threads']}, model `{args.model}`, "
             f"{args.num_samples} windows x {args.seq_len} tokens, batch {args.batch_size}, {args.repeats} subprocess "
             "run(s) per precision in alternating order (medians).", "",
             "| precision | seconds | ratio to 32-true | runs (s) | highest load |", "|---|---:|---:|---|---:|"]
    for precision in PRECISIONS:
        times = [run["seconds"] for run in runs[precision]]
        lines.append(f"| {precision} | {common.median(times):.2f} | {common.median(times) / base:.3f} | "
                     f"{', '.join(f'{t:.1f}' for t in times)} | {max(run['loadavg'] for run in runs[precision]):.2f} |")
    lines += ["", f"Command: `{common.command_line(__file__)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if common.serve_worker(args, WORKERS):
        return
    spec = {key: getattr(args, key) for key in ("model", "num_samples", "seq_len", "batch_size", "threads")}
    runs: dict[str, list[common.Row]] = {p: [] for p in PRECISIONS}
    for repeat, precision in common.alternating(PRECISIONS, args.repeats):
        common.log(f"{precision} run {repeat + 1}/{args.repeats}")
        runs[precision].append(common.run_worker(__file__, precision, spec))
    json_path = args.output.with_suffix(".json")
    common.publish(report(args, runs), args.output, runs, json_path)


if __name__ == "__main__":
    main()
