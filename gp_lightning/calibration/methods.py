"""The importance methods by name, and which of them need calibration text."""

from __future__ import annotations

from typing import Literal, get_args

ImportanceMethod = Literal["taylor", "taylor_2nd", "wanda", "magnitude", "random"]
METHODS: tuple[str, ...] = get_args(ImportanceMethod)
#: Methods that need no calibration text at all.
DATA_FREE_METHODS: tuple[str, ...] = ("magnitude", "random")


def needs_calibration_data(method: str) -> bool:
    return method not in DATA_FREE_METHODS
