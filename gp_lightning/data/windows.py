"""Text into token windows: one tokenized stream, cut into fixed windows (nothing is padded).

Calibration takes random non-overlapping windows (seeded), evaluation consecutive ones from the
start (the guides' protocol); :func:`rank_shard` splits windows over data-parallel ranks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from gp_lightning.runtime.errors import DataError

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
