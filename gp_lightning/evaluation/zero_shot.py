"""Zero-shot accuracy through lm-evaluation-harness (``lm-eval``), of a model in memory.

:func:`evaluate_tasks` wraps the model and its tokenizer in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on the tasks ``--tasks`` names: lm-eval task or group names (their data
comes from the Hugging Face hub, or from the datasets cache when the hub cannot be reached),
``llm-pruner`` (the seven tasks of LLM-Pruner's table), task YAML files and folders of them (local
data: ``gp-lightning build-tasks``). Everything that can be wrong with them (an unknown name, a YAML
that does not parse, data that cannot be loaded) is found by :meth:`TaskSet.check` before a model
loads. The summary keeps lm-eval's own numbers (``lm_eval.results``) and, per task, ``acc`` and
``acc_norm`` with their stderr and the one metric reported for it (:data:`LLM_PRUNER_METRICS`).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gp_lightning.runtime import console  # noqa: F401 - its filters hide lm-eval's notes about in-memory models
from gp_lightning.runtime.errors import ConfigError, DataError
from gp_lightning.runtime.io import write_json, write_text

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from gp_lightning.evaluation.config import EvaluationWindows

log = logging.getLogger("gp_lightning")

#: The seven zero-shot tasks LLM-Pruner, FLAP, SlimGPT and SlimLLM report (``--tasks llm-pruner``).
LLM_PRUNER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

#: The lm-eval metric each column of LLM-Pruner's zero-shot table matches: its paper's BoolQ, PIQA, WinoGrande and
#: ARC-e figures are lm-eval's ``acc``, its HellaSwag, ARC-c and OBQA figures ``acc_norm`` (horseee/LLM-Pruner#25
#: reproduces the table with both). Other tasks report ``acc`` where lm-eval has it.
LLM_PRUNER_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                      "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}

CONVENTION = ("reported: acc_norm for hellaswag, arc_challenge and openbookqa, acc for the other tasks (the metric "
              "each column of LLM-Pruner's table matches); a task without acc: acc_norm, else its first metric. "
              "average: the mean of the reported metric over the tasks named (a group counts once)")

TASK_FORMS = ("name an lm-eval task or group (`lm-eval ls tasks` lists them), llm-pruner, or a task YAML file or "
              "folder (gp-lightning build-tasks writes two that need no hub)")


@dataclass
class TaskSet:
    """What ``--tasks`` names: the specs ``simple_evaluate`` is given, and whether lm-eval's own tasks are among them."""

    text: str
    specs: list[str]
    hub: bool  # lm-eval's own tasks: their YAMLs are indexed, their data comes from the hub or the datasets cache
    folders: list[str] = field(default_factory=list)  # indexed too: a group there names its tasks
    hub_unreachable: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> TaskSet:
        """Split and expand ``text``; a path must be a task YAML that parses, or a folder of them; a name must be
        known to lm-eval. Nothing is loaded yet (:meth:`check`)."""
        items = [item.strip() for item in str(text).split(",") if item.strip()]
        if not items:
            raise ConfigError(f"--tasks {text!r} names no task: {TASK_FORMS}.")
        specs: list[str] = []
        folders: list[str] = []
        for item in items:
            found, folder = _expand(item)
            specs += [spec for spec in found if spec not in specs]
            folders += [folder] if folder else []
        tasks = cls(str(text), specs, any(not _is_path(spec) for spec in specs), folders)
        if tasks.hub:
            tasks.check_names()
        return tasks

    @functools.cached_property
    def manager(self) -> TaskManager:
        """lm-eval's task index: its own tasks only when they are named (indexing them takes seconds, once)."""
        from lm_eval.tasks import TaskManager

        if self.hub and not self.folders:
            return _lm_eval_tasks()
        return TaskManager(include_path=self.folders or None, include_defaults=self.hub)

    def check_names(self) -> None:
        known = self.manager.task_index
        for spec in self.specs:
            if not _is_path(spec) and spec not in known:
                close = difflib.get_close_matches(spec, list(known), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"--tasks: unknown lm-eval task '{spec}'{hint}: {TASK_FORMS}.")

    def check(self) -> TaskSet:
        """Load every task (and its data) once, so that a missing data set stops the run before a model loads."""
        if self.hub:
            from gp_lightning.data.sources import _hub_unreachable

            self.hub_unreachable = _hub_unreachable()
        for spec in self.specs:
            try:
                with self.offline(), _quiet_lm_eval():
                    self.manager.load([spec])
            except Exception as exc:  # lm-eval and datasets raise many kinds for one cause: the task cannot load
                raise DataError(self._cannot_load(spec, exc)) from exc
        return self

    def _cannot_load(self, spec: str, exc: Exception) -> str:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        if _is_path(spec):
            return (f"--tasks: task YAML {spec} does not load ({type(exc).__name__}: {reason}). Fix its keys (task, "
                    "dataset_path, data_files, doc_to_text, ...; gp-lightning build-tasks writes working examples).")
        if self.hub_unreachable is not None:
            return (f"--tasks: lm-eval task '{spec}' needs its data set from the Hugging Face hub, which could not be "
                    f"reached ({self.hub_unreachable}), and the datasets cache has no copy ({reason}). Connect to the "
                    "hub once, or evaluate local tasks (gp-lightning build-tasks --text test.txt --output DIR; "
                    "--tasks DIR).")
        return f"--tasks: lm-eval task '{spec}' could not be loaded ({type(exc).__name__}: {reason})."

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """datasets and the hub client offline unless lm-eval's own tasks are named and the hub answers."""
        from gp_lightning.data.sources import _offline

        with _offline(not self.hub or self.hub_unreachable is not None):
            yield


