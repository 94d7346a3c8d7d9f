"""The declared dependency range is the tested range: fast-moving packages are capped, and what runs is inside."""

from __future__ import annotations

import configparser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FAST_MOVING = ("transformers", "lightning", "peft", "accelerate", "datasets", "torchmetrics", "deepspeed", "gguf",
               "jsonargparse", "safetensors", "lm-eval")


def _requirements() -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    lines += [line for value in parser["options.extras_require"].values() for line in value.splitlines()]
    return {req.name: req for req in (Requirement(line) for line in lines if line.strip())}


def test_fast_moving_dependencies_are_capped_and_the_installed_releases_are_inside() -> None:
    requirements = _requirements()
    for name in FAST_MOVING:
        specifier = requirements[name].specifier
        assert any(spec.operator in ("<", "<=", "==") for spec in specifier), f"{name} has no upper bound"
        try:
            installed = version(name)
        except PackageNotFoundError:  # an extra that this environment did not install (deepspeed in the oldest one)
            continue
        assert specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {specifier}"
