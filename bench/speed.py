"""Speed and memory of gp-lightning against baselines measured in the same run (issue 7, speed half).

Why: pruning is only worth running if it is cheap next to what it replaces and if the pruned model is
really faster. Every figure here is a RATIO against a baseline measured in this very run, on this
machine, under the same load, so the figures stay meaningful on a shared or slow CPU:

1. calibration: Lightning ``run_calibration`` (Taylor) vs a plain forward+backward loop over the same
   windows (throughput goal >= 0.9x, peak RSS goal <= 1.05x). Reuses ``bench/calibration_overhead.py``
   (its workers and its report), one subprocess per method and repeat, alternating order.
2. table + normalization + selection on synthetic Llama-3-70B / 8B shaped tables (layout from a
   meta-device ``LlamaConfig`` model via ``describe_checkpoint``, random positive importances), timed
   stage by stage (``build_table``, ``transform_table`` with clip 5/95 + log per layer, ``by_score``,
   ``select`` at 20% with ``SelectionConfig``'s default constraints) on ONE thread: a subprocess with
   OMP/MKL/OpenBLAS threads 1 and ``torch.set_num_threads(1)``. Goal: total <= 2 s. When missed, the
   worker profiles one repetition with cProfile and the report lists what dominates.
3. surgery on SmolLM2-135M at 20%: in-memory (``load_model`` + ``apply_plan`` + ``save_pruned``) vs
   streamed (``stream_prune`` from the safetensors), each in its own subprocess, peak RSS (VmHWM) and
   peak over the RSS before loading; ratio streamed/in-memory. Both outputs are compared tensor by tensor.
4. inference of SmolLM2-135M, dense vs pruned at 20% and 50% of all parameters (Taylor on 16 windows,
   calibrated once with ``table_only`` and re-selected with ``from_table``): prefill tokens/s (1 x 512
   and 8 x 128 tokens, no grad, no cache) and greedy decode tokens/s (``generate``, 64 new tokens,
   KV cache on). The three models live in one process and are timed interleaved (dense, 20%, 50%,
   dense, ...) after a warm-up, so load drift hits them alike; medians of the repeats.
5. compensation vs calibration on SmolLM2-135M: the default compensation (least squares, sequential, OBS
   within layer) of a 20% plan against Taylor calibration (``run_calibration``), the same 32 x 128 windows
   (the quality benchmark's calibration set: the compensation's per-layer solves do not grow with the windows,
   so fewer windows favour calibration),
   each in its own subprocess of ``bench/calibration_overhead.py``'s worker (the plan comes from a data-free
   magnitude table, selected before the clock starts). Goals: time <= 0.6x, peak RSS <= 1.1x.
6. llama.cpp (built by ``make llamacpp``): prefill and decode tokens/s of ``llama-bench`` on f16 GGUFs of
   SmolLM2-135M dense and pruned 20% / 50% (the section 3/4 table; ``export-gguf``, llama.cpp's ``deci``
   architecture), interleaved rounds (dense, 20%, 50%, ...), medians; ``--threads`` llama.cpp threads.
7. search vs calibration on SmolLM2-135M: ``allocation: search`` with its default settings (35% budget, seeds from a
   data-free magnitude table) against Taylor calibration on the same 32 windows, as section 5 does. Goals: time
   <= 10x, peak RSS <= 1.5x (issue 29).

Bounded settings (the whole run takes ~10-20 minutes on 2 CPU cores, depending on other load; the
limit is 30): SmolLM2-135M in float32, 16 calibration windows x 128 tokens (batch 4), 2 runs per
calibration method, 5 timed repetitions of the table stages per shape, 3 subprocess runs per surgery
variant, 5 timed inference repetitions, 64 decoded tokens. Sections 1, 3 and 4 run their workers with
ONE torch/OpenMP thread (``--threads``): on a CPU shared with other jobs, two-thread OpenMP regions
stall whenever one of their threads is descheduled, which made timings swing by 2-3x in trials, while
single-thread ratios stay stable. The 1/5/15-minute load average is recorded at every measurement.

    python bench/speed.py [--sections 1 2 3 4 5 6 7] [--threads 1] [--output bench/results/speed.md]

Writes ``bench/results/speed.md`` (and ``speed.json`` with every raw figure) atomically.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from bench import calibration_overhead, common
except ModuleNotFoundError:  # `python bench/speed.py` without the repository on sys.path
    import calibration_overhead  # type: ignore[no-redef]
    import common  # type: ignore[no-redef]

from gp_lightning.runtime.io import write_text

if TYPE_CHECKING:
    import torch

    from gp_lightning.calibration.units import UnitImportance
    from gp_lightning.model.layout import ModelLayout

MODEL = common.DEFAULT_MODEL
Row = common.Row

# goals
CALIBRATION_THROUGHPUT_GOAL = 0.9  # calibration/plain samples per second, at least
CALIBRATION_MEMORY_GOAL = 1.05  # calibration/plain peak RSS, at most
TABLE_SECONDS_GOAL = 2.0  # build + transform + rank + select on one core, at most
COMPENSATION_TIME_GOAL = 0.6  # compensation/calibration seconds, at most (0.5 until issue 29 accepted 0.6)
COMPENSATION_MEMORY_GOAL = 1.1  # compensation/calibration peak RSS, at most
SEARCH_TIME_GOAL = 10.0  # search/calibration seconds, at most (issue 29)
SEARCH_MEMORY_GOAL = 1.5  # search/calibration peak RSS, at most
COMPENSATION_WINDOWS = 32  # section 5: bench/quality.py's calibration windows

#: Llama-3 shapes (published configs); the layout is read from a meta-device model of each.
SHAPES: dict[str, dict[str, Any]] = {"llama3-70b": common.LLAMA3["Llama-3-70B"], "llama3-8b": common.LLAMA3["Llama-3-8B"]}
#: Table step 2 and 1 as the guides use them (the heavier transform path).
TRANSFORMS = {"clip_percentile_low": 5.0, "clip_percentile_high": 95.0, "normalization": "log",
              "normalization_level": "layer"}
#: ``SelectionConfig``'s default constraints (every layer keeps one group and one channel), spelled out for the report.
DEFAULT_CONSTRAINTS = {"min_attention_groups": 1, "min_mlp_channels": 1}
ONE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7],
                        choices=[1, 2, 3, 4, 5, 6, 7])
    common.add_threads(parser, 1, "the calibration, surgery and inference workers")
    parser.add_argument("--calibration_repeats", type=int, default=2, help="subprocess runs per calibration method")
    parser.add_argument("--compensation_windows", type=int, default=COMPENSATION_WINDOWS,
                        help="sections 5 and 7: calibration windows of 128 tokens (the goals are set on the quality "
                             "benchmark's 32; the compensation's per-layer solves do not grow with them)")
    parser.add_argument("--table_repeats", type=int, default=5, help="timed repetitions per table shape")
    parser.add_argument("--surgery_repeats", type=int, default=3, help="subprocess runs per surgery variant")
    parser.add_argument("--inference_repeats", type=int, default=5, help="timed repetitions per model and workload")
    parser.add_argument("--decode_tokens", type=int, default=64)
    common.add_output(parser, "speed.md")
    common.add_worker_arguments(parser)
    return parser.parse_args(argv)


def run_worker(name: str, spec: Row, env: dict[str, str] | None = None) -> Row:
    """This script as worker ``name`` in a fresh process (``bench/common.py``)."""
    return common.run_worker(__file__, name, spec, env)


# -- section 1: calibration overhead (bench/calibration_overhead.py) -------------------------------------
def section_calibration(args: argparse.Namespace) -> Row:
    """Its workers, with ``--threads`` OpenMP/MKL threads in their environment, and its report."""
    co_args = calibration_overhead.parse_args(["--model", MODEL, "--num_samples", "16", "--seq_len", "128",
                                               "--batch_size", "4", "--repeats", str(args.calibration_repeats)])
    runs = calibration_overhead.measure(co_args, env={name: str(args.threads) for name in ONE_THREAD_ENV})
    plain_s, calib_s = (common.median([r["seconds"] for r in runs[m]]) for m in ("plain", "calibration"))
    plain_peak, calib_peak = (common.median([r["peak_rss_mib"] for r in runs[m]]) for m in ("plain", "calibration"))
    return {"runs": runs, "report": calibration_overhead.report(co_args, runs), "throughput_ratio": plain_s / calib_s,
            "memory_ratio": calib_peak / plain_peak, "plain_seconds": plain_s, "calibration_seconds": calib_s,
            "plain_peak_mib": plain_peak, "calibration_peak_mib": calib_peak}


# -- sections 5 and 7: compensation and search vs calibration ---------------------------------------------
#: Per step timed against calibration: its section, its goals (time, peak RSS, as ratios) and what it runs.
AGAINST_CALIBRATION: dict[str, tuple[int, float, float, str]] = {
    calibration_overhead.COMPENSATION: (5, COMPENSATION_TIME_GOAL, COMPENSATION_MEMORY_GOAL,
                                        "`compensate` with the default settings (least squares, sequential, OBS within "
                                        "layer, held-out refit choice) of a 20% plan"),
    calibration_overhead.SEARCH: (7, SEARCH_TIME_GOAL, SEARCH_MEMORY_GOAL,
                                  "`search_allocation` (allocation: search) with the default settings of a "
                                  f"{calibration_overhead.SEARCH_RATIO:.0%} budget, seeded from a magnitude table"),
}


def section_against_calibration(args: argparse.Namespace, step: str) -> Row:
    """Calibration and ``step`` in the calibration-overhead workers, alternating, medians."""
    co_args = calibration_overhead.parse_args(["--model", MODEL, "--num_samples", str(args.compensation_windows),
                                               "--seq_len", "128", "--batch_size", "4",
                                               "--repeats", str(args.calibration_repeats)])
    methods = ("calibration", step)
    runs = calibration_overhead.measure(co_args, {name: str(args.threads) for name in ONE_THREAD_ENV}, methods)
    figures = {m: {key: common.median([r[key] for r in runs[m]]) for key in ("seconds", "peak_rss_mib", "loaded_rss_mib")}
               for m in methods}
    return {"runs": runs, "figures": figures, "step": step}


def report_against_calibration(args: argparse.Namespace, comp: Row, goals: list[str]) -> list[str]:
    """Sections 5 and 7: a step's cost as ratios to the calibration's."""
    step = comp["step"]
    section, time_goal, memory_goal, what = AGAINST_CALIBRATION[step]
    cal, com = comp["figures"]["calibration"], comp["figures"][step]
    time_ratio, memory_ratio = com["seconds"] / cal["seconds"], com["peak_rss_mib"] / cal["peak_rss_mib"]
    quality_set = args.compensation_windows == COMPENSATION_WINDOWS  # the goals hold on this set only

    def met(ok: bool) -> str:
        return yes(ok) if quality_set else f"(info: {args.compensation_windows} windows)"

    goals.append(f"| {section} | {step} / calibration time | {time_ratio:.3f}x | <= {time_goal}x | "
                 f"{met(time_ratio <= time_goal)} |")
    goals.append(f"| {section} | {step} / calibration peak RSS | {memory_ratio:.2f}x | <= {memory_goal}x | "
                 f"{met(memory_ratio <= memory_goal)} |")
    windows_note = " (the quality benchmark's calibration set)" if quality_set else " (not the goal's 32)"
    body = [f"## {section}. {step.capitalize()} vs calibration", "",
            f"{MODEL} float32, {args.compensation_windows} windows x 128 tokens{windows_note}, "
            f"batch 4, {args.calibration_repeats} subprocess runs per step "
            f"(alternating, medians), torch/OpenMP threads {args.threads}. Calibration: `run_calibration` (Taylor). "
            f"{step.capitalize()}: {what}. Seconds: the step only (not loading); peak RSS: the worker's VmHWM.", "",
            "| step | seconds | peak RSS MiB | RSS after load MiB |", "|---|---:|---:|---:|"]
    for name, fig in comp["figures"].items():
        body.append(f"| {name} | {fig['seconds']:.2f} | {fig['peak_rss_mib']:.0f} | {fig['loaded_rss_mib']:.0f} |")
    ordered = sorted((run for rs in comp["runs"].values() for run in rs), key=lambda run: run["order"])
    pairs = adjacent_ratios(ordered, step)
    if pairs:
        body += ["", f"Time ratio of each {step} run to the calibration run next to it (the machine's speed drifts "
                 f"between runs): {', '.join(f'{r:.2f}' for r in pairs)}."]
    body += ["", "Runs, in the order they ran (steal: CPU seconds the hypervisor gave other guests meanwhile, both "
             "vCPUs): " + "; ".join(f"{run['method']} {run['seconds']:.1f} s / {run['peak_rss_mib']:.0f} MiB "
                                     f"(load {run['loadavg']:.2f}, steal {run['steal_seconds']:.1f} s)"
                                     for run in ordered), ""]
    return body


def adjacent_ratios(ordered: list[Row], step: str) -> list[float]:
    """``step`` / calibration seconds for each ``step`` run (``ordered``: every run, in run order) and the calibration
    run just before or after it (the alternating order pairs them)."""
    ratios = []
    for i, run in enumerate(ordered):
        if run["method"] != step:
            continue
        near = [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered) and ordered[j]["method"] == "calibration"]
        if near:
            ratios.append(run["seconds"] / near[0]["seconds"])
    return ratios


# -- section 2: table + normalization + selection on big synthetic tables ---------------------------------
def synthetic_importance(layout: ModelLayout) -> UnitImportance:
    """Taylor-like importances for every unit of ``layout``: positive, spread over orders of magnitude, seeded."""
    import torch

    from gp_lightning.calibration.units import UnitImportance

    generator = torch.Generator().manual_seed(common.SEED)

    def positive(n: int) -> torch.Tensor:
        return torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * 2.0)

    return UnitImportance({layer.index: positive(layer.num_kv_heads) for layer in layout.layers},
                          {layer.index: positive(layer.intermediate_size) for layer in layout.layers})


Stages = Callable[[], tuple[dict[str, float], dict[str, float], dict[str, Any]]]


def table_stages(layout: ModelLayout, importance: UnitImportance, ratio: float) -> Stages:
    """One call runs build, transform, rank and select once: (wall seconds, CPU seconds, output) per stage."""
    from gp_lightning.selection.config import SelectionConfig
    from gp_lightning.selection.greedy import select
    from gp_lightning.table.build import build_table, by_score
    from gp_lightning.table.config import TableConfig
    from gp_lightning.table.transforms import transform_table

    transforms = TableConfig(**TRANSFORMS)
    selection = SelectionConfig(pruning_ratio=ratio, **DEFAULT_CONSTRAINTS)

    def stages() -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        out: dict[str, Any] = {}
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("build", lambda: build_table(layout, importance)),
            ("transform", lambda: transform_table(out["build"], transforms, layout.num_layers)[0]),
            ("rank", lambda: by_score(out["transform"])),
            ("select", lambda: select(out["rank"], layout, selection)),
        ]
        for name, step in steps:
            start, cpu_start = time.perf_counter(), time.process_time()
            out[name] = step()
            wall[name], cpu[name] = time.perf_counter() - start, time.process_time() - cpu_start
        return wall, cpu, out

    return stages


def worker_table(spec: Row) -> Row:
    """Time the table stages on one Llama-3 shape, on one thread; profile them when the goal is missed."""
    import torch

    torch.set_num_threads(1)
    import numpy as np

    layout = common.meta_layout(SHAPES[spec["shape"]])  # meta-device model: shapes only, no weights
    stages = table_stages(layout, synthetic_importance(layout), spec["ratio"])
    stages()  # warm-up: imports, allocator, pandas caches
    load_start = common.loadavg()
    walls, cpus = [], []
    for _ in range(spec["repeats"]):
        wall, cpu, out = stages()
        walls.append(wall)
        cpus.append(cpu)
    load_end = common.loadavg()
    names = list(walls[0])
    selection = out["select"]
    result: Row = {
        "shape": spec["shape"], "units": len(out["build"]), "layers": layout.num_layers,
        "total_params": layout.total_params, "prunable_params": layout.prunable_params,
        "attention_group_cost": layout.attention_group_cost(layout.layers[0]),
        "mlp_channel_cost": layout.mlp_channel_cost(layout.layers[0]),
        "chosen_units": len(selection.pruned), "achieved_ratio": selection.ratio,
        "wall": {n: common.median([w[n] for w in walls]) for n in names},
        "cpu": {n: common.median([c[n] for c in cpus]) for n in names},
        "total_wall": common.median([sum(w.values()) for w in walls]),
        "total_cpu": common.median([sum(c.values()) for c in cpus]),
        "all_totals": [sum(w.values()) for w in walls],
        "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
        "load_start": load_start, "load_end": load_end, "peak_rss_mib": common.proc_status_mib("VmHWM"),
    }
    if result["total_wall"] > TABLE_SECONDS_GOAL or spec.get("profile"):
        result["profile"] = profile_table(stages)
    return result


def profile_table(stages: Stages, top: int = 14) -> list[Row]:
    """cProfile one repetition; the functions with the most own time, as rows."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    stages()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, func), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = path.split("site-packages/")[-1].replace(str(common.REPO) + "/", "")
        rows.append({"function": f"{where}:{line}({func})", "calls": calls, "own_s": own, "cumulative_s": cumulative})
    rows.sort(key=lambda row: row["own_s"], reverse=True)
    return rows[:top]


