"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Sources are a Hugging Face dataset name (``wikitext2``, ``c4``: loaded with ``datasets`` for users
who reach the hub) or a local ``.txt`` / ``.jsonl`` / ``.parquet`` file. Text is tokenized as one
stream and cut into fixed windows, so every window is full and nothing is padded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gp_lightning.runtime.errors import DataError

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


def load_text(source: str, role: Role, encoding: str = "utf-8") -> str:
    """Return the raw text of ``source`` for the given role (calibration or evaluation); local files are decoded
    with ``encoding``."""
    check_source(source)
    path = Path(source).expanduser()
    return _read_local(path, encoding) if path.is_file() else _read_hub(source, role)


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


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; a file that is not ``encoding`` text (latin-1, UTF-16, binary) is a one-line error naming it,
    the byte offset and the fix."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not {encoding} text: byte {exc.start} is 0x{data[exc.start]:02x}. Pass its "
                        f"encoding (e.g. --text_encoding latin-1) or convert it (iconv -f latin1 -t utf-8 {path.name} "
                        f"> {path.stem}.utf8{path.suffix}).") from None


def json_record(line: str, where: str) -> object:
    """One JSON value; a malformed one is a one-line error naming the file, line and column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None


def _read_local(path: Path, encoding: str = "utf-8") -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_text(path, encoding)
    if suffix in {".jsonl", ".json"}:
        texts = []
        for lineno, line in enumerate(read_text(path, encoding).splitlines(), 1):
            if line.strip():
                texts.append(_text_field(json_record(line, f"{path}:{lineno}"), f"{path}:{lineno}"))
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


