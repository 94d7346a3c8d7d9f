"""Calibration mixtures: a ``dataset`` that names several sources with weights, and the windows drawn from them.

``dataset`` is one source (``wikitext2``, ``c4`` or a local file) or a YAML flow list of sources:
``[wikitext2, c4, my.jsonl]`` (equal weights), ``[wikitext2: 0.7, my.txt: 0.3]`` or
``{wikitext2: 0.7, my.txt: 0.3}`` (weights of any scale; ``name:0.7`` without the space too). A source of
weight 0 is left out.

The rule that draws ``count`` windows: window ``k`` comes from the source with the largest
``weight / (2 * windows_it_has + 1)`` (Sainte-Lague's divisor rule; a tie goes to the source listed first).
Every prefix of the windows is then split in proportion to the weights (each source's count is its exact share
rounded as Sainte-Lague rounds), so the calibration windows, the first ``num_samples`` of the compensation's,
follow the weights too, and sources are interleaved. A source's windows are, in order, the ones
:func:`calibration_windows` draws from that source alone with the run's seed. One source gives exactly the
windows it always gave.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from gp_lightning.data.sources import Role, check_source, load_text
from gp_lightning.data.windows import calibration_windows, tokenize
from gp_lightning.runtime.errors import DataError, check_config

#: The end of every syntax error: the forms that work.
FORMS = "write e.g. [wikitext2, my.txt] (equal weights) or [wikitext2: 0.7, my.txt: 0.3]"

#: A weight as text (YAML 1.1 reads ``1e-3`` as a string), and ``name:weight`` without the space YAML needs.
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GLUED = re.compile(rf"^(.*\S):\s*({_NUMBER})$")


@dataclass(frozen=True)
class Mixture:
    """The sources of ``dataset`` and their weights (positive; one source: weight 1)."""

    sources: tuple[str, ...]
    weights: tuple[Fraction, ...]


def is_mixture(spec: str) -> bool:
    """``spec`` is the bracketed form (a list or mapping of sources, or a YAML one), not one source."""
    return not isinstance(spec, str) or spec.strip().startswith(("[", "{")) and not Path(spec).expanduser().is_file()


def parse_mixture(spec: str) -> Mixture:
    """The sources and weights ``spec`` names; a malformed list is a one-line :class:`ConfigError` naming the fix."""
    if not is_mixture(spec):
        return Mixture((spec,), (Fraction(1),))
    entries = [_weighted(spec, entry) for entry in _entries(spec)]
    check_config(bool(entries), "dataset", spec, f"names no source: {FORMS}")
    weighted = [weight is not None for _, weight in entries]
    check_config(all(weighted) or not any(weighted), "dataset", spec,
                 "weights some sources and not others: give every source a weight, or none (equal weights)")
    names = [name for name, _ in entries]
    twice = next((name for name in names if names.count(name) > 1), None)
    check_config(twice is None, "dataset", spec, f"names '{twice}' twice: list it once, with the sum of its weights")
    weights = [Fraction(1) if weight is None else weight for _, weight in entries]
    check_config(sum(weights) > 0, "dataset", spec, "has weights that sum to 0: give a source a positive weight")
    kept = [(name, weight) for name, weight in zip(names, weights, strict=True) if weight > 0]
    return Mixture(tuple(name for name, _ in kept), tuple(weight for _, weight in kept))


def _entries(spec: str) -> list[object]:
    """The YAML list (or mapping, as ``name: weight`` items) ``spec`` holds."""
    import yaml

    try:
        value = yaml.safe_load(spec)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or "not valid YAML").split())
        check_config(False, "dataset", spec, f"is not a list of sources ({problem}): {FORMS}")
    if isinstance(value, dict):
        return [{name: weight} for name, weight in value.items()]
    check_config(isinstance(value, list), "dataset", spec, f"is not a list of sources: {FORMS}")
    return value


def _weighted(spec: str, entry: object) -> tuple[str, Fraction | None]:
    """One entry as (source, weight or None): ``name``, ``name: weight`` or ``name:weight``."""
    if isinstance(entry, str):
        glued = _GLUED.match(entry)
        if glued is None or Path(entry).expanduser().is_file():
            return entry, None
        entry = {glued.group(1): glued.group(2)}
    ok = isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry)), str)
    check_config(ok, "dataset", spec, f"has the entry {entry!r}, which is neither a source nor 'source: weight': {FORMS}")
    (name, weight), = entry.items()  # type: ignore[union-attr]
    if weight is None:  # {a, b}: a YAML mapping without values
        return name, None
    if isinstance(weight, str) and re.fullmatch(_NUMBER, weight.strip()):
        weight = float(weight)
    number = isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight)
    check_config(number, "dataset", spec, f"gives '{name}' the weight {weight!r}, not a finite number: write "
                 f"'{name}: 0.5'")
    check_config(weight >= 0, "dataset", spec, f"gives '{name}' the weight {weight}: weights must not be negative")
    return name, Fraction(str(weight))


def window_sources(weights: tuple[Fraction, ...], count: int) -> list[int]:
    """The source index of each of ``count`` windows, by Sainte-Lague's rule (see the module's docstring)."""
    taken = [0] * len(weights)
    order = []
    for _ in range(count):
        best = max(range(len(weights)), key=lambda i: (weights[i] / (2 * taken[i] + 1), -i))
        taken[best] += 1
        order.append(best)
    return order


def check_sources(spec: str, role: Role | None = None) -> None:
    """:func:`check_source` of every source of ``spec``, before a model loads: every file and name first, then
    (with ``role``) the hub's sets, so a typo in the last source is found before the first one downloads."""
    sources = parse_mixture(spec).sources
    for source in sources:
        check_source(source)
    if role is not None:
        for source in sources:
            check_source(source, role)


