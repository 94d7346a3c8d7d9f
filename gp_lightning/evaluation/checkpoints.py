"""``gp-lightning evaluate``: the perplexity of several checkpoints (dense or pruned) on the same windows."""

from __future__ import annotations

import json
from pathlib import Path

from gp_lightning.evaluation.config import EvaluationWindows
from gp_lightning.evaluation.perplexity import perplexity


def evaluate_checkpoints(checkpoints: list[str], eval_dataset: str, eval_seq_len: int = 128,
                         eval_max_windows: int | None = None, batch_size: int = 8,
                         text_encoding: str = "utf-8") -> list[dict[str, object]]:
    """Perplexity of several checkpoints (dense or pruned) on the SAME windows, tokenized once.

    The inputs pass prune.py's checks first, before anything loads: the window settings, the text encoding, the
    text's source, and every checkpoint's run (a checkpoint of a run that did not finish is refused); each model
    then refuses windows longer than its positions (a local one before any loads) before any text is measured."""
    from gp_lightning.data.config import TextConfig
    from gp_lightning.data.sources import check_source, load_text
    from gp_lightning.data.windows import evaluation_windows, tokenize
    from gp_lightning.model.layout import check_sequence_lengths
    from gp_lightning.model.source import load_model
    from gp_lightning.runtime import run_manifest

    EvaluationWindows(eval_dataset, eval_seq_len, eval_max_windows, batch_size)
    TextConfig(text_encoding=text_encoding)
    for source in checkpoints:
        run_manifest.require_complete(source, "evaluate")
        check_sequence_lengths(_local_config(source), {"eval_seq_len": eval_seq_len})  # before any model loads
    check_source(eval_dataset, "evaluation")
    windows = None
    rows: list[dict[str, object]] = []
    for source in checkpoints:
        model, tokenizer = load_model(source)
        check_sequence_lengths(model, {"eval_seq_len": eval_seq_len})
        if windows is None:
            windows = evaluation_windows(tokenize(load_text(eval_dataset, "evaluation", text_encoding), tokenizer),
                                         eval_seq_len, eval_max_windows)
        ppl = perplexity(model, windows, batch_size, desc=f"Perplexity ({source})")
        rows.append({"checkpoint": source, "params": sum(p.numel() for p in model.parameters()), "ppl": ppl,
                     "windows": int(windows.shape[0]), "seq_len": eval_seq_len})
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
    """``gp-lightning evaluate CKPT [CKPT ...] --eval_dataset X``: perplexity side by side."""
    import argparse
    import sys
    from pathlib import Path

    from gp_lightning.runtime.errors import ConfigError, GPLightningError
    from gp_lightning.runtime.io import write_json

    parser = argparse.ArgumentParser(prog="gp-lightning evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoints", nargs="+", help="HF directories, hub ids, smollm2-135m, or pruned run/model")
    parser.add_argument("--eval_dataset", default="wikitext2")
    parser.add_argument("--eval_seq_len", type=int, default=128)
    parser.add_argument("--eval_max_windows", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--text_encoding", default="utf-8", help="encoding of a local --eval_dataset file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.json and Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json} is a directory: name the JSON file to write.")
        rows = evaluate_checkpoints(args.checkpoints, args.eval_dataset, args.eval_seq_len, args.eval_max_windows,
                                    args.eval_batch_size, args.text_encoding)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| checkpoint | params | PPL |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['checkpoint']} | {row['params']:,} | {row['ppl']:.3f} |")
    print(f"({rows[0]['windows']} windows of {args.eval_seq_len} tokens of {args.eval_dataset})")
    if args.json:
        write_json(Path(args.json), rows)
    return 0
