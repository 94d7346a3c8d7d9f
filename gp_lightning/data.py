"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Sources are a Hugging Face dataset name (``wikitext2``, ``c4``: loaded with ``datasets`` for users
who reach the hub) or a local ``.txt`` / ``.jsonl`` / ``.parquet`` file. Text is tokenized as one
stream and cut into fixed windows, so every window is full and nothing is padded.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from gp_lightning.errors import DataError

Role = Literal["calibration", "evaluation"]

@dataclass(frozen=True)
class HubDataset:
    """A dataset known by name: where it lives on the hub, and the split each role reads."""

    path: str
    splits: dict[str, str]  # role -> split
    name: str | None = None
    data_files: dict[str, str] | None = None  # role -> file (for repos that are plain file trees)

    def load_kwargs(self, role: Role) -> dict[str, object]:
        split = self.splits[role]
        kwargs: dict[str, object] = {"split": split}
        if self.name:
            kwargs["name"] = self.name
        if self.data_files:
            kwargs["data_files"] = {split: self.data_files[role]}
        return kwargs


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", {"calibration": "train", "evaluation": "test"}, name="wikitext-2-raw-v1"),
    "c4": HubDataset(
        "allenai/c4",
        {"calibration": "train", "evaluation": "validation"},
        data_files={
            "calibration": "en/c4-train.00000-of-01024.json.gz",
            "evaluation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}

LOCAL_HINT = "a local file works everywhere, e.g. ../shared/data/wikitext-2/valid.txt"


def load_text(source: str, role: Role) -> str:
    """Return the raw text of ``source`` for the given role (calibration or evaluation)."""
    check_source(source)
    path = Path(source).expanduser()
    return _read_local(path) if path.is_file() else _read_hub(source, role)


def check_source(source: str) -> None:
    """Fail now, with the fix, if ``source`` is neither an existing file nor a known dataset name."""
    path = Path(source).expanduser()
    if path.is_file() or source in HUB_DATASETS:
        return
    if path.suffix in {".txt", ".jsonl", ".json", ".parquet"} or "/" in source:
        raise DataError(f"Dataset file '{source}' does not exist (looked in {path.resolve()}).")
    raise DataError(
        f"Unknown dataset '{source}'. Use one of {', '.join(HUB_DATASETS)} (Hugging Face hub) or the "
        f"path of a .txt, .jsonl or .parquet file; {LOCAL_HINT}."
    )


def _read_local(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix in {".jsonl", ".json"}:
        texts = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    texts.append(_text_field(json.loads(line), f"{path}:{lineno}"))
        return "\n\n".join(texts)
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if "text" not in frame.columns:
            raise DataError(f"{path} has no 'text' column (columns: {list(frame.columns)}).")
        return "\n\n".join(frame["text"].astype(str))
    raise DataError(f"Cannot read '{path}': use a .txt, .jsonl or .parquet file.")


def _text_field(record: object, where: str) -> str:
    if isinstance(record, dict):
        for key in ("text", "content", "document"):
            if isinstance(record.get(key), str):
                return record[key]
    raise DataError(f"{where}: expected a JSON object with a 'text' field.")


def _read_hub(name: str, role: Role) -> str:
    import datasets

    spec = HUB_DATASETS[name]
    kwargs = spec.load_kwargs(role)
    try:
        ds = datasets.load_dataset(spec.path, **kwargs)
    except Exception as exc:  # network, auth, missing split: all end the same way for the user
        raise DataError(
            f"Could not load dataset '{name}' ({spec.path}, split {kwargs['split']}) from the Hugging Face "
            f"hub: {exc}. Without hub access pass a local file instead; {LOCAL_HINT}."
        ) from exc
    return "\n\n".join(ds["text"])


#: Recently tokenized texts, by (text digest, tokenizer fingerprint): one process that runs several jobs on
#: the same text (bench/quality.py, `gp-lightning evaluate`, the tests) tokenizes it once.
_TOKENIZED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_TOKENIZED_MAX = 4


def _fingerprint(tokenizer: object) -> str:
    """What makes two tokenizers tokenize alike: their class, vocabulary size and full serialized state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))  # type: ignore[attr-defined]
    digest = hashlib.sha1(state.encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{digest}"  # type: ignore[arg-type]


def tokenize(text: str, tokenizer: object) -> torch.Tensor:
    """Tokenize ``text`` as one stream (no special tokens) into a 1-D LongTensor (a fresh copy each call)."""
    key = (hashlib.sha1(text.encode("utf-8")).hexdigest(), _fingerprint(tokenizer))
    if key not in _TOKENIZED:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
        _TOKENIZED[key] = torch.tensor(ids, dtype=torch.long)
        while len(_TOKENIZED) > _TOKENIZED_MAX:
            _TOKENIZED.popitem(last=False)
    _TOKENIZED.move_to_end(key)
    return _TOKENIZED[key].clone()


def calibration_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen with ``seed``."""
    available = tokens.numel() // seq_len
    if available < num_samples:
        raise DataError(
            f"Calibration text is too short: {tokens.numel()} tokens make {available} windows of "
            f"seq_len={seq_len}, but num_samples={num_samples} were requested. Give more text "
            "(a larger dataset file) or lower num_samples / seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[:num_samples] * seq_len
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text (the guides' protocol)."""
    available = tokens.numel() // seq_len
    if available == 0:
        raise DataError(
            f"Evaluation text is too short: {tokens.numel()} tokens, fewer than eval_seq_len={seq_len}."
        )
    count = available if max_windows is None else min(available, max_windows)
    return tokens[: count * seq_len].view(count, seq_len)


def rank_shard(num_windows: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window indices of ``rank`` and their weights: contiguous, equal-length shards.

    Every rank gets ``ceil(n / world_size)`` windows so all ranks run the same number of steps
    (FSDP and DDP synchronize inside every step); the shortfall of the last ranks is filled with
    copies of window 0 with weight 0, which contribute nothing to any statistic.
    """
    per_rank = -(-num_windows // world_size)
    indices = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    weights = (indices < num_windows).to(torch.float32)
    return torch.where(indices < num_windows, indices, torch.zeros_like(indices)), weights


class CalibrationData(L.LightningDataModule):
    """Calibration windows as a LightningDataModule, yielding ``(input_ids, weights)`` batches.

    Each rank reads its own contiguous shard (:func:`rank_shard`); a single process reads all
    windows. ``skip_batches`` skips the first batches of the shard (resuming an interrupted pass).
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, skip_batches: int = 0) -> None:
        super().__init__()
        self.windows = windows
        self.batch_size = batch_size
        self.skip_batches = skip_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        indices, weights = rank_shard(self.windows.shape[0], rank, world)
        start = self.skip_batches * self.batch_size
        dataset = TensorDataset(self.windows[indices][start:], weights[start:])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