def mixture_windows(spec: str, tokenizer: object, count: int, seq_len: int, seed: int,
                    encoding: str = "utf-8") -> torch.Tensor:
    """``count`` calibration windows of ``seq_len`` tokens from the sources of ``spec``, drawn with ``seed``."""
    mixture = parse_mixture(spec)
    order = window_sources(mixture.weights, count)
    counts = [order.count(i) for i in range(len(mixture.sources))]
    drawn = [_source_windows(source, n, tokenizer, seq_len, seed, encoding, len(counts) > 1)
             for source, n in zip(mixture.sources, counts, strict=True)]
    taken = [0] * len(counts)
    rows = []
    for i in order:
        rows.append(drawn[i][taken[i]])
        taken[i] += 1
    return torch.stack(rows)


def mixture_summary(spec: str, calibration: int, compensation: int) -> str:
    """How many of the calibration (and compensation) windows each source of ``spec`` gives, for the run's log."""
    mixture = parse_mixture(spec)
    cal, comp = window_sources(mixture.weights, calibration), window_sources(mixture.weights, compensation)
    refit = compensation != calibration
    return ", ".join(f"{cal.count(i)} of {source}" + (f" ({comp.count(i)} of the compensation's)" if refit else "")
                     for i, source in enumerate(mixture.sources))


def _source_windows(source: str, count: int, tokenizer: object, seq_len: int, seed: int, encoding: str,
                    part: bool) -> torch.Tensor:
    """``count`` windows of one source (none read when ``count`` is 0); ``part``: it is one source of several."""
    if count == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    tokens = tokenize(load_text(source, "calibration", encoding), tokenizer)
    available = tokens.numel() // seq_len
    if part and available < count:
        raise DataError(f"Calibration source '{source}' is too short: {tokens.numel()} tokens make {available} "
                        f"windows of seq_len={seq_len}, but its weight gives it {count}. Give it more text, lower "
                        "its weight, or lower num_samples / compensation_samples / seq_len.")
    return calibration_windows(tokens, count, seq_len, seed)
