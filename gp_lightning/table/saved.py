"""Reading a saved global group table back (``--from_table``), checked against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gp_lightning.data.sources import not_a_file
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.errors import DataError
from gp_lightning.runtime.io import checksum_path, file_sha256
from gp_lightning.table.build import BLOCK, KEY

REQUIRED = [*KEY, "cost", "importance_raw"]


def load_table(path: str | Path, layout: ModelLayout, allow_unfinished: bool = False) -> pd.DataFrame:
    """The table in model order, with its raw importance (and B/L if they were measured).

    The table must describe exactly this model: the same layers, the same number of attention
    groups and MLP channels per layer, and the same unit costs. ``allow_unfinished``: see
    :func:`run_manifest.require_complete`.
    """
    run_manifest.require_complete(path, "from_table", allow_unfinished=allow_unfinished)  # an unfinished run's
    table = read_table(Path(path))
    fix = "It was made for another model: run --table_only on this model to make its table."
    expected = {(layer.index, "attention"): (layer.num_kv_heads, layout.attention_group_cost(layer))
                for layer in layout.layers if layer.has_attention}
    expected.update({(layer.index, "mlp"): (layer.intermediate_size, layout.mlp_channel_cost(layer))
                     for layer in layout.layers if layer.has_mlp})
    path = Path(path)
    layers = int(table["layer_idx"].max()) + 1
    if layers > layout.num_layers:
        raise DataError(f"from_table: {path} has {layers} layers, the model {layout.num_layers}. {fix}")
    for (layer_idx, kind), rows in table.groupby(["layer_idx", "group_type"]):
        count, cost = expected.pop((int(layer_idx), str(kind)), (0, None))
        if len(rows) != count or sorted(rows["group_idx"]) != list(range(count)):
            raise DataError(f"from_table: layer {layer_idx} {kind} has {len(rows)} units in {path}, the model "
                            f"{count}. {fix}")
        wrong = rows[rows["cost"] != cost]
        if len(wrong):  # the unit that differs, not the group's first row
            raise DataError(f"from_table: {path}: layer {layer_idx} {kind} unit {int(wrong['group_idx'].iloc[0])} "
                            f"costs {int(wrong['cost'].iloc[0])} parameters there, {cost} in the model. {fix}")
    if expected:
        (layer_idx, kind), (count, _) = next(iter(expected.items()))
        raise DataError(f"from_table: {path} has no rows for layer {layer_idx} {kind} ({count} units in the model). {fix}")
    order = {"attention": 0, "mlp": 1}
    table = table.sort_values(["layer_idx", "group_type", "group_idx"], key=lambda c: c.map(order) if c.name ==
                              "group_type" else c).reset_index(drop=True)
    return table


def check_table_file(path: Path) -> None:
    """``path`` is an existing regular file (checked before a run starts), or one line saying what it is instead."""
    kind = not_a_file(path)
    if kind is not None:
        raise DataError(f"from_table: {path} is {kind}, not a file: pass the global_group_table.csv of a --table_only "
                        "run.")
    if not path.is_file():
        raise DataError(f"from_table: {path} does not exist. Pass the global_group_table.csv of a --table_only run.")


def read_table(path: Path) -> pd.DataFrame:
    """The CSV as written by a run: complete (its ``.sha256`` side file, when there is one, matches), with the
    required columns, integer keys and finite, non-negative numbers. Every flaw is one line naming the file."""
    check_table_file(path)
    side = checksum_path(path)
    if side.is_file() and side.read_text(encoding="utf-8").split()[:1] != [file_sha256(path)]:
        raise DataError(f"from_table: {path} is not the file its run wrote (its SHA-256 differs from {side.name}): it "
                        f"was cut short or changed. Use the complete table, or delete {side.name} if you edited it "
                        "on purpose.")
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() > 0:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                raise DataError(f"from_table: {path} ends in the middle of a line: it was cut short. Use the complete "
                                "table.")
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"from_table: {path} is not a readable CSV ({' '.join(str(exc).split())}).") from None
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing or table.empty:
        raise DataError(f"from_table: {path} lacks {'columns ' + str(missing) if missing else 'rows'}: it is not a "
                        "gp-lightning global_group_table.csv.")
    for column, integral in (("layer_idx", True), ("group_idx", True), ("cost", True), ("importance_raw", False)):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float)) | (values < 0).to_numpy()
        if integral:
            bad |= (values.fillna(0) % 1 != 0).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"from_table: {path} line {row + 2}: {column} = '{table[column].iloc[row]}' is not a finite "
                            f"{'non-negative integer' if integral else 'non-negative number'}.")
        table[column] = values.astype("int64") if integral else values.astype("float64")
    return table


def saved_losses(table: pd.DataFrame | None, column: str) -> pd.DataFrame | None:
    """The B (per block) or L (per layer) column of a saved table, if the run that wrote it measured them."""
    if table is None or column not in table.columns or table[column].isna().any():
        return None
    keys = BLOCK if column == "B" else ["layer_idx"]
    return table[[*keys, column]].drop_duplicates(keys).reset_index(drop=True)
