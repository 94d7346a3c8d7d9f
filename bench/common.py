"""What the bench scripts share, so that a fix to one of them reaches them all.

Paths (the repository, its results folder, the shared WikiText-2 text), the published Llama-3 shapes
and their ``ModelLayout``, process figures (CPU seconds, RSS, load), the subprocess workers each
measurement runs in (so every figure has its own process: its own peak RSS, threads and imports),
the arguments several scripts take, and result files written atomically through
``gp_lightning.runtime.io``. Importing this module is cheap: torch and transformers are imported by
the functions that need them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gp_lightning.runtime.io import write_text

if TYPE_CHECKING:
    from torch import nn

    from gp_lightning.model.layout import ModelLayout

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data" / "wikitext-2"  # shared by every checkout, not part of the repo
VALID, TEST = DATA / "valid.txt", DATA / "test.txt"
DEFAULT_MODEL = "smollm2-135m"
SEED = 42
RESULT_MARK = "BENCH-RESULT "  # a worker's result line on its stdout, among whatever else libraries print
Row = dict[str, Any]
T = TypeVar("T")

#: Llama-3 shapes (the published ``config.json``s); :func:`meta_layout` turns one into a ``ModelLayout``.
LLAMA3: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "Llama-3-70B": {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
}


def meta_layout(config: Mapping[str, Any]) -> ModelLayout:
    """The pruning layout of a ``LlamaForCausalLM`` of ``config``, read from a meta-device model (no weights).

    The same layout the pipeline uses, so shapes and unit costs are never recomputed by hand here.
    """
    from transformers import LlamaConfig

    from gp_lightning.model.weights import describe_checkpoint

    return describe_checkpoint(".", dense_config=LlamaConfig(**config))


# -- process figures ----------------------------------------------------------------------------------
def proc_status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of this process, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process: wall time well above it means the cores were shared."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests, all CPUs of this VM together (``/proc/stat``; 0 where there is
    none): a timed run with steal ran on a slower machine than its neighbours."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else 0.0
    except OSError:
        return 0.0


def loadavg() -> list[float]:
    """The 1/5/15-minute load average, recorded next to timings taken on a shared machine."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``; a tied embedding/lm_head is one tensor and counts once."""
    return sum(p.numel() for p in model.parameters())


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the report and the workers' results)."""
    script = Path(sys.argv[0]).stem or "bench"
    print(f"[{script} {time.strftime('%H:%M:%S')} load {loadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True)


def alternating(items: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """``(repeat, item)`` for ``repeats`` passes over ``items``, every other pass reversed: drift favours none."""
    for repeat in range(repeats):
        for item in items if repeat % 2 == 0 else items[::-1]:
            yield repeat, item


# -- subprocess workers ---------------------------------------------------------------------------------
def add_worker_arguments(parser: argparse.ArgumentParser, choices: Sequence[str] | None = None) -> None:
    """The hidden flags a script re-spawned as a worker gets: which worker, and its spec as JSON."""
    parser.add_argument("--_worker", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)


def run_worker(script: str | Path, name: str, spec: Row, env: Mapping[str, str] | None = None) -> Row:
    """Run ``script --_worker name`` in a fresh process; return the result it emitted.

    A fresh process per measurement gives each its own peak RSS, thread settings (``env``) and imports.
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--_worker", name, "--_spec", json.dumps(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    lines = [line[len(RESULT_MARK):] for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} of {Path(script).name} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


def serve_worker(args: argparse.Namespace, workers: Mapping[str, Callable[[Row], Row]]) -> bool:
    """In a process started by :func:`run_worker`: run the worker and emit its result. False in the parent."""
    if not args._worker:
        return False
    result = workers[args._worker](json.loads(args._spec or "{}"))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return True


# -- arguments -----------------------------------------------------------------------------------------
def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").splitlines()[0])


def add_output(parser: argparse.ArgumentParser, name: str) -> None:
    """``--output``: the markdown report, by default in bench/results/ of the repository."""
    parser.add_argument("--output", type=Path, default=RESULTS / name,
                        help=f"markdown file (default: bench/results/{name} in the repo)")


def add_threads(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """``--threads``: on a CPU shared with other jobs, oversubscribed OpenMP threads spin and timings swing."""
    parser.add_argument("--threads", type=int, default=default,
                        help=f"torch/OpenMP threads of {what} (default: {default or 'torch default, one per core'}); "
                             "on a machine other jobs share, 1 avoids oversubscribing the cores, which slows every "
                             "process down far more than sharing them")


def add_calibration_arguments(parser: argparse.ArgumentParser, num_samples: int) -> None:
    """``--model --num_samples --seq_len --batch_size``: the model and the calibration windows."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF directory or hub id")
    parser.add_argument("--num_samples", type=int, default=num_samples, help="calibration windows")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--batch_size", type=int, default=4, help="calibration windows per pass")


# -- results -------------------------------------------------------------------------------------------
def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, with the script path relative to the repository when inside it."""
    path = Path(script).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def publish(text: str, output: Path, data: Any = None, json_path: Path | None = None, indent: int = 2) -> None:
    """Print the report and write it, and ``data`` as JSON to ``json_path``, atomically (no half-written file)."""
    print(text)
    write_text(output, text)
    if json_path is not None:
        write_text(json_path, json.dumps(data, indent=indent, default=str) + "\n")
    print(f"Written to {output}" + (f" and {json_path}" if json_path is not None else ""), file=sys.stderr)