def section_table(args: argparse.Namespace) -> Row:
    results = {}
    for shape in SHAPES:
        common.log(f"section 2: table + selection, {shape}, one thread")
        results[shape] = run_worker("table", {"shape": shape, "ratio": 0.2, "repeats": args.table_repeats},
                                    env=ONE_THREAD_ENV)
    return results


# -- shared by sections 3 and 4: a Taylor table of SmolLM2 --------------------------------------------------
def worker_calibrate(spec: Row) -> Row:
    """The Taylor table (``oneshot`` with ``table_only``) and the 20% plan selected from it."""
    import torch

    torch.set_num_threads(spec["threads"])
    from gp_lightning.model.source import local_checkpoint_dir
    from gp_lightning.model.weights import describe_checkpoint
    from gp_lightning.pipeline import oneshot
    from gp_lightning.selection.config import SelectionConfig
    from gp_lightning.selection.greedy import select

    start = time.perf_counter()
    run = oneshot(model=MODEL, pruning_ratio=0.2, dataset=str(common.VALID), eval_dataset=str(common.TEST), num_samples=16,
                  table_only=True, test_before_prune=False, test_after_prune=False, save_model=False,
                  output=spec["output"], overwrite=True)
    seconds = time.perf_counter() - start
    layout = describe_checkpoint(local_checkpoint_dir(MODEL))
    selection = select(run.table, layout, SelectionConfig(pruning_ratio=0.2, **DEFAULT_CONSTRAINTS))
    plan_path = Path(spec["output"]) / "plan-0.2.json"
    write_text(plan_path, selection.plan.to_json())
    return {"seconds": seconds, "table": str(Path(spec["output"]) / "global_group_table.csv"), "plan": str(plan_path),
            "achieved_ratio": selection.ratio, "units": len(run.table)}


