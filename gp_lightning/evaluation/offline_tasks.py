"""``gp-lightning build-tasks``: two zero-shot tasks from real text that lm-eval runs without the hub.

From a WikiText-2 file (``test.txt`` of a WikiText-2 copy: `` = Title = `` article headings, one
paragraph a line, `` @-@ `` and ``<unk>`` as WikiText writes them) it writes into ``--output`` a
task YAML and a JSON-lines data file for each task (the YAML names its data file by absolute path:
build again after moving the folder), and ``tasks.json`` (source, rules, counts):

* ``gp_wikitext_cloze``, LAMBADA-style: the context is the end of a paragraph without its last word,
  the target is that word; ``acc`` is the share of items whose target is the model's greedy
  continuation (chance: about 0).
* ``gp_wikitext_choice``: the context is the end of a paragraph before its last sentence; the four
  choices are that sentence and the last sentences of three paragraphs of other articles; ``acc``
  and ``acc_norm`` (chance: 25%).

Selection, the same for the same file and ``--seed``:

1. A paragraph is a non-empty line that is not a heading (``=`` ... ``=``); its article is the last
   `` = Title = `` heading above it.
2. It is kept when at most 5% of its words are ``<unk>`` and, detokenized with lm-eval's WikiText
   detokenizer (``@-@`` joined, punctuation attached), it has at least 40 words. It is split into
   sentences after ``.``, ``!`` or ``?`` followed by a space and a capital letter or a quote.
   A context is the longest run of whole sentences that ends where the context ends and has at
   most 40 words (so that an item costs a model about 50 tokens), and at least 15 words.
3. Cloze items: paragraphs ending in ``.`` whose last word is at least 4 letters (A-Z, a-z only);
   the context ends just before that word.
4. Choice items: paragraphs whose last sentence has 5 to 40 words and no ``<unk>``; the context ends
   just before that sentence. The three other choices are drawn (seeded) from the last sentences of
   the 20 choice items of other articles nearest in length (characters); the true one's position
   is drawn too.
5. Each task's items are shuffled (seeded) so that lm-eval's ``--limit N`` takes N from all
   articles, then cut to ``--max_items``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gp_lightning.runtime.errors import DataError, GPLightningError, RunDirectoryError
from gp_lightning.runtime.io import write_text

CLOZE, CHOICE = "gp_wikitext_cloze", "gp_wikitext_choice"
MIN_WORDS, MAX_UNK = 40, 0.05
CONTEXT_WORDS = (15, 40)
MIN_TARGET_LETTERS = 4
SENTENCE_WORDS = (5, 40)
CHOICES, NEAREST = 4, 20
_HEADING = re.compile(r"= [^=].* =")
_SENTENCE_END = re.compile(r'(?<=[.!?]) (?=[A-Z"])')
_TARGET = re.compile(rf"[A-Za-z]{{{MIN_TARGET_LETTERS},}}")


@dataclass(frozen=True)
class Paragraph:
    line: int  # 1-based line number in the text file
    article: int
    text: str  # detokenized

    @property
    def sentences(self) -> list[str]:
        return _SENTENCE_END.split(self.text)


def _context(sentences: list[str]) -> str | None:
    """The longest run of whole sentences at the end of ``sentences`` of at most 40 words; None below 15 words."""
    words: list[str] = []
    for sentence in reversed(sentences):
        if len(words) + len(sentence.split()) > CONTEXT_WORDS[1]:
            break
        words = sentence.split() + words
    return " ".join(words) if len(words) >= CONTEXT_WORDS[0] else None


def paragraphs(text: str) -> list[Paragraph]:
    """The paragraphs of a WikiText file that rules 1 and 2 keep, detokenized."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    kept, article = [], -1
    for number, line in enumerate(text.splitlines(), start=1):
        raw = line.strip()
        if _HEADING.fullmatch(raw):
            article += 1
        if not raw or raw.startswith("="):
            continue
        words = raw.split()
        if words.count("<unk>") > MAX_UNK * len(words):
            continue
        detokenized = wikitext_detokenizer({"page": f" {raw} "}).strip()
        if len(detokenized.split()) >= MIN_WORDS:
            kept.append(Paragraph(number, article, detokenized))
    return kept


def cloze_items(kept: list[Paragraph]) -> list[dict[str, Any]]:
    """Rule 3: the target is the paragraph's last word (without its period), the context the text before it."""
    items = []
    for paragraph in kept:
        sentences = paragraph.sentences
        head, _, last = sentences[-1].rpartition(" ")
        if not (paragraph.text.endswith(".") and _TARGET.fullmatch(last[:-1])):
            continue
        context = _context([*sentences[:-1], head])
        if context is not None:
            items.append({"id": f"line-{paragraph.line}", "context": context, "target": last[:-1]})
    return items


