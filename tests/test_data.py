"""Text sources and windows: local formats, hub loading (mocked: no hub here), seeded windows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from gp_lightning.data import sources
from gp_lightning.data.sources import check_source, load_text
from gp_lightning.data.windows import calibration_windows, evaluation_windows
from gp_lightning.runtime.errors import DataError


def test_local_formats_read_the_same_text(tmp_path: Path) -> None:
    texts = ["first paragraph", "second one"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "a.parquet")
    for suffix in ("txt", "jsonl", "parquet"):
        assert load_text(str(tmp_path / f"a.{suffix}"), "calibration") == "\n\n".join(texts)


def test_hub_names_map_to_datasets_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(path: str, **kwargs: object) -> dict:
        calls.append((path, kwargs))
        return {"text": ["x", "y"]}

    monkeypatch.setattr(sources, "_hub_unreachable", lambda: None)  # no request leaves the test
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_text("wikitext2", "evaluation") == "x\n\ny"
    load_text("c4", "calibration")
    assert calls[0] == ("wikitext", {"split": "test", "name": "wikitext-2-raw-v1"})
    assert calls[1] == ("allenai/c4", {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})

    def refused(path: str, **kwargs: object) -> None:
        raise ValueError("Unknown split 'train'.\nShould be one of ['test'].")

    monkeypatch.setattr(datasets, "load_dataset", refused)
    with pytest.raises(DataError, match="Unknown split 'train'. Should be") as failed:
        check_source("wikitext2", "calibration")
    assert "\n" not in str(failed.value) and "--dataset" in str(failed.value)


def test_an_unreachable_hub_is_asked_once_then_the_cache_is_read_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: one quick request, then datasets reads its cache in offline mode (no retries for ~25 s); with
    nothing cached, one line naming the dataset, the unreachable hub and both ways on."""
    import datasets
    from huggingface_hub import constants

    class NoNetwork:
        def head(self, url: str, timeout: float) -> None:
            raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_session", NoNetwork)
    seen = []

    def cache_only(path: str, **kwargs: object) -> dict:
        seen.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        if len(seen) > 1:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")
        return {"text": ["cached"]}

    monkeypatch.setattr(datasets, "load_dataset", cache_only)
    hub_offline = constants.HF_HUB_OFFLINE  # the environment's setting
    assert load_text("wikitext2", "calibration") == "cached"
    with pytest.raises(DataError) as failed:
        check_source("wikitext2", "evaluation")
    assert seen == [(True, True), (True, True)]
    assert not datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE is hub_offline  # restored
    message = str(failed.value)
    assert message.startswith("Dataset 'wikitext2' (wikitext, split test): the Hugging Face hub could not be "
                              "reached (OSError: [Errno -2] Name or service not known)")
    assert "Connect to the hub, or pass local text with --dataset" in message and "--eval_dataset" in message


def test_unknown_dataset_and_missing_file() -> None:
    with pytest.raises(DataError, match="Unknown dataset"):
        load_text("bookcorpus-typo", "calibration")
    with pytest.raises(DataError, match="does not exist"):
        load_text("/no/such/file.txt", "calibration")


def test_windows_are_distinct_seeded_and_aligned() -> None:
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 7, 50, seed=1)
    assert a.shape == (7, 50)
    assert torch.equal(a, calibration_windows(tokens, 7, 50, seed=1))
    assert not torch.equal(a, calibration_windows(tokens, 7, 50, seed=2))
    starts = a[:, 0]
    assert len(set(starts.tolist())) == 7 and all(s % 50 == 0 for s in starts.tolist())
    assert torch.equal(a, starts[:, None] + torch.arange(50))
    with pytest.raises(DataError, match="too short"):
        calibration_windows(tokens, 21, 50, seed=0)
    ev = evaluation_windows(tokens, 128, None)
    assert ev.shape == (7, 128) and torch.equal(ev.flatten(), tokens[:896])
    assert evaluation_windows(tokens, 128, 3).shape == (3, 128)


def test_tokenized_text_is_reused_only_for_the_same_text_and_tokenizer(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    from gp_lightning.data.windows import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "The tower is 324 metres tall , about the same height as an 81 @-@ storey building ."
    first = tokenize(text, tokenizer)
    assert first.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    first[0] = -1  # a caller's changes do not reach the cache
    again = tokenize(text, AutoTokenizer.from_pretrained(tiny_checkpoint))
    assert again.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    other = AutoTokenizer.from_pretrained(tiny_checkpoint)
    other.add_tokens(["tower is"])
    assert tokenize(text, other).tolist() == other(text, add_special_tokens=False)["input_ids"] != again.tolist()
    assert tokenize(text + " More .", tokenizer).numel() > again.numel()
