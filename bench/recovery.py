"""Recovery after 50% pruning: distillation from the dense model against plain LM-loss fine-tuning, same budget.

Why: a pruned model is usually fine-tuned before use, and the loss it is fine-tuned with decides how much of
the dense model comes back. This script prunes SmolLM2-135M to 50% of all parameters with the project's
defaults (Taylor table on the quality benchmark's 32 x 128 calibration windows, least-squares compensation,
sequential, OBS within layers), then spends the same budget three ways:

- ``kd``: KL divergence to the dense model's next-token distribution (the dense model is the teacher);
- ``kd+lm``: half KD, half cross-entropy on the windows (``kd_alpha`` 0.5);
- ``lm``: next-token cross-entropy on the same windows (what most recipes do);
- ``dense + lm``: the dense model itself fine-tuned exactly like ``lm``, so that the reader can tell recovery
  (getting back what pruning took) from adaptation to WikiText (which lowers any model's WikiText perplexity).

Budget: ``--steps`` optimizer steps of 4 windows x 128 tokens of wikitext-2 ``valid.txt`` (one epoch over
``4 * steps`` windows, never overlapping the 16 validation windows), full fine-tuning with AdamW, peak
learning rate 3e-4, linear warm-up over 5% of the steps and linear decay, bf16 autocast with float32 weights
(``bf16-mixed``: about 20% faster than float32 on CPUs with AVX512-BF16). Perplexity is the quality
benchmark's: the first 64 windows of 128 tokens of ``test.txt``, in float32. The rows also go into
``bench/results/quality.md`` (its recovery section) so that the one table holds every number.

    python bench/recovery.py                  # about 20 minutes on 2 idle cores (34 measured with other jobs running)
    python bench/recovery.py --steps 40 --losses kd --no_dense   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from bench import common
except ModuleNotFoundError:  # `python bench/recovery.py` without the repository on sys.path
    import common  # type: ignore[no-redef]

from gp_lightning.evaluation.offline_tasks import build_tasks
from gp_lightning.finetune.recipe import finetune
from gp_lightning.model.source import resolve
from gp_lightning.pipeline import oneshot

BATCH, SEQ_LEN, EVAL_WINDOWS = 4, 128, 64
SECTION = "## Recovery after 50% pruning (bench/recovery.py)"


@dataclass
class Row:
    model: str  # what was fine-tuned
    loss: str  # finetune_loss
    steps: int
    ppl_before: float
    ppl_after: float
    seconds: float
    zero_shot: dict[str, float] = field(default_factory=dict)  # accuracy after the fine-tune, by offline task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=common.DEFAULT_MODEL, help="embedded name, HF directory or hub id")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of ALL parameters removed")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of 4 x 128 tokens (at most 400)")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="peak AdamW learning rate")
    parser.add_argument("--kd_temperature", type=float, default=1.0)
    parser.add_argument("--losses", nargs="+", default=["kd", "kd+lm", "lm"], choices=["kd", "kd+lm", "lm"],
                        help="fine-tunes of the pruned model, one per loss")
    parser.add_argument("--kd_alpha", type=float, default=0.5, help="weight of the KD term in kd+lm")
    parser.add_argument("--no_dense", action="store_true", help="skip the dense model's fine-tune")
    parser.add_argument("--zero_shot_items", type=int, default=100,
                        help="items of each offline zero-shot task (built from test.txt) after each model; 0: none")
    common.add_threads(parser, None, "this process")
    common.add_output(parser, "recovery.md")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "recovery.json", help="rows as JSON")
    parser.add_argument("--quality", type=Path, default=common.RESULTS / "quality.md",
                        help="the quality table whose recovery section this run replaces ('' to leave it)")
    return parser.parse_args(argv)


def evaluation_keys(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The perplexity windows, and the offline zero-shot tasks (built once into ``work``) unless turned off."""
    keys = {"eval_dataset": str(common.TEST), "eval_seq_len": SEQ_LEN, "eval_max_windows": EVAL_WINDOWS,
            "eval_precision": "32-true"}
    if args.zero_shot_items:
        if not (work / "tasks" / "tasks.json").is_file():
            build_tasks(common.TEST, work / "tasks")
        keys.update(eval_tasks=str(work / "tasks"), eval_limit=args.zero_shot_items)
    return keys


