"""The package reads as the pipeline: steps import only earlier steps, and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gp_lightning"

#: The pipeline, in order; runtime is what every step stands on. Only these and TOP exist in the package.
STEPS = ("runtime", "model", "data", "calibration", "table", "selection", "compensation", "search", "surgery",
         "evaluation", "analysis", "export", "finetune")
TOP = ("cli", "config", "pipeline")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE)): ast.parse(path.read_text(encoding="utf-8"))
            for path in PACKAGE.rglob("*.py")}


def _imported(tree: ast.Module) -> set[str]:
    """The gp_lightning step or top module every import (also inside functions) names."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gp_lightning" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_listing_is_the_pipeline() -> None:
    entries = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries == {*STEPS, *TOP, "__init__"}


def test_no_step_imports_a_later_step_or_the_top() -> None:
    upward = []
    for relative, tree in _modules().items():
        step = relative.split("/")[0].removesuffix(".py")
        if step in TOP or step == "__init__":
            continue
        rank = STEPS.index(step)
        for target in _imported(tree):
            if target in TOP or (target in STEPS and STEPS.index(target) > rank):
                upward.append(f"{relative} imports gp_lightning.{target}")
    assert upward == []


def test_no_function_is_longer_than_60_lines() -> None:
    long = []
    for relative, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_the_readme_table_lists_the_packages_one_to_one() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it works", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    listed = {step.strip(): package.strip() for step, package in rows[1:]}  # rows[0] is the header
    assert [step for step in listed if step != "top"] == list(STEPS)
    assert all(listed[step] == f"`{step}/`" for step in STEPS)
    assert listed["top"] == ", ".join(f"`{name}.py`" for name in ("config", "cli", "pipeline"))
