"""The calibration data group: which text, and how many windows of how many tokens."""

from __future__ import annotations

from dataclasses import dataclass

from gp_lightning.runtime.errors import check_config


@dataclass
class DataConfig:
    """Calibration data"""

    dataset: str = "wikitext2"
    """Calibration text: ``wikitext2``, ``c4`` (Hugging Face hub) or a local ``.txt``/``.jsonl``/``.parquet``
    file (without hub access: ``../shared/data/wikitext-2/valid.txt``)."""
    num_samples: int = 32
    """Number of calibration windows (random, non-overlapping, chosen with ``seed``)."""
    seq_len: int = 128
    """Tokens per calibration window."""
    batch_size: int = 4
    """Calibration micro-batch size (windows per forward/backward pass)."""

    def __post_init__(self) -> None:
        for key in ("num_samples", "batch_size"):
            check_config(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        check_config(self.seq_len >= 2, "seq_len", self.seq_len, "must be at least 2 tokens")
