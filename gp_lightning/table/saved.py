"""Reading a saved global group table back (``--from_table``), checked against the model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import DataError
from gp_lightning.table.build import BLOCK, KEY

REQUIRED = [*KEY, "cost", "importance_raw"]


def load_table(path: str | Path, layout: ModelLayout) -> pd.DataFrame:
    """The table in model order, with its raw importance (and B/L if they were measured).

    The table must describe exactly this model: the same layers, the same number of attention
    groups and MLP channels per layer, and the same unit costs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"from_table: {path} does not exist. Pass the global_group_table.csv of a --table_only run.")
    table = pd.read_csv(path)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"from_table: {path} lacks columns {missing}: it is not a gp-lightning global_group_table.csv.")
    fix = "It was made for another model: run --table_only on this model to make its table."
    expected = {(layer.index, "attention"): (layer.num_kv_heads, layout.attention_group_cost(layer))
                for layer in layout.layers if layer.has_attention}
    expected.update({(layer.index, "mlp"): (layer.intermediate_size, layout.mlp_channel_cost(layer))
                     for layer in layout.layers if layer.has_mlp})
    layers = int(table["layer_idx"].max()) + 1
    if layers > layout.num_layers:
        raise DataError(f"from_table: {path} has {layers} layers, the model {layout.num_layers}. {fix}")
    for (layer_idx, kind), rows in table.groupby(["layer_idx", "group_type"]):
        count, cost = expected.pop((int(layer_idx), str(kind)), (0, None))
        if len(rows) != count or sorted(rows["group_idx"]) != list(range(count)):
            raise DataError(f"from_table: layer {layer_idx} {kind} has {len(rows)} units in {path}, the model "
                            f"{count}. {fix}")
        if (rows["cost"] != cost).any():
            raise DataError(f"from_table: layer {layer_idx} {kind} units cost {int(rows['cost'].iloc[0])} parameters "
                            f"in {path}, {cost} in the model. {fix}")
    if expected:
        (layer_idx, kind), (count, _) = next(iter(expected.items()))
        raise DataError(f"from_table: {path} has no rows for layer {layer_idx} {kind} ({count} units in the model). {fix}")
    if table["importance_raw"].isna().any() or (table["importance_raw"] < 0).any():
        raise DataError(f"from_table: {path} has missing or negative importance_raw values.")
    order = {"attention": 0, "mlp": 1}
    table = table.sort_values(["layer_idx", "group_type", "group_idx"], key=lambda c: c.map(order) if c.name ==
                              "group_type" else c).reset_index(drop=True)
    return table


def saved_losses(table: pd.DataFrame | None, column: str) -> pd.DataFrame | None:
    """The B (per block) or L (per layer) column of a saved table, if the run that wrote it measured them."""
    if table is None or column not in table.columns or table[column].isna().any():
        return None
    keys = BLOCK if column == "B" else ["layer_idx"]
    return table[[*keys, column]].drop_duplicates(keys).reset_index(drop=True)