@functools.lru_cache(maxsize=1)
def _lm_eval_tasks() -> TaskManager:
    """The index of lm-eval's own tasks (they do not change while a process runs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _is_path(item: str) -> bool:
    return "/" in item or item.endswith((".yaml", ".yml")) or Path(item).expanduser().exists()


def _expand(item: str) -> tuple[list[str], str | None]:
    """The specs one ``--tasks`` item stands for, and the folder to index with them (a folder of task YAMLs)."""
    if item == "llm-pruner":
        return list(LLM_PRUNER_TASKS), None
    if not _is_path(item):
        return [item], None
    path = Path(item).expanduser()
    if path.is_dir():
        return _folder_tasks(path), str(path.resolve())
    if not path.is_file():
        raise ConfigError(f"--tasks {item}: no such task YAML file or folder: {TASK_FORMS}.")
    if _task_name(path) is None:
        raise ConfigError(f"--tasks: {path} is YAML but not an lm-eval task: it has no task: (or group:) key.")
    return [str(path.resolve())], None


def _task_name(path: Path) -> tuple[str, list[str]] | None:
    """The task's (or group's) name in a task YAML and the tasks a group names, read as lm-eval reads it; None for
    YAML without task: or group: (a template others include); one line when it does not parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=False)
    except Exception as exc:  # YAMLError, a missing include, a list instead of a mapping
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"--tasks: task YAML {path} does not parse ({reason}). Fix the file: an lm-eval task YAML "
                          "is a mapping with task:, dataset_path:, doc_to_text: ... (gp-lightning build-tasks writes "
                          "working examples).") from None
    if "group" in config:
        tasks = config.get("task") or []
        return config["group"], [t if isinstance(t, str) else t.get("task", "") for t in tasks]
    return (config["task"], []) if "task" in config else None