def prune(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The pruned checkpoint (the pipeline's defaults on the quality benchmark's calibration windows)."""
    result = oneshot(model=args.model, output=str(work / "pruned"), pruning_ratio=args.ratio,
                     dataset=str(common.VALID), num_samples=32, seq_len=SEQ_LEN, batch_size=BATCH,
                     seed=common.SEED, precision="32-true", test_before_prune=True, **evaluation_keys(args, work))
    return result.run_dir / "model", result.evaluation


def tune(args: argparse.Namespace, work: Path, model: str, name: str, loss: str) -> Row:
    """One fine-tune of ``args.steps`` optimizer steps; perplexity before and after on the test windows."""
    start = time.perf_counter()
    result = finetune(
        model=model, output=str(work / name), dataset=str(common.VALID), finetune_samples=BATCH * args.steps,
        val_samples=16, seq_len=SEQ_LEN, batch_size=BATCH, num_epochs=1, finetune_method="full",
        learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 20), lr_scheduler="linear",
        finetune_loss=loss, teacher=None if loss == "lm" else resolve(args.model), kd_temperature=args.kd_temperature,
        kd_alpha=args.kd_alpha, precision="bf16-mixed", seed=common.SEED, save_model=False,
        **evaluation_keys(args, work),
    )
    ev = result.evaluation
    row = Row(name, loss, int(ev["optimizer_steps"]), float(ev["ppl_before"]), float(ev["ppl_after"]),
              time.perf_counter() - start, {k: v for k, v in ev.get("zero_shot", {}).items() if v is not None})
    common.log(f"{name}: PPL {row.ppl_before:.2f} -> {row.ppl_after:.2f} in {row.steps} steps ({row.seconds:.0f} s)")
    return row


def section(data: dict[str, Any]) -> str:
    """The recovery rows as the markdown section both this script and ``bench/quality.py`` print."""
    dense = data["dense_ppl"]
    tasks = list(dict.fromkeys(t for row in data["rows"] for t in row.get("zero_shot", {})))
    lines = [SECTION, "", f"Command: `{data['command']}`. Date: {data['date']}. Wall time {data['wall_s'] / 60:.1f} "
             f"min. Pruned {data['ratio']:.0%} of all parameters with the defaults ({data['pruned_params']:,} "
             f"parameters left); every fine-tune: {data['steps']} optimizer steps of {BATCH} x {SEQ_LEN} tokens of "
             f"`valid.txt`, full, AdamW lr {data['learning_rate']}, bf16-mixed. PPL on the first {EVAL_WINDOWS} "
             f"test windows (float32); dense {dense:.2f}.", "",
             "| model | fine-tune loss | steps | PPL before | PPL after | after / dense (untuned) | time |"
             + "".join(f" {t} acc after |" for t in tasks),
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for row in data["rows"]:
        accuracy = "".join(f" {row.get('zero_shot', {})[t]:.1%} |" if t in row.get("zero_shot", {}) else " - |"
                           for t in tasks)
        lines.append(f"| {row['model']} | {row['loss']} | {row['steps']} | {row['ppl_before']:,.2f} | "
                     f"{row['ppl_after']:,.2f} | {row['ppl_after'] / dense:.2f}x | {row['seconds'] / 60:.1f} min |"
                     + accuracy)
    if data.get("pruned_zero_shot"):
        lines += ["", "Zero-shot accuracy of the pruned model before any fine-tune (first "
                  f"{data['zero_shot_items']} items of each offline task): "
                  + ", ".join(f"{t} {v:.1%}" for t, v in data["pruned_zero_shot"].items() if v is not None) + "."]
    return "\n".join(lines + [""])


def replace_section(quality: Path, text: str) -> None:
    """Put ``text`` in place of the quality table's recovery section (appended if it has none)."""
    if not quality.is_file():
        return
    body = quality.read_text()
    head = body.split(SECTION)[0].rstrip("\n")
    common.write_text(quality, head + "\n\n" + text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 1 <= args.steps <= 400:
        raise SystemExit(f"--steps {args.steps}: the protocol allows 1 to 400 optimizer steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gp-recovery-") as directory:
        work = Path(directory)
        pruned, evaluation = prune(args, work)
        common.log(f"pruned: PPL {evaluation['ppl_before']:.2f} -> {evaluation['ppl_after']:.2f}")
        rows = [tune(args, work, str(pruned), f"pruned + {loss}", loss) for loss in args.losses]
        if not args.no_dense:
            rows.append(tune(args, work, resolve(args.model), "dense + lm", "lm"))
    data = {"command": common.command_line(__file__, argv), "date": started, "wall_s": time.perf_counter() - start,
            "ratio": args.ratio, "steps": args.steps, "learning_rate": args.learning_rate,
            "dense_ppl": evaluation["ppl_before"], "pruned_ppl": evaluation["ppl_after"],
            "pruned_params": evaluation["params_after"], "rows": [asdict(row) for row in rows],
            "pruned_zero_shot": evaluation.get("zero_shot", {}), "zero_shot_items": args.zero_shot_items}
    text = section(data)
    common.publish(text, args.output, data, args.json)
    if str(args.quality) not in ("", "."):
        replace_section(args.quality, text)


def saved_section(path: Path = common.RESULTS / "recovery.json") -> str | None:
    """The last recovery run's section, for ``bench/quality.py`` to keep in its report."""
    return section(json.loads(path.read_text())) if path.is_file() else None


if __name__ == "__main__":
    main()
