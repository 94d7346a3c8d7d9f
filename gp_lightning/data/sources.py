"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Sources are a Hugging Face dataset name (``wikitext2``, ``c4``: loaded with ``datasets`` from the hub,
or from the datasets cache when the hub cannot be reached) or a local ``.txt`` / ``.jsonl`` / ``.parquet``
file. :func:`check_source` finds a missing one before a model loads. Text is tokenized as one stream and
cut into fixed windows, so every window is full and nothing is padded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

#: The way on without the hub, the end of every hub error.
LOCAL_TEXT = ("pass local text with --dataset (calibration) and --eval_dataset (evaluation), e.g. the valid.txt and "
              "test.txt of a WikiText-2 copy (make demo DEMO_DATA=<its folder> passes them)")


def load_text(source: str, role: Role, encoding: str = "utf-8") -> str:
    """Return the raw text of ``source`` for the given role (calibration or evaluation); local files are decoded
    with ``encoding``."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_local(path, encoding)
    _check_name(source)
    return "\n\n".join(_load_hub(source, role)["text"])


def check_source(source: str, role: Role | None = None) -> None:
    """Fail now, before a model loads, if :func:`load_text` could not give ``source``: a missing file, an unknown
    name, and with ``role``, a hub dataset that neither the hub nor the datasets cache has (its split for ``role``
    is downloaded here, into the datasets cache that :func:`load_text` then reads)."""
    if not Path(source).expanduser().is_file():
        _check_name(source)
        if role is not None:
            _load_hub(source, role)


def _check_name(source: str) -> None:
    """``source`` (not an existing file) is a known dataset name, or a one-line error."""
    if source in HUB_DATASETS:
        return
    path = Path(source).expanduser()
    if path.suffix in {".txt", ".jsonl", ".json", ".parquet"} or "/" in source:
        raise DataError(f"Dataset file '{source}' does not exist (looked in {path.resolve()}).")
    raise DataError(
        f"Unknown dataset '{source}'. Use one of {', '.join(HUB_DATASETS)} (Hugging Face hub) or the "
        "path of a .txt, .jsonl or .parquet file."
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


def _load_hub(name: str, role: Role) -> Any:
    """The hub dataset ``name``'s split for ``role``; when the hub cannot be reached, the datasets cache's copy."""
    import datasets

    spec = HUB_DATASETS[name]
    kwargs = spec.load_kwargs(role)
    what = f"Dataset '{name}' ({spec.path}, split {kwargs['split']})"
    unreachable = _hub_unreachable()
    try:
        with _offline(unreachable is not None):  # only the cache can serve it then: at once, without retries
            return datasets.load_dataset(spec.path, **kwargs)
    except ConnectionError as exc:  # datasets' word for offline or unreachable, with no cached copy
        reason = unreachable or " ".join(str(exc).split())
        raise DataError(f"{what}: the Hugging Face hub could not be reached ({reason}) and the datasets cache has "
                        f"no copy. Connect to the hub, or {LOCAL_TEXT}.") from exc
    except Exception as exc:  # authentication, a missing split: all end the same way for the user
        raise DataError(f"{what} could not be loaded from the Hugging Face hub: {' '.join(str(exc).split())}. "
                        f"Without hub access, {LOCAL_TEXT}.") from exc


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (offline mode, no network, no answer), or None: one request within
    ``HF_HUB_ETAG_TIMEOUT`` (10 s) where the hub client would retry for ~25 s, printing a warning each time."""
    import datasets
    from huggingface_hub import constants, get_session

    if datasets.config.HF_HUB_OFFLINE:
        return "offline mode is on: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE"
    try:
        get_session().head(datasets.config.HF_ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # the client's transport errors; their classes differ between huggingface_hub releases
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return None


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """With ``on``, datasets and the hub client in offline mode for the block (both read these flags per call)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if on:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
