"""The search as a pipeline step: the seeds from the table, widths read back from a run, the plan of chosen widths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import BudgetError, ConfigError
from gp_lightning.search.evolution import Space
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.uniform import lowest_units, uniform_plan

log = logging.getLogger("gp_lightning")


def seeds(table: pd.DataFrame, layout: ModelLayout, config: SelectionConfig, knapsack: PruningPlan, target: int
          ) -> dict[str, PruningPlan]:
    """The knapsack's plan, and the uniform one where the model's layers allow it."""
    found = {"knapsack": knapsack}
    try:
        found["uniform"] = uniform_plan(table, layout, config, knapsack, target)
    except BudgetError as exc:
        log.info("search: no uniform seed (%s)", exc)
    return found


def plan_of(table: pd.DataFrame, layout: ModelLayout, config: SelectionConfig, kept: np.ndarray) -> PruningPlan:
    """The plan of allocation ``kept``: each block loses its lowest-score units (with ``within_layer: obs``
    compensation chooses them again, for these widths)."""
    space = Space.of(layout, config, 0)
    lost = (space.dense - kept).tolist()
    plan = lowest_units(table, layout, lost[: space.layers], lost[space.layers :], config.remove_empty_layers)
    plan.meta["allocation"] = "search"
    return plan


def reapplied(path_text: str, space: Space) -> np.ndarray:
    """The widths a run's ``analysis/search.json`` chose, checked against this run's model and budget."""
    path = Path(path_text).expanduser()
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["chosen"]
        kept = np.array([*chosen["attention_groups"], *chosen["mlp_channels"]], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"search_widths: {path} is not a search.json of allocation: search ({exc}); pass a run's "
                          "analysis/search.json.") from None
    if kept.shape != space.dense.shape:
        raise ConfigError(f"search_widths: {path} has widths for {len(kept) // 2} layers and this model has "
                          f"{space.layers}: pass the search.json of a run on the same model.")
    if not space.feasible(kept):
        raise ConfigError(f"search_widths: the widths of {path} remove {space.removed(kept):,} parameters or break a "
                          f"limit, and this run must remove {space.target:,} within its limits: use the same "
                          "pruning_ratio and limits as that run.")
    log.info("search widths re-applied from %s (no search)", path)
    return kept
