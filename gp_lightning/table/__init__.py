"""Table: the global group table — one row per pruning unit, importance transformed step by step, ordered by score.

``build`` makes the raw table (and says what a unit, a group and a block are), ``ablation``
measures the skip losses the corrections use, ``normalize`` and ``corrections`` hold the
transforms, ``transforms`` applies them in order, ``saved`` reads a table back for
``--from_table``, ``config`` is the table's argument group.
"""
