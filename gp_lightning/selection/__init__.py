"""Selection: which units go. ``constraints`` holds the per-layer limits, ``greedy`` the knapsack,
``result`` what came out (the plan, budget figures and a per-layer summary)."""

from gp_lightning.selection.constraints import LayerLimits, SelectionConstraints
from gp_lightning.selection.greedy import check_budget, select
from gp_lightning.selection.result import Selection, layer_summary

__all__ = ["LayerLimits", "Selection", "SelectionConstraints", "check_budget", "layer_summary", "select"]
