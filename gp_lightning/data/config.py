"""The data groups: which text, cut into windows of how many tokens, batched how (calibration, and a base
that fine-tuning's data group extends)."""

from __future__ import annotations

from dataclasses import dataclass

from gp_lightning.data.mixture import parse_mixture
from gp_lightning.runtime.errors import check_config


def _known_encoding(name: str) -> bool:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


@dataclass
class TextConfig:
    """Text"""

    dataset: str = "wikitext2"
    """``wikitext2``, ``c4`` (Hugging Face hub: the train split) or a local ``.txt``/``.jsonl``/``.parquet`` file
    (without hub access, e.g. a WikiText-2 copy's ``valid.txt``); fine-tuning also takes alpaca-style instruction
    records (``.jsonl``/``.json`` with ``instruction``, ``input``, ``output``). Calibration and compensation also
    take a mixture, a list in quotes: ``"[wikitext2, my.jsonl]"`` (equal weights) or
    ``"[wikitext2: 0.7, my.txt: 0.3]"``; its windows are split by the weights, each source's drawn with ``seed``
    (docs/how-it-works.md#calibration-mixtures)."""
    seq_len: int = 128
    """Tokens per window (for instruction data: the most tokens an example keeps)."""
    batch_size: int = 4
    """Windows (examples) per forward/backward pass on each process."""
    text_encoding: str = "utf-8"
    """Encoding of local text files (``dataset`` and ``eval_dataset``), e.g. ``latin-1``; hub datasets are
    decoded by ``datasets``."""

    def __post_init__(self) -> None:
        check_config(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        check_config(_known_encoding(self.text_encoding), "text_encoding", self.text_encoding,
                     "is not an encoding Python knows (e.g. utf-8, latin-1, utf-16)")
        check_config(self.seq_len >= 2, "seq_len", self.seq_len, "must be at least 2 tokens")


@dataclass
class DataConfig(TextConfig):
    """Calibration data"""

    num_samples: int = 32
    """Number of calibration windows (random, non-overlapping, chosen with ``seed``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self.num_samples >= 1, "num_samples", self.num_samples, "must be at least 1")
        parse_mixture(self.dataset)  # a malformed source list is refused before anything runs
