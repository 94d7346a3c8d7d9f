"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Sources are a Hugging Face dataset name (``wikitext2``, ``c4``: loaded with ``datasets`` from the hub,
or from the datasets cache when the hub cannot be reached) or a local ``.txt`` / ``.jsonl`` / ``.parquet``
file. :func:`check_source` finds a missing one before a model loads. Text is tokenized as one stream and
cut into fixed windows, so every window is full and nothing is padded.
"""

from __future__ import annotations

import codecs
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
    kind = not_a_file(path)
    if kind is not None:
        raise DataError(f"Dataset '{source}' is {kind}, not a file: pass a .txt, .jsonl or .parquet file (or a dataset "
                        f"name: {', '.join(HUB_DATASETS)}).")
    if path.suffix in {".txt", ".jsonl", ".json", ".parquet"} or "/" in source:
        raise DataError(f"Dataset file '{source}' does not exist (looked in {path.resolve()}).")
    raise DataError(
        f"Unknown dataset '{source}'. Use one of {', '.join(HUB_DATASETS)} (Hugging Face hub) or the "
        "path of a .txt, .jsonl or .parquet file."
    )


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; a file that is not ``encoding`` text (latin-1, UTF-16, binary) is a one-line error naming it,
    the byte offset or the encoding it looks like, and the fix."""
    try:
        return decode(path.read_bytes(), encoding)
    except NotText as exc:
        raise DataError(f"{path} is not {encoding} text: {exc.detail}. Pass its encoding (e.g. --text_encoding "
                        f"{exc.likely}) or convert it ({exc.conversion(path)}).") from None


class NotText(ValueError):
    """Bytes that are not text of the encoding asked for: what shows it, and the encoding they likely are."""

    def __init__(self, detail: str, likely: str) -> None:
        super().__init__(detail)
        self.detail, self.likely = detail, likely

    def conversion(self, path: Path) -> str:
        """The command that writes a UTF-8 copy of ``path`` beside it."""
        return f"iconv -f {self.likely.replace('latin-1', 'latin1')} -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"


#: Byte-order marks of the wide encodings (UTF-32's first: its little-endian mark begins with UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def decode(data: bytes, encoding: str) -> str:
    """``data`` as ``encoding`` text, or :class:`NotText`. UTF-16/32 text is recognized (a byte-order mark, or NUL
    bytes at every second or all but every fourth place) even where ``encoding`` would decode it into NUL-laced
    garbage (ASCII read as UTF-8, anything as latin-1)."""
    wide = None if codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")) else _wide_encoding(data)
    if wide is not None:
        raise NotText(f"it looks like {wide[0]} text ({wide[1]})", wide[0])
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise NotText(f"byte {exc.start} is 0x{data[exc.start]:02x}", "latin-1") from None


def _wide_encoding(data: bytes) -> tuple[str, str] | None:
    """``(encoding, why)`` when ``data`` looks like UTF-16 or UTF-32 text, else None."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name, f"it starts with a {name.upper()} byte-order mark"
    sample = data[:4096]
    if len(sample) < 8:
        return None
    nul = [sample[i::4].count(0) > 0.75 * len(sample[i::4]) for i in range(4)]  # NUL at position i of 4
    if nul in ([False, True, True, True], [True, True, True, False]):
        return ("utf-32le" if nul[1] and not nul[0] else "utf-32be"), "three of every four bytes are NUL"
    if nul in ([False, True, False, True], [True, False, True, False]):
        return ("utf-16le" if nul[1] else "utf-16be"), "every second byte is NUL"
    return None


def not_a_file(path: Path) -> str | None:
    """What ``path`` is when it exists but is no regular file ("a directory", "a named pipe (FIFO)"...), else None."""
    if not path.exists() or path.is_file():
        return None
    if path.is_dir():
        return "a directory"
    if path.is_fifo():
        return "a named pipe (FIFO)"
    if path.is_socket():
        return "a socket"
    return "a device" if path.is_block_device() or path.is_char_device() else "not a regular file"


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
        return _read_parquet(path)
    raise DataError(f"Cannot read '{path}': use a .txt, .jsonl or .parquet file.")


def _read_parquet(path: Path) -> str:
    """The 'text' column of a Parquet file, every row a string (numbers or nulls are refused, as in JSON Lines)."""
    import pandas as pd

    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, handle.seek(0, 2) - 4))
        tail = handle.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"{path} is not a Parquet file (Parquet files begin and end with the bytes PAR1): pass a real "
                        ".parquet, or give the file the suffix of what it holds (.txt text, .jsonl JSON Lines).")
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError: a damaged file
        raise DataError(f"{path} could not be read as Parquet ({' '.join(str(exc).split())[:200]}): it is damaged; "
                        "write or download it again.") from None
    if "text" not in frame.columns:
        raise DataError(f"{path} has no 'text' column (columns: {list(frame.columns)}).")
    for row, value in enumerate(frame["text"]):
        if not isinstance(value, str):
            shown = "null" if pd.api.types.is_scalar(value) and pd.isna(value) else f"{value} ({type(value).__name__})"
            raise DataError(f"{path}: row {row} of the 'text' column is {shown}, not text: the column must hold "
                            "strings.")
    return "\n\n".join(frame["text"])


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
