"""Bad input, part two (issue 28): each ends the run in one line naming the problem and the fix, and makes no run
directory. Cheap: parse-time errors, data read without a model, or the tiny checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gp_lightning.cli import parse_config, prune_main
from gp_lightning.data.sources import load_text
from gp_lightning.runtime.errors import DataError


def _one_error(capsys: pytest.CaptureFixture, code: int, run: Path) -> str:
    """The run's single ``error:`` line, its last, checked to have left no run directory (before it: only what
    libraries print, such as a progress bar)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert not run.exists()
    return errors[0]


@pytest.mark.parametrize("accelerator,message", [
    ("tpu", "'tpu' is invalid: it must be one of auto, cpu, gpu, cuda"),
    ("banana", "'banana' is invalid: it must be one of auto, cpu, gpu, cuda"),
    ("cuda", "'cuda' is invalid: it needs a CUDA GPU, and this machine (avx2) has none: pass --accelerator cpu"),
    ("gpu", "'gpu' is invalid: it needs a CUDA GPU"),
])
def test_an_accelerator_this_machine_lacks_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     accelerator: str, message: str) -> None:
    from gp_lightning.runtime import machine

    monkeypatch.setattr(machine, "detect", lambda: machine.KINDS["avx2"])
    code = prune_main(["--accelerator", accelerator, "--output", str(tmp_path / "run")])
    assert message in _one_error(capsys, code, tmp_path / "run")
    monkeypatch.setattr(machine, "detect", lambda: machine.KINDS["cuda"])
    assert parse_config(["--accelerator", "cuda"]).distributed.accelerator == "cuda"  # where there is one


@pytest.mark.parametrize("content,message", [
    ("pruning_ratio: 0.3  # caf\u00e9\n".encode("latin-1"), "is not UTF-8 text: byte 25 is 0xe9. Save it as UTF-8 "
     "(iconv -f latin1 -t utf-8 c.yaml > c.utf8.yaml)."),
    ("pruning_ratio: 0.3\n".encode("utf-16"), "is not UTF-8 text: it looks like utf-16 text (it starts with a UTF-16 "
     "byte-order mark). Save it as UTF-8 (iconv -f utf-16"),
    (b"", "is empty: write the keys to set in it, one 'key: value' a line"),
    (b"# only a comment\n", "is empty"),
    (b"- pruning_ratio: 0.3\n", "holds a YAML list, not 'key: value' lines"),
])
def test_a_config_file_that_is_not_yaml_keys_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         content: bytes, message: str) -> None:
    (tmp_path / "c.yaml").write_bytes(content)
    code = prune_main(["--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")])
    assert f"--config {tmp_path / 'c.yaml'} {message}" in _one_error(capsys, code, tmp_path / "run")


def _parquet(path: Path, texts: list[object]) -> None:
    import pandas as pd

    pd.DataFrame({"text": texts}).to_parquet(path)


@pytest.mark.parametrize("case,message", [
    ("not_parquet", r"t.parquet is not a Parquet file \(Parquet files begin and end with the bytes PAR1\): pass a "
                    r"real .parquet, or give the file the suffix of what it holds"),
    ("integers", r"t.parquet: row 0 of the 'text' column is 1 \(int\), not text: the column must hold strings"),
    ("null", r"t.parquet: row 1 of the 'text' column is null, not text"),
    ("utf16", r"t.txt is not utf-8 text: it looks like utf-16 text \(it starts with a UTF-16 byte-order mark\). Pass "
              r"its encoding \(e.g. --text_encoding utf-16\) or convert it \(iconv -f utf-16 -t utf-8 t.txt"),
    ("utf16le", r"t.txt is not latin-1 text: it looks like utf-16le text \(every second byte is NUL\). Pass its "
                r"encoding \(e.g. --text_encoding utf-16le\)"),
])
def test_data_that_is_not_what_its_name_says_is_one_line(tmp_path: Path, case: str, message: str) -> None:
    text = "Plain words of calibration text. " * 20
    path = tmp_path / ("t.txt" if case.startswith("utf16") else "t.parquet")
    if case == "not_parquet":
        path.write_text(text)
    elif case.startswith("utf16"):
        path.write_bytes(text.encode("utf-16" if case == "utf16" else "utf-16-le"))
    else:
        _parquet(path, [1, 2] if case == "integers" else ["one", None])
    with pytest.raises(DataError, match=message) as refused:
        load_text(str(path), "calibration", "latin-1" if case == "utf16le" else "utf-8")
    assert "\n" not in str(refused.value)


def test_a_parquet_of_strings_and_a_utf16_file_given_its_encoding_are_read(tmp_path: Path) -> None:
    _parquet(tmp_path / "t.parquet", ["one", "two"])
    assert load_text(str(tmp_path / "t.parquet"), "calibration") == "one\n\ntwo"
    (tmp_path / "t.txt").write_bytes("caf\u00e9".encode("utf-16"))
    assert load_text(str(tmp_path / "t.txt"), "calibration", "utf-16") == "caf\u00e9"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_dataset_that_is_no_file_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    data = tmp_path / "data"
    if kind == "directory":
        data.mkdir()
    else:
        os.mkfifo(data)
    code = prune_main(["--dataset", str(data), "--output", str(tmp_path / "run")])
    what = "a directory" if kind == "directory" else "a named pipe (FIFO)"
    assert (f"Dataset '{data}' is {what}, not a file: pass a .txt, .jsonl or .parquet file"
            in _one_error(capsys, code, tmp_path / "run"))
    code = prune_main(["--from_table", str(data), "--output", str(tmp_path / "run")])
    assert f"from_table: {data} is {what}, not a file: pass the global_group_table.csv" in _one_error(
        capsys, code, tmp_path / "run")


def test_a_read_only_model_cache_is_named_with_its_fix(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (the suite runs as root): the embedded model's first conversion meets a read-only cache."""
    import errno
    import types

    from gp_lightning.model import source

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "cache" / ".fetch-x"))

    monkeypatch.setattr(source, "tempfile", types.SimpleNamespace(TemporaryDirectory=refuse))
    (tmp_path / "cache").mkdir()
    (tmp_path / "text.txt").write_text("A few words of text.\n")
    code = prune_main(["--model", "smollm2-135m", "--cache_dir", str(tmp_path / "cache"), "--dataset",
                       str(tmp_path / "text.txt"), "--eval_dataset", str(tmp_path / "text.txt"), "--output",
                       str(tmp_path / "run")])
    err = _one_error(capsys, code, tmp_path / "run")
    assert f"Cannot write the model cache {tmp_path / 'cache'}" in err and "Read-only file system" in err
    assert "GP_LIGHTNING_CACHE or --cache_dir" in err and "incomplete run" not in err


def test_a_tied_lm_head_is_not_missing(tmp_path: Path) -> None:
    from conftest import tiny_model

    from gp_lightning.model.source import load_model

    tiny_model("llama", layers=1, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    model, _ = load_model(str(tmp_path / "tied"), with_tokenizer=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