def _folder_tasks(folder: Path) -> list[str]:
    """The task YAMLs of a folder to run: its groups, and its tasks that belong to none of them."""
    named = {path: _task_name(path) for path in sorted(folder.rglob("*.yaml"))}
    found = {path: name for path, name in named.items() if name is not None}
    if not found:
        raise ConfigError(f"--tasks {folder}: the folder holds no task YAML (*.yaml): {TASK_FORMS}.")
    grouped = {name for _, members in found.values() for name in members}
    return [str(path.resolve()) for path, (name, _) in found.items() if name not in grouped]


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's prints on stderr (stdout is the caller's table), no datasets progress bars for cached data, no
    environment report (its git lookup prints to the terminal, torch's collect_env takes a second), and the random
    generators it seeds (Python's, numpy's, torch's) as they were: a caller's own streams go on undisturbed."""
    from unittest import mock

    import datasets
    import lm_eval.evaluator
    import numpy as np
    import torch

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    versions = {"lm_eval_version": _version("lm_eval"), "transformers_version": _version("transformers")}
    states = random.getstate(), np.random.get_state()
    try:
        with contextlib.redirect_stdout(sys.stderr), torch.random.fork_rng(range(torch.cuda.device_count())), \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None), \
                mock.patch.object(lm_eval.evaluator, "add_env_info", lambda storage: storage.update(versions)):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def evaluate_tasks(model: Any, tokenizer: Any, tasks: str | TaskSet, num_fewshot: int = 0, limit: int | None = None,
                   batch_size: int = 8, precision: str = "32-true") -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` (in memory, any causal LM transformers runs) on ``tasks``: what
    ``lm_eval.simple_evaluate`` returns for lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``, summarized
    (:func:`summarize`; lm-eval's own numbers under ``lm_eval``). ``tasks``: the ``--tasks`` text or a checked
    :class:`TaskSet`; ``limit``: the first N items of each task; ``precision``: bf16 ones autocast to bf16."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    task_set = tasks if isinstance(tasks, TaskSet) else TaskSet.parse(tasks).check()
    start = time.perf_counter()
    with task_set.offline(), _quiet_lm_eval():
        # a copy of the tokenizer: lm-eval may give it a pad token; causal: lm-eval's registry lacks gp_pruned
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size,
                  mixed_precision_dtype=torch.bfloat16 if precision.startswith("bf16") else None)
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(task_set.specs), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_set.manager, log_samples=False)
    settings = {"requested": task_set.text, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                "precision": precision, "seconds": time.perf_counter() - start}
    return summarize(raw, settings)


def summarize(raw: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Per task its metrics (value, stderr), the reported one, its items; the average of the reported metric over
    the tasks named; the settings; and lm-eval's own output (``lm_eval``: results, n-shot, n-samples, versions)."""
    results = raw["results"]
    members = {name for children in raw.get("group_subtasks", {}).values() for name in children}
    tasks = {name: _task_row(name, values, raw.get("n-samples", {}).get(name), name not in members)
             for name, values in results.items()}
    named = [row["value"] for row in tasks.values() if row["top"] and row["value"] is not None]
    return {"tasks": tasks, "average": sum(named) / len(named) if named else None, "convention": CONVENTION,
            **settings, "lm_eval_version": raw.get("lm_eval_version"),
            "lm_eval": {key: raw.get(key) for key in ("results", "group_subtasks", "n-shot", "n-samples", "versions",
                                                      "higher_is_better")}}


def _task_row(name: str, values: dict[str, Any], samples: dict[str, int] | None, top: bool) -> dict[str, Any]:
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in values.items():
        metric, _, kind = key.partition(",")
        if kind and not metric.endswith("_stderr"):
            label = metric if kind == "none" else f"{metric} ({kind})"
            metrics[label] = {"value": _number(value), "stderr": _number(values.get(f"{metric}_stderr,{kind}"))}
    preferred = [LLM_PRUNER_METRICS.get(name), "acc", "acc_norm", *metrics]
    reported = next((metric for metric in preferred if metric in metrics), None)
    chosen = metrics.get(reported or "", {})
    return {"metric": reported, "value": chosen.get("value"), "stderr": chosen.get("stderr"), "metrics": metrics,
            "items": (samples or {}).get("effective"), "top": top}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None  # "N/A", NaN: none


def _percent(metric: dict[str, float | None] | None) -> str:
    if not metric or metric.get("value") is None:
        return "-"
    stderr = metric.get("stderr")
    return f"{100 * metric['value']:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.2f}")


def to_markdown(summary: dict[str, Any], title: str | None = None) -> str:
    """The summary as a markdown table: a row per task (acc, acc_norm, the reported value), then the average."""
    lines = [f"### {title}\n"] if title else []
    lines += ["| task | acc (%) | acc_norm (%) | reported | items |", "| --- | ---: | ---: | --- | ---: |"]
    for name, row in summary["tasks"].items():
        shown = name if row["top"] else f"- {name}"
        value = "-" if row["value"] is None else f"{row['metric']} {100 * row['value']:.2f}"
        lines.append(f"| {shown} | {_percent(row['metrics'].get('acc'))} | {_percent(row['metrics'].get('acc_norm'))} "
                     f"| {value} | {row['items'] if row['items'] is not None else '-'} |")
    average = "-" if summary["average"] is None else f"{100 * summary['average']:.2f}"
    lines.append(f"| **average** | | | {average} | |")
    limit = "all items" if summary["limit"] is None else f"the first {summary['limit']} items of each task"
    lines.append(f"\nlm-eval {summary['lm_eval_version']}, {summary['num_fewshot']}-shot, {limit}, batch "
                 f"{summary['batch_size']}, {summary['precision']}, {summary['seconds']:.1f} s. {CONVENTION}.")
    return "\n".join(lines) + "\n"


def reported_scores(summary: dict[str, Any]) -> dict[str, tuple[str | None, float | None]]:
    """``task -> (metric, value)`` of the tasks named (a group's members left out), and ``average``."""
    scores = {name: (row["metric"], row["value"]) for name, row in summary["tasks"].items() if row["top"]}
    return scores | {"average": (None, summary["average"])}


def zero_shot_table(summaries: dict[str, dict[str, Any]]) -> str:
    """LLM-Pruner's layout: a row per model, a column per task (its reported metric, %), and the average."""
    columns: dict[str, str | None] = {}
    for summary in summaries.values():
        for name, (metric, _) in reported_scores(summary).items():
            columns.setdefault(name, metric)
    header = [name if metric is None else f"{name} ({metric})" for name, metric in columns.items()]
    lines = ["| model | " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(columns)]
    for model, summary in summaries.items():
        scores = reported_scores(summary)
        cells = ["-" if scores.get(name, (None, None))[1] is None else f"{100 * scores[name][1]:.2f}" for name in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_zero_shot(directory: Path, summary: dict[str, Any], markdown: str | None = None) -> None:
    """``zero_shot.json`` (the summary) and ``zero_shot.md`` (its table) in ``directory``, each written atomically."""
    write_json(directory / "zero_shot.json", summary)
    write_text(directory / "zero_shot.md", markdown or to_markdown(summary))


@dataclass(frozen=True)
class ZeroShot:
    """A run's zero-shot evaluation (``eval_tasks`` and the keys beside it), its tasks checked."""

    tasks: TaskSet
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 8

    @classmethod
    def of(cls, config: EvaluationWindows) -> ZeroShot | None:
        """None without ``eval_tasks``; else the tasks parsed and loaded (a bad one stops the run here)."""
        if not config.eval_tasks:
            return None
        return cls(TaskSet.parse(config.eval_tasks).check(), config.eval_num_fewshot, config.eval_limit,
                   config.eval_batch_size)

    def evaluate(self, model: Any, tokenizer: Any, precision: str = "32-true") -> dict[str, Any]:
        return evaluate_tasks(model, tokenizer, self.tasks, self.num_fewshot, self.limit, self.batch_size, precision)

    def measure(self, model: Any, tokenizer: Any, precision: str, run_dir: Path, results: dict[str, Any],
                timings: dict[str, float]) -> dict[str, Any]:
        """Evaluate, write ``run_dir/evaluation/zero_shot.json`` and ``.md``, put the reported values into
        ``results["zero_shot"]`` and the seconds into ``timings["zero_shot_s"]``."""
        summary = self.evaluate(model, tokenizer, precision)
        write_zero_shot(run_dir / "evaluation", summary)
        scores = {name: value for name, (_, value) in reported_scores(summary).items()}
        results["zero_shot"] = scores
        timings["zero_shot_s"] = summary["seconds"]
        shown = ", ".join(f"{name} {value:.4f}" for name, value in scores.items() if value is not None)
        log.info("zero-shot accuracy (%s): %s (%s)", self.tasks.text, shown, run_dir / "evaluation" / "zero_shot.md")
        return summary
