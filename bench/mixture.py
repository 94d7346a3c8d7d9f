"""Calibration mixtures off domain: SmolLM2 pruned after calibrating on WikiText-2 alone or on a mixture of texts.

Why (issue 29, item 2): a model calibrated (and its compensation refit) on one text fits that text; users deploy on
everything else. This script prunes SmolLM2-135M (the embedded default) at ``--ratio`` (35% of ALL parameters) with
the default settings (Taylor importance, least-squares refit, sequential, OBS within layer), calibrated

- (a) on ``--num_samples`` windows of WikiText-2 ``valid.txt`` alone;
- (b) on the same number of windows of a mixture of WikiText-2 ``valid.txt`` and a second real English text that
  no evaluation reads: the prose of the Python standard library's docstrings (``inspect.getdoc`` of the modules in
  ``DOC_MODULES``, their public classes, functions and methods, in sorted order; a paragraph is kept when it has at
  least 12 words and at least 85% of its characters are letters or spaces, and only its first time). The mixture is
  ``dataset: "[valid.txt: 1 - w, docstrings.txt: w]"`` (``--weight`` w, 0.5 by default), so the pipeline's own
  mixture rule splits the windows;

and reports perplexity on the first ``--eval_windows`` 128-token windows of WikiText-2 ``test.txt`` and of each
out-of-domain text (``bench/ood_texts.py``: GNU manuals' prose and quotations, built from Debian packages; or the
files given with ``--ood``). Everything else is the same in (a) and (b): model, seed, windows count, settings.

    python bench/mixture.py --threads 1        # writes bench/results/mixture.md and mixture.json
    python bench/mixture.py --threads 1 --eval_windows 16 --no_dense        # a quick look
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import inspect
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench import common, ood_texts
except ModuleNotFoundError:  # `python bench/mixture.py` without the repository on sys.path
    import common  # type: ignore[no-redef]
    import ood_texts  # type: ignore[no-redef]

#: Standard-library modules whose docstrings make the second calibration text (pure-Python ones, rich in prose).
DOC_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "mailbox",
    "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "profile", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "wave", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


def parse_args(argv: list[str] | None = None) -> Any:
    parser = common.argument_parser(__doc__)
    common.add_calibration_arguments(parser, num_samples=32)
    parser.add_argument("--ratio", type=float, default=0.35, help="fraction of ALL parameters to remove")
    parser.add_argument("--weight", type=float, default=0.5, help="the docstrings' weight in the mixture (b)")
    parser.add_argument("--eval_windows", type=int, default=64, help="first N 128-token windows of each text")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=common.SEED)
    parser.add_argument("--ood", type=Path, nargs="+", default=None,
                        help="out-of-domain evaluation texts (default: bench/ood_texts.py's, built once)")
    parser.add_argument("--no_dense", action="store_true", help="skip the dense model's perplexities")
    common.add_threads(parser, None, "this process")
    common.add_output(parser, "mixture.md")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "mixture.json", help="rows as JSON")
    return parser.parse_args(argv)


def docstring_paragraphs(modules: tuple[str, ...] = DOC_MODULES) -> list[str]:
    """The prose paragraphs of the modules' docstrings (see the module's docstring), in module and name order."""
    paragraphs: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            docs.append(inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else None)
            if inspect.isclass(obj):
                docs += [inspect.getdoc(f) for a, f in sorted(vars(obj).items())
                         if not a.startswith("_") and inspect.isfunction(f)]
        paragraphs += [p for doc in docs if doc for p in _prose(doc)]
    return list(dict.fromkeys(paragraphs))


def _prose(doc: str) -> list[str]:
    """Blocks of a docstring that read as prose: >= 12 words, >= 85% letters or spaces, no doctest or list item."""
    kept = []
    for block in re.split(r"\n\s*\n", doc):
        text = " ".join(block.split())
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if len(text.split()) >= 12 and letters >= 0.85 * len(text) and not block.lstrip().startswith((">>>", "-", "*")):
            kept.append(text)
    return kept


def write_docstrings(work: Path) -> tuple[Path, dict[str, Any]]:
    """The docstring text as a file in ``work``, and what identifies it (Python version, size, SHA-256)."""
    paragraphs = docstring_paragraphs()
    data = "\n\n".join(paragraphs) + "\n"
    path = work / "python-docstrings.txt"
    path.write_text(data, encoding="utf-8")
    return path, {"python": sys.version.split()[0], "modules": len(DOC_MODULES), "paragraphs": len(paragraphs),
                  "words": len(data.split()), "sha256": hashlib.sha256(data.encode()).hexdigest()}


def evaluation_texts(args: Any) -> dict[str, Path]:
    """WikiText-2 test first, then the out-of-domain texts by name."""
    ood = {path.stem: path for path in args.ood} if args.ood else ood_texts.ood_texts()
    return {"wikitext-2 test": common.TEST, **ood}


def perplexities(model: Any, windows: dict[str, Any], batch_size: int) -> dict[str, float]:
    from gp_lightning.evaluation.perplexity import perplexity

    return {name: perplexity(model, w, batch_size, desc=f"PPL {name}") for name, w in windows.items()}


def pruned_row(args: Any, work: Path, label: str, dataset: str, windows: dict[str, Any]) -> dict[str, Any]:
    """Prune with ``dataset`` as calibration (and refit) data; the row's perplexities and times."""
    from gp_lightning.data.mixture import parse_mixture, window_sources
    from gp_lightning.pipeline import oneshot

    start, cpu = time.perf_counter(), common.cpu_seconds()
    result = oneshot(model=args.model, dataset=dataset, num_samples=args.num_samples, seq_len=args.seq_len,
                     batch_size=args.batch_size, seed=args.seed, pruning_ratio=args.ratio, precision="32-true",
                     eval_precision="32-true", test_before_prune=False, test_after_prune=False, save_model=False,
                     overwrite=True, output=str(work / label.split()[0]))
    assert result.pruned_model is not None
    prune_s = time.perf_counter() - start
    ppl = perplexities(result.pruned_model, windows, args.eval_batch_size)
    mixture = parse_mixture(dataset)
    order = window_sources(mixture.weights, args.num_samples)
    shown = ", ".join(f"{order.count(i)} of {Path(source).name}" for i, source in enumerate(mixture.sources))
    row = {"row": label, "dataset": dataset, "windows": shown,
           "params": common.count_params(result.pruned_model), "ppl": ppl, "prune_s": prune_s,
           "seconds": time.perf_counter() - start, "cpu_s": common.cpu_seconds() - cpu}
    common.log(f"{label}: {ppl} ({row['seconds']:.0f} s)")
    return row


