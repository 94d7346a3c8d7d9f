"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

Every option is declared once, as a field of a config group with the documentation under it; ``--help`` reads
the same documentation. This module writes it as markdown: per workflow (``prune.py``, ``train.py``), per group,
each key with its flag, type and default. ``python -m gp_lightning.runtime.reference`` rewrites the page, and a test
fails when the committed page differs from what this module generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from the config dataclasses by `python -m gp_lightning.runtime.reference` (do not edit by hand: a test
compares this page with what the command writes). Every key is a YAML key of `--config FILE` and a flag of the same
name (`--key value`; booleans also `--key true|false`); flags override the file. `--help` prints the same text.
"""


def _type_name(hint: Any) -> str:
    """A type as a reader writes it: ``int``, ``str | None``, ``global | uniform_per_layer``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(str(arg) for arg in args)
    if args and origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(arg) for arg in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _helps(config_class: type) -> dict[str, str]:
    """Each key's documentation, as ``--help`` shows it (the docs under the dataclass fields)."""
    from gp_lightning.cli import build_parser

    parser = build_parser(config_class)
    return {action.dest: " ".join((action.help or "").split()) for action in parser._actions}


def _group_table(group: type, helps: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(group)
    title = " ".join((group.__doc__ or group.__name__).split())
    lines = [f"### {title}", "", "| key / flag | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(group):
        text = re.sub(r"``([^`]+)``", r"`\1`", helps.get(field.name, "")).replace("|", "\\|")
        lines.append(f"| `{field.name}` / `--{field.name}` | {_type_name(hints[field.name])} | {_default(field)} "
                     f"| {text} |")
    return lines + [""]


def generate() -> str:
    """The whole page: ``prune.py`` (also ``oneshot(**keys)``), then ``train.py`` (also ``finetune(**keys)``)."""
    from gp_lightning.config import PruneConfig
    from gp_lightning.finetune.config import FinetuneConfig

    lines = [HEADER]
    for title, config_class in (("prune.py", PruneConfig), ("train.py", FinetuneConfig)):
        helps = _helps(config_class)
        lines += [f"## {title}", "", " ".join((config_class.__doc__ or "").split()), ""]
        for _, group in config_class.group_fields():
            lines += _group_table(group, helps)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gp_lightning.runtime.reference", description=__doc__)
    parser.add_argument("--output", type=Path, default=PAGE, help="where the page is written")
    args = parser.parse_args(argv)
    from gp_lightning.runtime.io import write_text

    write_text(args.output, generate())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
