"""The global group table: one row per pruning unit, importance transformed step by step, ranked by score.

``build`` makes the raw table from per-unit importance, ``normalize`` and ``corrections`` hold the
transforms, ``transforms`` applies them in order, ``saved`` reads a table back for ``--from_table``.
"""

from gp_lightning.table.build import BLOCK, KEY, build_table, rank_order, ranked, rescore
from gp_lightning.table.saved import load_table
from gp_lightning.table.transforms import STAGE_COLUMNS, TableTransforms, transform_table

__all__ = ["BLOCK", "KEY", "STAGE_COLUMNS", "TableTransforms", "build_table", "load_table", "rank_order", "ranked",
           "rescore", "transform_table"]