def choice_items(kept: list[Paragraph], seed: int) -> list[dict[str, Any]]:
    """Rule 4: context = the paragraph up to its last sentence; choices = it and three other articles' endings."""
    split = []
    for paragraph in kept:
        sentences = paragraph.sentences
        last, context = sentences[-1], _context(sentences[:-1])
        if context is not None and SENTENCE_WORDS[0] <= len(last.split()) <= SENTENCE_WORDS[1] and "<unk>" not in last:
            split.append((paragraph, context, last))
    rng = random.Random(seed)
    items = []
    for paragraph, context, last in split:
        others = [(abs(len(ending) - len(last)), index, ending) for index, (other, _, ending) in enumerate(split)
                  if other.article != paragraph.article and ending != last]
        nearest = sorted({ending: (gap, index) for gap, index, ending in others}.items(), key=lambda kv: kv[1])
        if len(nearest) < CHOICES - 1:
            continue
        choices = rng.sample([ending for ending, _ in nearest[:NEAREST]], CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices.insert(gold, last)
        items.append({"id": f"line-{paragraph.line}", "context": context, "choices": choices, "gold": gold})
    return items


def task_yaml(name: str, data: Path, kind: str) -> dict[str, Any]:
    """The lm-eval task config of ``name``, reading ``data`` (JSON lines) through datasets' json builder."""
    config: dict[str, Any] = {"task": name, "dataset_path": "json",
                              "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
                              "doc_to_text": "context"}
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    if kind == "cloze":
        config |= {"output_type": "loglikelihood", "doc_to_target": "{{' ' + target}}", "metric_list": [acc]}
    else:
        config |= {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                   "metric_list": [acc, {**acc, "metric": "acc_norm"}]}
    return config | {"metadata": {"version": 1.0}}


def build_tasks(text_path: str | Path, output: str | Path, seed: int = 0, max_items: int | None = None,
                encoding: str = "utf-8") -> dict[str, Any]:
    """Write both tasks (YAML + JSON lines) and ``tasks.json`` into ``output``; return what ``tasks.json`` holds.

    Everything is checked before the first file is written: the text (readable, enough paragraphs), and ``output``
    (a new or empty directory, or one this builder wrote before)."""
    import yaml

    from gp_lightning.data.config import TextConfig
    from gp_lightning.data.sources import read_text

    TextConfig(text_encoding=encoding)
    if max_items is not None and max_items < 1:
        raise DataError(f"--max_items {max_items}: must be at least 1 (or left out for every item).")
    out = Path(output).expanduser()
    _check_output(out)
    source = Path(text_path).expanduser()
    if not source.is_file():
        raise DataError(f"--text {text_path}: no such file. Pass a WikiText-2 file, e.g. wikitext-2/test.txt.")
    text = read_text(source, encoding)
    kept = paragraphs(text)
    built = {CLOZE: (cloze_items(kept), "cloze"), CHOICE: (choice_items(kept, seed), "choice")}
    for name, (items, _) in built.items():
        if len(items) < CHOICES + 1:
            raise DataError(f"--text {source}: {len(items)} paragraphs qualify for {name}, too few to build it. Pass "
                            "a WikiText-2 file (one paragraph a line, ' = Title = ' headings), e.g. test.txt.")
        random.Random(seed).shuffle(items)
        del items[max_items or len(items):]
    for name, (items, kind) in built.items():
        write_text(out / f"{name}.jsonl", "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        write_text(out / f"{name}.yaml", yaml.safe_dump(task_yaml(name, out / f"{name}.jsonl", kind), sort_keys=False))
    manifest = {"source": str(source.resolve()), "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                "seed": seed, "max_items": max_items, "paragraphs": len(kept),
                "items": {name: len(items) for name, (items, _) in built.items()}, "rules": __doc__.split("Selection")[1]}
    write_text(out / "tasks.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--output {out} is a file: name a directory for the task files (a new one is made).")
    if out.is_dir() and any(out.iterdir()) and not (out / "tasks.json").is_file():
        raise RunDirectoryError(f"--output {out} is not empty and holds no tasks this command built: choose a new or "
                                "empty directory.")


def main(argv: Sequence[str] | None = None) -> int:
    """``gp-lightning build-tasks --text wikitext-2/test.txt --output tasks/wikitext``."""
    parser = argparse.ArgumentParser(prog="gp-lightning build-tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="a WikiText-2 file, e.g. ../shared/data/wikitext-2/test.txt")
    parser.add_argument("--output", required=True, help="directory for the task YAMLs, their data and tasks.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distractors and of the item order")
    parser.add_argument("--max_items", type=int, default=None, help="at most N items per task (default: all)")
    parser.add_argument("--text_encoding", default="utf-8", help="encoding of --text")
    args = parser.parse_args(argv)
    try:
        manifest = build_tasks(args.text, args.output, args.seed, args.max_items, args.text_encoding)
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {count}" for name, count in manifest["items"].items())
    print(f"Built {counts} items from {manifest['paragraphs']} paragraphs of {args.text} into {args.output}/ "
          f"(evaluate: gp-lightning evaluate MODEL --tasks {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