def run(args: Any, work: Path) -> dict[str, Any]:
    """The dense row (unless --no_dense), then (a) and (b)."""
    import torch

    from gp_lightning.data.sources import load_text
    from gp_lightning.data.windows import evaluation_windows, tokenize
    from gp_lightning.model.source import load_model

    docstrings, identity = write_docstrings(work)
    texts = evaluation_texts(args)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    windows = {name: evaluation_windows(tokenize(load_text(str(path), "evaluation"), tokenizer), 128,
                                        args.eval_windows) for name, path in texts.items()}
    rows = []
    if not args.no_dense:
        start = time.perf_counter()
        rows.append({"row": "dense", "dataset": "-", "windows": "-", "params": common.count_params(model),
                     "ppl": perplexities(model.eval(), windows, args.eval_batch_size),
                     "seconds": time.perf_counter() - start})
    del model
    mixture = f"[{common.VALID}: {1 - args.weight:g}, {docstrings}: {args.weight:g}]"
    rows.append(pruned_row(args, work, "(a) WikiText-2 valid alone", str(common.VALID), windows))
    rows.append(pruned_row(args, work, "(b) mixture: WikiText-2 valid + Python docstrings", mixture, windows))
    return {"docstrings": identity, "texts": {name: str(path) for name, path in texts.items()},
            "eval_tokens": {name: int(w.numel()) for name, w in windows.items()}, "rows": rows}


def report(args: Any, data: dict[str, Any]) -> str:
    names = list(data["texts"])
    doc = data["docstrings"]
    lines = [
        f"# Calibration mixtures off domain: SmolLM2-135M at {args.ratio:.0%}", "",
        f"Command: `{data['command']}` (run from the repository root). Date: {data['date']}. Wall time "
        f"{data['wall_s'] / 60:.1f} min, CPU {data['cpu_s'] / 60:.1f} min, load average at start/end "
        f"{data['load'][0]:.2f}/{data['load'][1]:.2f} on a machine other jobs share.", "",
        f"Settings: model `{args.model}`, float32, CPU, {data['threads']} torch thread(s); the defaults (Taylor, "
        f"least-squares refit, sequential, OBS within layer), {args.num_samples} calibration windows x {args.seq_len} "
        f"tokens (the refit reads the same windows), seed {args.seed}. Perplexity: the first {args.eval_windows} "
        "non-overlapping 128-token windows of each text ("
        + ", ".join(f"{n}: {data['eval_tokens'][n]:,} tokens, `{data['texts'][n]}`" for n in names) + ").", "",
        f"Second calibration text: the prose of the Python {doc['python']} standard library's docstrings "
        f"({doc['modules']} modules, {doc['paragraphs']:,} paragraphs, {doc['words']:,} words, SHA-256 "
        f"{doc['sha256'][:16]}...; see bench/mixture.py). No evaluation reads it; the out-of-domain texts are "
        "bench/ood_texts.py's (GNU manuals' prose, fortune quotations), which no calibration reads.", "",
        "| calibration | windows per source | params | " + " | ".join(f"PPL {n}" for n in names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
    ]
    for row in data["rows"]:
        lines.append(f"| {row['row']} | {row['windows']} | {row['params']:,} | "
                     + " | ".join(f"{row['ppl'][n]:.2f}" for n in names) + " |")
    alone, mixed = data["rows"][-2:]
    lines += ["", "(b) against (a): " + ", ".join(f"{n} {mixed['ppl'][n] / alone['ppl'][n] - 1:+.1%}" for n in names)
              + " perplexity.", "",
              "Per row: " + "; ".join(f"{r['row']} {r['seconds']:.0f} s" for r in data["rows"]) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    start, cpu, load = time.perf_counter(), common.cpu_seconds(), common.loadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gp-mixture-") as work:
        data = run(args, Path(work))
    data |= {"command": common.command_line(__file__, argv), "date": started, "wall_s": time.perf_counter() - start,
             "cpu_s": common.cpu_seconds() - cpu, "load": [load, common.loadavg()[0]], "threads": torch.get_num_threads(),
             "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    common.publish(report(args, data), args.output, data, args.json)


if __name__ == "__main__":
    main()