# -- section 3: surgery, in memory vs streamed ---------------------------------------------------------------
def worker_surgery(spec: Row) -> Row:
    import torch

    torch.set_num_threads(spec["threads"])
    from gp_lightning.export.checkpoint import save_pruned
    from gp_lightning.model.layout import describe
    from gp_lightning.model.source import load_model, local_checkpoint_dir
    from gp_lightning.model.weights import describe_checkpoint
    from gp_lightning.selection.plan import PruningPlan
    from gp_lightning.surgery.in_memory import apply_plan
    from gp_lightning.surgery.streamed import stream_prune

    plan = PruningPlan.from_json(Path(spec["plan"]).read_text(encoding="utf-8"))
    provenance = {"base_model": MODEL, "pruning_ratio": 0.2, "bench": "speed"}
    output = Path(spec["output"])
    baseline_rss = common.proc_status_mib("VmRSS")  # everything imported, nothing loaded
    load_start, cpu_start = common.loadavg(), common.cpu_seconds()
    phases: dict[str, float] = {}
    start = time.perf_counter()
    if spec["variant"] == "in_memory":
        model, _ = load_model(MODEL, dtype=torch.float32)
        layout = describe(model)
        phases["load_s"] = time.perf_counter() - start
        pruned = apply_plan(model, layout, plan, provenance)
        phases["apply_plan_s"] = time.perf_counter() - start - phases["load_s"]
        save_pruned(pruned, None, output)
        phases["save_s"] = time.perf_counter() - start - phases["load_s"] - phases["apply_plan_s"]
    else:
        source = local_checkpoint_dir(MODEL)
        layout = describe_checkpoint(source)
        stream_prune(source, layout, plan, provenance, output, max_shard_size=spec["max_shard_size"])
    seconds, cpu = time.perf_counter() - start, common.cpu_seconds() - cpu_start
    peak = common.proc_status_mib("VmHWM")
    written = sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**20
    result = {"variant": spec["variant"], "label": spec["label"], "seconds": seconds, "phases": phases,
              "cpu_seconds": cpu, "baseline_rss_mib": baseline_rss, "peak_rss_mib": peak,
              "peak_over_baseline_mib": peak - baseline_rss, "written_mib": written,
              "load_start": load_start, "load_end": common.loadavg()}
    if spec["variant"] == "in_memory" and spec.get("profile"):  # after the peak was read: it does not count
        del pruned
        result["apply_plan_profile"] = profile_apply_plan(lambda: apply_plan(model, layout, plan, provenance))
    return result


