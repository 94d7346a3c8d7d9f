"""Fine-tuning examples: plain-text windows (loss on every token) or instruction records (loss on the response).

Every example is ``{"input_ids", "labels"}``; a label of -100 is a token the loss ignores (the
prompt of an instruction record, or padding). The validation examples are held out of the same
data, disjoint from the training examples, so picking the best epoch never looks at the held-out
perplexity text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from gp_lightning.data.sources import json_record, load_text, read_text
from gp_lightning.data.windows import calibration_windows, tokenize
from gp_lightning.runtime.errors import DataError

IGNORE = -100
Example = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Instruction:
    """One alpaca-style record: the prompt is instruction (+ input); the loss is on ``output``."""

    instruction: str
    input: str
    output: str


def instruction_records(source: str, encoding: str = "utf-8") -> list[Any] | None:
    """The records of a local ``.jsonl``/``.json`` whose first record has ``instruction`` and ``output``, else None.

    The file is parsed once here; the records are then turned into :class:`Instruction` s.
    """
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix.lower() not in {".jsonl", ".json"}:
        return None
    records = _json_records(path, encoding)
    ok = bool(records) and isinstance(records[0], dict) and {"instruction", "output"} <= records[0].keys()
    return records if ok else None


def _json_records(path: Path, encoding: str = "utf-8") -> list[Any]:
    text = read_text(path, encoding)
    if text.lstrip().startswith("["):  # a JSON array (alpaca_data.json) rather than JSON lines
        records = json_record(text, str(path))
        return records if isinstance(records, list) else [records]
    return [json_record(line, f"{path}:{lineno}") for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_instructions(records: list[Any], source: str) -> list[Instruction]:
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(
                record.get("output"), str):
            raise DataError(f"{source}: record {i} needs string fields 'instruction' and 'output' (and optionally "
                            "'input'), as in alpaca-style data.")
        out.append(Instruction(record["instruction"], str(record.get("input") or ""), record["output"]))
    return out


def _split_counts(available: int, finetune_samples: int | None, val_samples: int, what: str) -> tuple[int, int]:
    wanted_train = finetune_samples if finetune_samples is not None else available - val_samples
    if wanted_train < 1 or available < wanted_train + val_samples:
        raise DataError(
            f"Too little fine-tuning data: it holds {available} {what}, but finetune_samples="
            f"{finetune_samples} + val_samples={val_samples} were requested. Give more data, or lower "
            "finetune_samples / val_samples / seq_len."
        )
    return wanted_train, val_samples


def text_examples(source: str, tokenizer: Any, seq_len: int, finetune_samples: int | None, val_samples: int,
                  seed: int, encoding: str = "utf-8") -> tuple[list[Example], list[Example]]:
    """Non-overlapping windows of ``seq_len`` tokens, chosen with ``seed``: (train, validation)."""
    tokens = tokenize(load_text(source, "calibration", encoding), tokenizer)
    train_n, val_n = _split_counts(tokens.numel() // seq_len, finetune_samples, val_samples,
                                   f"windows of seq_len={seq_len} tokens")
    windows = calibration_windows(tokens, train_n + val_n, seq_len, seed)
    examples = [{"input_ids": w, "labels": w.clone()} for w in windows]
    return examples[val_n:], examples[:val_n]


def render_prompt(record: Instruction, tokenizer: Any, prompt_format: str) -> list[int]:
    """Token ids of the prompt: the chat template's user turn, or plain labelled sections."""
    user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                            add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = f"Instruction:\n{record.instruction}\n\n"
    if record.input:
        text += f"Input:\n{record.input}\n\n"
    return list(tokenizer(text + "Response:\n", add_special_tokens=True)["input_ids"])


def instruction_example(record: Instruction, tokenizer: Any, prompt_format: str, seq_len: int) -> Example | None:
    """Prompt + response (+ EOS), truncated to ``seq_len``; labels are -100 on the prompt. None if no response fits."""
    prompt = render_prompt(record, tokenizer, prompt_format)
    response = list(tokenizer(record.output, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    ids = (prompt + response)[:seq_len]
    if len(prompt) >= len(ids):
        return None
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt)] = IGNORE
    return {"input_ids": input_ids, "labels": labels}


def resolve_prompt_format(prompt_format: str, tokenizer: Any) -> str:
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("prompt_format: chat needs a tokenizer with a chat template; this one has none. Use "
                        "prompt_format: plain (or auto).")
    return prompt_format


def instruction_examples(source: str, raw: list[Any], tokenizer: Any, seq_len: int, finetune_samples: int | None,
                         val_samples: int, seed: int, prompt_format: str = "auto") -> tuple[list[Example], list[Example]]:
    """Alpaca-style records (``raw``, parsed from ``source``), shuffled with ``seed``: (train, validation)."""
    records = read_instructions(raw, source)
    random.Random(seed).shuffle(records)
    fmt = resolve_prompt_format(prompt_format, tokenizer)
    examples = [e for e in (instruction_example(r, tokenizer, fmt, seq_len) for r in records) if e is not None]
    if records and not examples:
        raise DataError(f"No record of {source} has room for its response within seq_len={seq_len}: raise seq_len.")
    train_n, val_n = _split_counts(len(examples), finetune_samples, val_samples,
                                   f"usable records (of {len(records)}; seq_len={seq_len})")
    return examples[val_n : val_n + train_n], examples[:val_n]


def load_examples(source: str, data_format: str, tokenizer: Any, seq_len: int, finetune_samples: int | None,
                  val_samples: int, seed: int, prompt_format: str = "auto", encoding: str = "utf-8"
                  ) -> tuple[list[Example], list[Example]]:
    """Training and validation examples of ``source`` in ``data_format`` (``auto`` looks at the records)."""
    raw = instruction_records(source, encoding) if data_format != "text" else None
    if data_format == "instruction" and raw is None:
        raise DataError(f"data_format: instruction needs a local .jsonl/.json of records with 'instruction' and "
                        f"'output' fields; '{source}' is not one.")
    if raw is not None:
        return instruction_examples(source, raw, tokenizer, seq_len, finetune_samples, val_samples, seed,
                                    prompt_format)
    return text_examples(source, tokenizer, seq_len, finetune_samples, val_samples, seed, encoding)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: padding has attention 0 and label -100."""
    length = max(e["input_ids"].numel() for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = example["input_ids"].numel()
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["labels"][row, :n] = example["labels"]
        batch["attention_mask"][row, :n] = 1
    return batch


class FinetuneData(L.LightningDataModule):
    """Shuffled training batches and fixed validation batches, each rank reading its share.

    The order is one seeded permutation per epoch whatever the world size (``DistributedSampler``
    with ``seed``; Lightning advances its epoch), and rank r takes every world-th example of it. So
    N ranks with ``batch_size`` b see, step by step, exactly the examples one process sees with
    ``batch_size`` N*b: the runs are the same training, which the tests check.
    """

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, pad_id: int, seed: int) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=shuffle,  # type: ignore[arg-type]
                                     seed=self.seed)
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler,  # type: ignore[arg-type]
                          collate_fn=partial(collate, pad_id=self.pad_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)


def pad_token_id(tokenizer: Any) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0
