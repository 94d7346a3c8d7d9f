"""``gp-lightning evaluate``: the perplexity of several checkpoints (dense or pruned) on the same windows, and their
zero-shot accuracy on the same lm-eval tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from gp_lightning.evaluation.config import EvaluationWindows
from gp_lightning.evaluation.perplexity import perplexity
from gp_lightning.runtime.config import Precision


def evaluate_checkpoints(checkpoints: list[str], config: EvaluationWindows, text_encoding: str = "utf-8",
                         with_perplexity: bool = True) -> list[dict[str, object]]:
    """Perplexity of several checkpoints (dense or pruned) on the SAME windows, tokenized once, and with
    ``config.eval_tasks`` their zero-shot accuracy on the same lm-eval tasks (``zero_shot``: the summary of
    :func:`gp_lightning.evaluation.zero_shot.evaluate_tasks`).

    The inputs pass prune.py's checks first, before anything loads: the window settings, the text encoding, the
    text's source, every checkpoint's run (a checkpoint of a run that did not finish is refused), the zero-shot tasks
    (known, parsed, their data loaded); each model then refuses windows longer than its positions (a local one
    before any loads) before any text is measured."""
    from gp_lightning.data.config import TextConfig
    from gp_lightning.data.sources import check_source, load_text
    from gp_lightning.data.windows import evaluation_windows, tokenize
    from gp_lightning.evaluation.zero_shot import ZeroShot
    from gp_lightning.model.layout import check_sequence_lengths
    from gp_lightning.model.source import load_model
    from gp_lightning.runtime import run_manifest
    from gp_lightning.runtime.precision import load_dtype, resolve

    TextConfig(text_encoding=text_encoding)
    lengths = {"eval_seq_len": config.eval_seq_len} if with_perplexity else {}
    for source in checkpoints:
        run_manifest.require_complete(source, "evaluate")
        check_sequence_lengths(_local_config(source), lengths)  # before any model loads
    if with_perplexity:
        check_source(config.eval_dataset, "evaluation")
    zero_shot = ZeroShot.of(config)
    precision = resolve(config.eval_precision)
    windows = None
    rows: list[dict[str, object]] = []
    for source in checkpoints:
        model, tokenizer = load_model(source, dtype=load_dtype(precision))
        row: dict[str, object] = {"checkpoint": source, "params": sum(p.numel() for p in model.parameters())}
        if with_perplexity:
            check_sequence_lengths(model, lengths)
            if windows is None:
                windows = evaluation_windows(tokenize(load_text(config.eval_dataset, "evaluation", text_encoding),
                                                      tokenizer), config.eval_seq_len, config.eval_max_windows)
            row |= {"ppl": perplexity(model, windows, config.eval_batch_size, precision, desc=f"Perplexity ({source})"),
                    "windows": int(windows.shape[0]), "seq_len": config.eval_seq_len}
        if zero_shot is not None:
            row["zero_shot"] = zero_shot.evaluate(model, tokenizer, precision)
        rows.append(row)
        del model
    return rows


def _local_config(source: str) -> dict:
    """A local checkpoint's config.json as a dict; {} for a hub id or an unreadable file (its load says why)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def evaluate_main(argv: list[str] | None = None) -> int:
    """``gp-lightning evaluate CKPT [CKPT ...] [--eval_dataset X] [--tasks T]``: perplexity and zero-shot accuracy side
    by side."""
    import sys

    from gp_lightning.runtime.errors import GPLightningError

    args = _parser().parse_args(argv)
    try:
        _check_outputs(args)
        config = EvaluationWindows(args.eval_dataset or "wikitext2", args.eval_seq_len, args.eval_max_windows,
                                   args.eval_batch_size, args.eval_precision, args.tasks, args.num_fewshot, args.limit)
        rows = evaluate_checkpoints(args.checkpoints, config, args.text_encoding,
                                    with_perplexity=args.eval_dataset is not None or not args.tasks)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _report(rows, config, args)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gp-lightning evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoints", nargs="+", help="HF directories, hub ids, smollm2-135m, or pruned run/model")
    parser.add_argument("--eval_dataset", default=None,
                        help="perplexity text (default wikitext2; with --tasks: no perplexity unless given)")
    parser.add_argument("--eval_seq_len", type=int, default=128)
    parser.add_argument("--eval_max_windows", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=8, help="windows, or lm-eval requests, per batch")
    parser.add_argument("--eval_precision", default="32-true", choices=get_args(Precision),
                        help="numerics of both measures (default 32-true: float32 weights; auto: prune.py's choice)")
    parser.add_argument("--text_encoding", default="utf-8", help="encoding of a local --eval_dataset file")
    parser.add_argument("--tasks", "--eval_tasks", dest="tasks", default=None,
                        help="zero-shot accuracy through lm-eval: task or group names, llm-pruner (its seven tasks), "
                             "task YAML files or folders (gp-lightning build-tasks), comma-separated")
    parser.add_argument("--num_fewshot", "--eval_num_fewshot", dest="num_fewshot", type=int, default=0,
                        help="examples before each question (default 0: zero-shot)")
    parser.add_argument("--limit", "--eval_limit", dest="limit", type=int, default=None,
                        help="only the first N items of each task")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--output", help="with --tasks: also write zero_shot.json and zero_shot.md into this directory")
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """The files asked for can be written there: refused before anything loads."""
    from gp_lightning.runtime.errors import ConfigError

    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json} is a directory: name the JSON file to write.")
    if args.output and not args.tasks:
        raise ConfigError("--output holds zero-shot results: pass --tasks too (or --json for perplexity rows).")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a file: name a directory for zero_shot.json and zero_shot.md "
                          "(a new one is made).")


def _report(rows: list[dict], config: EvaluationWindows, args: argparse.Namespace) -> None:
    """The tables on stdout; the files asked for, each written atomically."""
    from gp_lightning.evaluation.zero_shot import to_markdown, write_zero_shot, zero_shot_table
    from gp_lightning.runtime.io import write_json

    if "ppl" in rows[0]:
        print("| checkpoint | params | PPL |\n| --- | --- | --- |")
        for row in rows:
            print(f"| {row['checkpoint']} | {row['params']:,} | {row['ppl']:.3f} |")
        print(f"({rows[0]['windows']} windows of {config.eval_seq_len} tokens of {config.eval_dataset})")
    if args.tasks:
        sections = [to_markdown(row["zero_shot"], str(row["checkpoint"])) for row in rows]
        table = zero_shot_table({str(row["checkpoint"]): row["zero_shot"] for row in rows})
        print("\n".join([*sections, table]), end="")
        if args.output:
            summaries = [{"checkpoint": row["checkpoint"], "params": row["params"], **row["zero_shot"]} for row in rows]
            write_zero_shot(Path(args.output), {"checkpoints": summaries}, "\n".join([table, *sections]))
    if args.json:
        write_json(Path(args.json), rows)