def profile_apply_plan(call: Callable[[], Any]) -> dict[str, float]:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(call)
    total = time.perf_counter() - start
    own = {func: stat[2] for (_, _, func), stat in pstats.Stats(profiler).stats.items()}  # type: ignore[attr-defined]
    init = sum(seconds for func, seconds in own.items() if "normal_" in func or "uniform_" in func)
    return {"total_s": total, "init_s": init,
            "index_select_s": sum(seconds for func, seconds in own.items() if "index_select" in func)}


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


SURGERY_VARIANTS = (
    ("in_memory", "in-memory (load_model + apply_plan + save_pruned)", None),
    ("streamed", "streamed (stream_prune, max_shard_size 5GB = default)", "5GB"),
    ("streamed", "streamed (stream_prune, max_shard_size 64MB)", "64MB"),
)


def section_surgery(args: argparse.Namespace, prepared: Row, scratch: Path) -> Row:
    runs: list[Row] = []
    outputs: dict[str, Path] = {}
    for repeat, (variant, label, shard) in common.alternating(SURGERY_VARIANTS, args.surgery_repeats):
        common.log(f"section 3: surgery, {label}, run {repeat + 1}/{args.surgery_repeats}")
        output = scratch / f"surgery-{len(runs)}"
        runs.append(run_worker("surgery", {"variant": variant, "label": label, "max_shard_size": shard,
                                           "plan": prepared["plan"], "output": str(output),
                                           "threads": args.threads, "profile": repeat == 0}))
        outputs.setdefault(label, output)
    labels = [label for _, label, _ in SURGERY_VARIANTS]
    figures = {}
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        figures[label] = {key: common.median([run[key] for run in mine]) for key in
                          ("seconds", "cpu_seconds", "peak_rss_mib", "peak_over_baseline_mib", "baseline_rss_mib",
                           "written_mib")}
        figures[label]["phases"] = {key: common.median([run["phases"][key] for run in mine]) for key in mine[0]["phases"]}
        figures[label]["load"] = max(max(run["load_start"][0], run["load_end"][0]) for run in mine)
    reference = outputs[labels[0]]
    identical = {label: same_tensors(reference, outputs[label]) for label in labels[1:]}
    return {"runs": runs, "figures": figures, "identical": identical, "labels": labels}


