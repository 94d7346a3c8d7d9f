"""The global group table: one row per pruning unit, importance transformed step by step, ranked by score.

``build`` makes the raw table from per-unit importance, ``normalize`` and ``corrections`` hold the
transforms, ``transforms`` applies them in order, ``saved`` reads a table back for ``--from_table``.
"""
