"""Every command that reads a run (--from_table, compare, evaluate, upgrade-checkpoint, export-gguf, train.py) refuses
one whose run.json does not say complete, and checks its inputs as prune.py does, before any work: one line each."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_model
from test_pipeline import _written_table

from gp_lightning.analysis.compare import main as compare_main
from gp_lightning.cli import prune_main, train_main
from gp_lightning.evaluation.checkpoints import evaluate_main
from gp_lightning.export.gguf_writer import main as export_main
from gp_lightning.export.upgrade import main as upgrade_main
from gp_lightning.model.layout import describe
from gp_lightning.runtime.errors import RunDirectoryError
from gp_lightning.runtime.run_manifest import require_complete
from gp_lightning.table.saved import load_table

PRUNED = Path(__file__).resolve().parent / "data" / "llama-revision1"  # a pruned checkpoint (no tokenizer)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _run(path: Path, status: str, pid: int) -> Path:
    """What a pruning run leaves (a pruned model/, its table, results and per-layer summary), its run.json saying
    ``status`` with ``pid``."""
    shutil.copytree(PRUNED, path / "model")
    _written_table(path, describe(tiny_model()))
    (path / "evaluation_results.json").write_text(json.dumps({"total_params": 10, "params_after": 8,
                                                              "achieved_ratio": 0.2}))
    (path / "analysis").mkdir()
    (path / "analysis" / "pruning_summary_by_layer.csv").write_text("layer_idx,layer_rate\n0,0.2\n1,0.1\n")
    (path / "run.json").write_text(json.dumps({"status": status, "pid": pid}))
    return path


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _error(capsys: pytest.CaptureFixture) -> str:
    """The one error line (beside it at most transformers' progress bar of a model load), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_prune_refuses_an_unfinished_run_before_touching_its_output(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """--from_table and --model of a failed run: refused before --overwrite clears the output or a model loads."""
    run = _run(tmp_path / "run", "failed", _dead_pid())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flag, value, reader in (("--from_table", run / "global_group_table.csv", "from_table"),
                                ("--model", run / "model", "model")):
        assert prune_main([flag, str(value), "--output", str(out), "--overwrite"]) == 2
        assert _error(capsys).startswith(f"error: {reader}: ")
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("status", ["failed", "running, pid gone", "running"])
def test_a_run_that_did_not_finish_is_read_by_no_command(tmp_path: Path, status: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    pid = os.getppid() if status == "running" else _dead_pid()  # the parent (pytest's starter) is alive
    run = _run(tmp_path / "run", status.split(",")[0], pid)
    said = ("still running (pid" if status == "running" else
            "did not finish (run.json says failed)" if status == "failed" else f"says running, but its pid {pid} is gone")
    with pytest.raises(RunDirectoryError, match=r"from_table: .*global_group_table.csv belongs to the run in "
                                                rf".*run, which .*{re.escape(said)}"):
        load_table(run / "global_group_table.csv", describe(tiny_model()))
    before = _digests(run / "model")
    calls = [("compare", lambda: compare_main([str(run)])),
             ("evaluate", lambda: evaluate_main([str(run / "model"), "--eval_dataset", "no-such.txt"])),
             ("upgrade-checkpoint", lambda: upgrade_main([str(run / "model")])),
             ("export-gguf", lambda: export_main([str(run / "model"), str(tmp_path / "m.gguf"), "--tokenizer", "x"])),
             ("train.py", lambda: train_main(["--model", str(run / "model"), "--output", str(tmp_path / "ft")])),
             ("train.py", lambda: train_main(["--model", str(run / "model"), "--output", str(run / "ft")]))]
    for reader, call in calls:  # the last: an output inside the unfinished run is no licence to read it
        assert call() == 2, reader
        assert f"{reader}: " in (err := _error(capsys)) and said in err, err
    assert not (run / "ft").exists() and not (tmp_path / "ft").exists()
    assert _digests(run / "model") == before  # upgrade-checkpoint rewrote nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .gguf, no fine-tune directory


def test_allow_unfinished_table_reads_a_dead_run_with_a_warning_never_a_live_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = describe(tiny_model())
    run = _run(tmp_path / "run", "failed", _dead_pid())
    with caplog.at_level("WARNING"):
        assert len(load_table(run / "global_group_table.csv", layout, allow_unfinished=True)) > 0
    assert "which did not finish (run.json says failed): read anyway, as asked" in caplog.text
    (run / "run.json").write_text(json.dumps({"status": "running", "pid": os.getppid()}))
    with pytest.raises(RunDirectoryError, match="still running"):
        load_table(run / "global_group_table.csv", layout, allow_unfinished=True)


def test_a_finished_run_and_a_directory_without_run_json_are_read(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path / "run", "complete", _dead_pid())
    assert len(load_table(run / "global_group_table.csv", describe(tiny_model()))) > 0
    assert compare_main([str(run)]) == 0
    assert upgrade_main([str(run / "model")]) == 0
    (run / "run.json").unlink()  # a run of a release before run.json, or a plain checkpoint
    assert upgrade_main([str(run / "model")]) == 0
    (run / "run.json").write_text(json.dumps({"status": "running", "pid": _dead_pid()}))
    require_complete(run / "model", "train.py", own_output=run)  # prune.py --finetune reads its own run's model


def test_evaluate_checks_its_windows_as_prune_does(tiny_checkpoint: Path, wikitext: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    text = ["--eval_dataset", str(wikitext / "test.txt")]
    assert evaluate_main([str(tiny_checkpoint), *text, "--eval_seq_len", "100000"]) == 2
    assert "'eval_seq_len' = 100000 is invalid: the model has 128 positions" in _error(capsys)
    assert evaluate_main([str(tiny_checkpoint), *text, "--eval_max_windows", "0"]) == 2
    assert "'eval_max_windows' = 0 is invalid: it must be at least 1" in _error(capsys)
    assert evaluate_main([str(tiny_checkpoint), *text, "--eval_seq_len", "1"]) == 2
    assert "'eval_seq_len' = 1 is invalid: it must be at least 2 tokens" in _error(capsys)


def test_evaluate_checks_every_local_checkpoint_before_loading_any(tmp_path: Path, tiny_checkpoint: Path,
                                                                    wikitext: Path, capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The second checkpoint has fewer positions than the windows: refused before the first one loads."""
    import gp_lightning.model.source as source

    short = tmp_path / "short"
    shutil.copytree(tiny_checkpoint, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    loads: list[str] = []
    monkeypatch.setattr(source, "load_model", lambda path, *a, **k: loads.append(path))
    args = [str(tiny_checkpoint), str(short), "--eval_dataset", str(wikitext / "test.txt"), "--eval_seq_len", "100"]
    assert evaluate_main(args) == 2
    assert "'eval_seq_len' = 100 is invalid: the model has 64 positions" in _error(capsys) and loads == []


def test_evaluate_reads_text_in_the_encoding_it_names(tmp_path: Path, tiny_checkpoint: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "latin.txt"
    text.write_bytes(("Le café de la gare ouvre à sept heures. " * 20).encode("latin-1"))
    args = [str(tiny_checkpoint), "--eval_dataset", str(text), "--eval_seq_len", "16", "--eval_max_windows", "2"]
    assert evaluate_main(args) == 2
    assert "Pass its encoding (e.g. --text_encoding latin-1)" in _error(capsys)
    assert evaluate_main([*args, "--text_encoding", "latin-1"]) == 0
    assert "(2 windows of 16 tokens" in capsys.readouterr().out
    assert evaluate_main([*args, "--text_encoding", "latin-9000"]) == 2
    assert "'text_encoding' = 'latin-9000' is invalid" in _error(capsys)


def test_an_output_of_the_wrong_kind_is_one_line(tmp_path: Path, tiny_checkpoint: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path / "run", "complete", _dead_pid())
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    assert compare_main([str(run), "--output", str(taken)]) == 2
    assert f"--output {taken} is a file" in _error(capsys) and taken.read_text() == "mine"
    assert export_main([str(tiny_checkpoint), str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory: name the .gguf file to write" in _error(capsys)


def test_compare_of_a_run_missing_or_damaging_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path / "run", "complete", _dead_pid())
    assert compare_main([str(run)]) == 0  # whole, it compares
    capsys.readouterr()
    (run / "analysis" / "pruning_summary_by_layer.csv").unlink()
    assert compare_main([str(run)]) == 2
    assert _error(capsys).endswith("lacks " + str(run / "analysis" / "pruning_summary_by_layer.csv") + ": it is not a "
                                   "whole run directory of prune.py; rerun its command (the same settings redo it) "
                                   "or leave it out.")
    (run / "analysis" / "pruning_summary_by_layer.csv").write_text("layer_idx,layer_rate\n0,0.2\n")
    (run / "evaluation_results.json").write_text('{"total_params": 10')
    assert compare_main([str(run)]) == 2
    assert "has a damaged file (JSONDecodeError" in _error(capsys)