# -- section 4: inference, dense vs pruned -------------------------------------------------------------------
def worker_inference(spec: Row) -> Row:
    import torch

    torch.set_num_threads(spec["threads"])
    from gp_lightning.data.sources import load_text
    from gp_lightning.data.windows import calibration_windows, tokenize
    from gp_lightning.model.source import load_model
    from gp_lightning.pipeline import oneshot

    dense, tokenizer = load_model(MODEL, dtype=torch.float32)
    models: dict[str, torch.nn.Module] = {"dense": dense.eval()}
    for ratio in spec["ratios"]:
        run = oneshot(model=MODEL, pruning_ratio=ratio, from_table=spec["table"], dataset=str(common.VALID),
                      eval_dataset=str(common.TEST), test_before_prune=False, test_after_prune=False, save_model=False,
                      output=str(Path(spec["output"]) / f"pruned-{ratio}"), overwrite=True)
        models[f"pruned {ratio:.0%}"] = run.pruned_model.eval()
    params = {name: common.count_params(model) for name, model in models.items()}

    tokens = tokenize(load_text(str(common.VALID), "evaluation"), tokenizer)
    inputs = {"prefill 1x512": calibration_windows(tokens, 1, 512, common.SEED),
              "prefill 8x128": calibration_windows(tokens, 8, 128, common.SEED)}
    prompt = calibration_windows(tokens, 1, 16, common.SEED + 1)
    new_tokens = spec["decode_tokens"]
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None)

    def prefill(model: torch.nn.Module, ids: torch.Tensor) -> int:
        model(input_ids=ids, use_cache=False)
        return ids.numel()

    def decode(model: torch.nn.Module) -> int:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
        return int(out.shape[1] - prompt.shape[1])

    workloads: dict[str, Callable[[torch.nn.Module], int]] = {
        **{name: (lambda model, ids=ids: prefill(model, ids)) for name, ids in inputs.items()},
        f"decode 1x{new_tokens} (greedy, KV cache)": decode,
    }
    times: dict[str, dict[str, list[float]]] = {w: {m: [] for m in models} for w in workloads}
    counts: dict[str, int] = {}
    loads: list[list[float]] = []
    with torch.inference_mode():
        for repeat in range(spec["repeats"] + 1):  # repeat 0 is the warm-up
            loads.append(common.loadavg())
            for workload, fn in workloads.items():
                for name, model in models.items():
                    start = time.perf_counter()
                    counts[workload] = fn(model)
                    if repeat:
                        times[workload][name].append(time.perf_counter() - start)
    loads.append(common.loadavg())
    return {"params": params, "times": times, "counts": counts, "loads": loads, "threads": torch.get_num_threads(),
            "prompt_tokens": int(prompt.shape[1])}


def section_inference(args: argparse.Namespace, prepared: Row, scratch: Path) -> Row:
    common.log("section 4: inference, dense vs pruned 20% / 50% (one process, interleaved)")
    return run_worker("inference", {"ratios": [0.2, 0.5], "table": prepared["table"], "output": str(scratch),
                                    "threads": args.threads, "repeats": args.inference_repeats,
                                    "decode_tokens": args.decode_tokens})


# -- section 6: llama.cpp, dense vs pruned ------------------------------------------------------------------
def worker_llamacpp(spec: Row) -> Row:
    """f16 GGUFs of the dense and pruned models, then ``llama-bench`` rounds over them, interleaved."""
    from gp_lightning.export import llamacpp_run
    from gp_lightning.export.gguf_writer import export_gguf
    from gp_lightning.export.llamacpp_build import require
    from gp_lightning.model.source import fetch_embedded
    from gp_lightning.pipeline import oneshot
    from gp_lightning.runtime.machine import detect

    cpp = require()
    out = Path(spec["output"])
    files = {"dense": export_gguf(fetch_embedded(MODEL), out / "dense-f16.gguf", "f16").path}
    for ratio in spec["ratios"]:
        run = oneshot(model=MODEL, pruning_ratio=ratio, from_table=spec["table"], dataset=str(common.VALID),
                      eval_dataset=str(common.TEST), test_before_prune=False, test_after_prune=False,
                      export_gguf="f16", output=str(out / f"gguf-{ratio}"), overwrite=True)
        files[f"pruned {ratio:.0%}"] = run.run_dir / "model.gguf"
    sizes = {name: path.stat().st_size for name, path in files.items()}
    rates: dict[str, dict[str, list[float]]] = {"prefill": {n: [] for n in files}, "decode": {n: [] for n in files}}
    loads = []
    for _ in range(spec["rounds"]):
        loads.append(common.loadavg())
        for name, path in files.items():
            for key, value in llamacpp_run.speed(cpp, path, spec["prompt_tokens"], spec["new_tokens"], spec["threads"],
                                                 repetitions=2).items():
                rates[key][name].append(value)
    loads.append(common.loadavg())
    return {"sizes": sizes, "rates": rates, "loads": loads, "threads": spec["threads"],
            "prompt_tokens": spec["prompt_tokens"], "new_tokens": spec["new_tokens"],
            "flags": " ".join(detect().llamacpp_bench_flags()) or "none"}


def section_llamacpp(args: argparse.Namespace, prepared: Row, scratch: Path) -> Row:
    common.log("section 6: llama.cpp, dense vs pruned 20% / 50% (f16 GGUF, llama-bench, interleaved)")
    return run_worker("llamacpp", {"ratios": [0.2, 0.5], "table": prepared["table"], "output": str(scratch),
                                   "threads": args.threads, "rounds": 3, "prompt_tokens": 128,
                                   "new_tokens": args.decode_tokens})


def report_llamacpp(args: argparse.Namespace, cpp: Row, goals: list[str]) -> list[str]:
    """Section 6: llama.cpp tokens/s as ratios to the dense GGUF's."""
    names = list(cpp["sizes"])
    body = ["## 6. llama.cpp: dense vs pruned (f16 GGUF)", "",
            f"`llama-bench` (llama.cpp b11434, built from the PyPI sdist by `make llamacpp`), {cpp['threads']} thread(s), "
            f"prefill = pp{cpp['prompt_tokens']}, decode = tg{cpp['new_tokens']}, 2 repetitions per call, "
            f"{len(cpp['loads']) - 1} interleaved rounds, medians, run flags: {cpp.get('flags', 'none')}. "
            "Load average at each round: "
            f"{', '.join(fmt_load(x) for x in cpp['loads'])}.", "",
            "| model | GGUF MB | prefill tok/s | vs dense | decode tok/s | vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        cells = []
        for key in ("prefill", "decode"):
            rate, dense = common.median(cpp["rates"][key][name]), common.median(cpp["rates"][key]["dense"])
            cells.append(f"{rate:.0f} | {rate / dense:.2f}x")
        body.append(f"| {name} | {cpp['sizes'][name] / 1e6:.0f} | " + " | ".join(cells) + " |")
    for name in names[1:]:
        ratios = [common.median(cpp["rates"][k][name]) / common.median(cpp["rates"][k]["dense"]) for k in cpp["rates"]]
        goals.append(f"| 6 | llama.cpp {name} / dense tokens/s (prefill, decode) | "
                     f"{', '.join(f'{r:.2f}x' for r in ratios)} | > 1x (speed-up expected) | "
                     f"{yes(all(r > 1 for r in ratios))} |")
    body.append("")
    return body


# -- report --------------------------------------------------------------------------------------------------
def yes(met: bool) -> str:
    return "yes" if met else "**NO**"


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def report_calibration(args: argparse.Namespace, cal: Row, goals: list[str]) -> list[str]:
    """Section 1: the ratios against the goals, and calibration_overhead.py's own report."""
    body: list[str] = []
    thr, mem = cal["throughput_ratio"], cal["memory_ratio"]
    cpu_thr = common.median([r["cpu_seconds"] for r in cal["runs"]["plain"]]) / common.median(
        [r["cpu_seconds"] for r in cal["runs"]["calibration"]])
    goals += [f"| 1 | calibration throughput / plain loop: wall (CPU time) | {thr:.3f}x ({cpu_thr:.3f}x) | "
              f">= {CALIBRATION_THROUGHPUT_GOAL}x | "
              f"{yes(thr >= CALIBRATION_THROUGHPUT_GOAL)} |",
              f"| 1 | calibration peak RSS / plain loop | {mem:.3f}x | <= {CALIBRATION_MEMORY_GOAL}x | "
              f"{yes(mem <= CALIBRATION_MEMORY_GOAL)} |"]
    loads = [(run["load_before"], run["load_after"]) for runs in cal["runs"].values() for run in runs]
    body += ["## 1. Calibration vs a plain forward+backward loop", "",
             f"Throughput ratio = plain seconds / calibration seconds = {cal['plain_seconds']:.2f} / "
             f"{cal['calibration_seconds']:.2f} = **{thr:.3f}x** (goal >= {CALIBRATION_THROUGHPUT_GOAL}x); peak RSS "
             f"ratio = {cal['calibration_peak_mib']:.0f} / {cal['plain_peak_mib']:.0f} MiB = **{mem:.3f}x** (goal <= "
             f"{CALIBRATION_MEMORY_GOAL}x). Measured by `bench/calibration_overhead.py`'s workers (its report "
             f"follows, one heading level down; OMP/MKL threads {args.threads} in its workers' environment). "
             "Load average (1/5/15 min) before/after "
             "each run: " + ", ".join(f"{fmt_load(a)} -> {fmt_load(b)}" for a, b in loads) + ".", "",
             cal["report"].replace("# Calibration overhead", "### Calibration overhead"), ""]
    return body


def report_table(args: argparse.Namespace, tables: Row, goals: list[str]) -> list[str]:
    """Section 2: the stage timings per shape, and a profile where the goal was missed."""
    body = ["## 2. Table + normalization + selection on Llama-3-shaped tables (one thread)", "",
             "Layout from a meta-device `LlamaConfig` model (`describe_checkpoint`), unit costs from the shapes; "
             "importances log-normal (positive, seeded). Stages: `build_table`; `transform_table` with "
             f"{', '.join(f'{k}={v}' for k, v in TRANSFORMS.items())}; `by_score`; `select` at pruning_ratio 0.2 with "
             f"{', '.join(f'{k}={v}' for k, v in DEFAULT_CONSTRAINTS.items())} (the config defaults). Subprocess "
             "with OMP/MKL/OpenBLAS threads 1 and `torch.set_num_threads(1)`; one warm-up, then medians of "
             f"{args.table_repeats} repetitions. CPU = process CPU seconds (user+sys) of the stage: CPU <= wall "
             "confirms one core; wall well above CPU means the core was shared.", "",
             "| shape | units | params | group / channel cost | build s | transform s | rank s | select s | "
             "total wall s | total CPU s | goal | met | load at start / end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for shape, res in tables.items():
        wall = res["wall"]
        met = res["total_wall"] <= TABLE_SECONDS_GOAL
        body.append(f"| {shape} | {res['units']:,} | {res['total_params'] / 1e9:.2f}B | "
                    f"{res['attention_group_cost']:,} / {res['mlp_channel_cost']:,} | {wall['build']:.3f} | "
                    f"{wall['transform']:.3f} | {wall['rank']:.3f} | {wall['select']:.3f} | "
                    f"**{res['total_wall']:.3f}** | {res['total_cpu']:.3f} | <= {TABLE_SECONDS_GOAL} | {yes(met)} | "
                    f"{fmt_load(res['load_start'])} / {fmt_load(res['load_end'])} |")
        cpu_met = res["total_cpu"] <= TABLE_SECONDS_GOAL
        note = "" if met or not cpu_met else " (CPU time within the goal: the core was shared)"
        goals.append(f"| 2 | table+selection, {shape}, one core: wall (CPU) | {res['total_wall']:.2f} s "
                     f"({res['total_cpu']:.2f} s) | <= {TABLE_SECONDS_GOAL} s | {yes(met)}{note} |")
    body.append("")
    for shape, res in tables.items():
        body.append(f"{shape}: {res['chosen_units']:,} units chosen, achieved ratio {res['achieved_ratio']:.4f}; "
                    f"totals of the repetitions {', '.join(f'{t:.2f}' for t in res['all_totals'])} s; worker peak "
                    f"RSS {res['peak_rss_mib']:.0f} MiB.")
    body.append("")
    for shape, res in tables.items():
        if "profile" in res:
            over = res["total_wall"] - TABLE_SECONDS_GOAL
            body += [f"Goal missed for {shape} by {over:.2f} s ({res['total_wall'] / TABLE_SECONDS_GOAL:.2f}x the "
                     "goal). cProfile of one repetition, functions by own time:", "",
                     "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
            body += [f"| `{row['function']}` | {row['calls']} | {row['own_s']:.3f} | {row['cumulative_s']:.3f} |"
                     for row in res["profile"]]
            body.append("")
    return body


def report_prepared(args: argparse.Namespace, prep: Row, goals: list[str]) -> list[str]:
    """The Taylor table sections 3 and 4 share."""
    return [f"Sections 3 and 4 use one Taylor table of {MODEL} (16 windows x 128 tokens of `valid.txt`, "
            f"`oneshot(..., table_only=True)`, {prep['seconds']:.1f} s); the 20% plan selected from it with the "
            f"default constraints removes {prep['achieved_ratio']:.4f} of all parameters.", ""]


def report_surgery(args: argparse.Namespace, sur: Row, goals: list[str]) -> list[str]:
    """Section 3: in-memory vs streamed surgery, medians and every run."""
    body: list[str] = []
    figures, labels = sur["figures"], sur["labels"]
    ref = figures[labels[0]]
    body += ["## 3. Surgery at 20%: in memory vs streamed", "",
             f"{MODEL}, float32 safetensors source, each run in its own subprocess ({args.surgery_repeats} runs per "
             "variant, alternating order, medians), no tokenizer written. Peak = VmHWM of the worker; baseline = its "
             "RSS after imports, before anything is loaded. In-memory time includes loading the dense model, since "
             "streaming reads the same file. Note: VmHWM counts file pages mapped by safetensors, too.", "",
             "| variant | seconds | phases | CPU s | peak RSS MiB | peak over baseline MiB | written MiB | "
             "time vs in-memory | peak-over-baseline vs in-memory | same tensors as in-memory | max load |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label in labels:
        fig = figures[label]
        phases = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in fig["phases"].items()) or "-"
        same = "(reference)" if label == labels[0] else yes(sur["identical"][label])
        over = fig["peak_over_baseline_mib"]
        body.append(f"| {label} | {fig['seconds']:.2f} | {phases} | {fig['cpu_seconds']:.1f} | "
                    f"{fig['peak_rss_mib']:.0f} | {over:.0f} | {fig['written_mib']:.0f} | "
                    f"{fig['seconds'] / ref['seconds']:.3f}x | {over / ref['peak_over_baseline_mib']:.3f}x | "
                    f"{same} | {fig['load']:.2f} |")
    streamed = figures[labels[1]]
    goals.append(f"| 3 | streamed / in-memory surgery: time, peak over baseline | "
                 f"{streamed['seconds'] / ref['seconds']:.2f}x, "
                 f"{streamed['peak_over_baseline_mib'] / ref['peak_over_baseline_mib']:.2f}x | (info) | - |")
    body += ["", "Individual runs:", "",
             "| variant | seconds | peak RSS MiB | peak over baseline MiB | load start / end |",
             "|---|---:|---:|---:|---|"]
    body += [f"| {run['label']} | {run['seconds']:.2f} | {run['peak_rss_mib']:.0f} | "
             f"{run['peak_over_baseline_mib']:.0f} | {fmt_load(run['load_start'])} / {fmt_load(run['load_end'])} |"
             for run in sur["runs"]]
    profiles = [run["apply_plan_profile"] for run in sur["runs"] if "apply_plan_profile" in run]
    if profiles:
        prof = profiles[0]
        body += ["", "Profile of `apply_plan` (cProfile, one extra call after the measurement): "
                 f"{prof['total_s']:.2f} s, of which {prof['init_s']:.2f} s "
                 f"({prof['init_s'] / prof['total_s']:.0%}) is weight initialization (`normal_`/`uniform_`; the "
                 "pruned model is built without initializing weights, which the sliced tensors replace) and "
                 f"{prof['index_select_s']:.2f} s is slicing (`index_select`)."]
    body.append("")
    return body


def report_inference(args: argparse.Namespace, inf: Row, goals: list[str]) -> list[str]:
    """Section 4: tokens/s of the dense and pruned models."""
    body: list[str] = []
    names = list(inf["params"])
    body += ["## 4. Inference: dense vs pruned", "",
             f"{MODEL} float32, torch threads {inf['threads']}, `torch.inference_mode`; prefill = one forward "
             "with `use_cache=False` over windows of `valid.txt`; decode = `generate(do_sample=False, "
             f"use_cache=True)` of exactly {args.decode_tokens} new tokens from a {inf['prompt_tokens']}-token prompt "
             "(tokens/s over the whole call). All models in one process, interleaved per repetition, one warm-up "
             f"round, medians of {args.inference_repeats}. Load average at each round: "
             f"{', '.join(fmt_load(x) for x in inf['loads'])}.", "",
             "| model | params | " + " | ".join(f"{w} tok/s | vs dense" for w in inf["times"]) + " |",
             "|---|---:|" + "---:|---:|" * len(inf["times"])]
    for name in names:
        cells = []
        for workload, per_model in inf["times"].items():
            rate = inf["counts"][workload] / common.median(per_model[name])
            dense_rate = inf["counts"][workload] / common.median(per_model["dense"])
            cells.append(f"{rate:.0f} | {rate / dense_rate:.2f}x")
        body.append(f"| {name} | {inf['params'][name] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    for name in names[1:]:
        ratios = [common.median(p["dense"]) / common.median(p[name]) for p in inf["times"].values()]
        goals.append(f"| 4 | {name} / dense throughput (prefill 1x512, 8x128, decode) | "
                     f"{', '.join(f'{r:.2f}x' for r in ratios)} | > 1x (speed-up expected) | "
                     f"{yes(all(r > 1 for r in ratios))} |")
    body += ["", "Median seconds per call (all repetitions in the JSON):", "",
             "| workload | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    body += [f"| {w} | " + " | ".join(f"{common.median(p[n]):.3f}" for n in names) + " |" for w, p in inf["times"].items()]
    body.append("")
    return body


def report(args: argparse.Namespace, results: Row, started: str, seconds: float, command: str) -> str:
    """The goals table first, then a part per section that ran."""
    goals: list[str] = []
    body: list[str] = []
    for key, part in (("calibration", report_calibration), ("table", report_table), ("prepared", report_prepared),
                      ("surgery", report_surgery), ("inference", report_inference),
                      ("compensation", report_against_calibration), ("llamacpp", report_llamacpp),
                      ("search", report_against_calibration)):
        if key in results:
            body += part(args, results[key], goals)
    head = [
        "# Speed and memory vs same-run baselines",
        "",
        f"Command: `{command}` (from the repo root). "
        f"Started {started}, took {seconds / 60:.1f} min. Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. Sections run: {', '.join(map(str, args.sections))}. Load average (1/5/15 "
        f"min) at the end: {fmt_load(common.loadavg())} (the CPU was shared with other work; loads are listed per "
        "measurement).",
        "",
        "| section | figure | value | goal | met |",
        "|---|---|---:|---:|---|",
        *goals,
        "",
    ]
    return "\n".join(head + body)


WORKERS: dict[str, Callable[[Row], Row]] = {"table": worker_table, "calibrate": worker_calibrate,
                                             "surgery": worker_surgery, "inference": worker_inference,
                                             "llamacpp": worker_llamacpp}


def run_sections(args: argparse.Namespace, scratch: Path) -> Row:
    """The raw figures of every section asked for; sections 3 and 4 share one calibrated table."""
    results: Row = {}
    if 1 in args.sections:
        results["calibration"] = section_calibration(args)
    if 2 in args.sections:
        results["table"] = section_table(args)
    if {3, 4, 6} & set(args.sections):
        common.log("sections 3/4: Taylor table of SmolLM2 (oneshot table_only, 16 windows)")
        results["prepared"] = run_worker("calibrate", {"output": str(scratch / "taylor"), "threads": args.threads})
    if 3 in args.sections:
        results["surgery"] = section_surgery(args, results["prepared"], scratch)
    if 4 in args.sections:
        results["inference"] = section_inference(args, results["prepared"], scratch)
    if 5 in args.sections:
        results["compensation"] = section_against_calibration(args, calibration_overhead.COMPENSATION)
    if 6 in args.sections:
        results["llamacpp"] = section_llamacpp(args, results["prepared"], scratch)
    if 7 in args.sections:
        results["search"] = section_against_calibration(args, calibration_overhead.SEARCH)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if common.serve_worker(args, WORKERS):
        return
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gp-speed-") as tmp:
        results = run_sections(args, Path(tmp))
    seconds = time.perf_counter() - start
    text = report(args, results, started, seconds, common.command_line(__file__, argv))
    data = {"started": started, "seconds": seconds, "settings": {k: str(v) for k, v in vars(args).items()},
            "results": results}
    common.publish(text, args.output, data, args.output.with_suffix(".json"), indent=1)
    common.log(f"done in {seconds / 60:.1f} min: {args.output}")


if __name__ == "__main__":
    main()
