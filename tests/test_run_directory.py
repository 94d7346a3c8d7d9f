"""A run directory belongs to one run: --overwrite replaces exactly the previous run, failed runs are marked
and may be redone by the same command, compare refuses what did not finish, nobody else's files are touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gp_lightning.analysis.compare import main as compare_main
from gp_lightning.pipeline import oneshot
from gp_lightning.runtime.errors import RunDirectoryError


def _run(tiny_checkpoint: Path, wikitext: Path, output: Path, **overrides: object):
    keys = dict(model=str(tiny_checkpoint), output=str(output), pruning_ratio=0.002, num_samples=4, seq_len=32,
                batch_size=4, dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"),
                eval_max_windows=2, eval_seq_len=32, precision="32-true", eval_precision="32-true", accelerator="cpu",
                test_before_prune=False)
    return oneshot(**{**keys, **overrides})


def _manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def test_overwrite_replaces_exactly_the_previous_run(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    """run.json lists files, not directories: a file the user put into the run's analysis/ survives --overwrite."""
    run = tmp_path / "run"
    _run(tiny_checkpoint, wikitext, run)
    old = _manifest(run)
    assert old["status"] == "complete" and "model/config.json" in old["files"] and "model" in old["dirs"]
    assert all((run / name).is_file() for name in old["files"])  # files only, the staged model/ file by file
    (run / "my_notes.txt").write_text("mine")  # written by the user after the run: not the run's
    (run / "analysis" / "notes.txt").write_text("mine too")  # inside a directory the run made
    _run(tiny_checkpoint, wikitext, run, overwrite=True, save_model=False, pruning_ratio=0.003)
    assert not (run / "model").exists()  # the 0.002 model does not stay beside the 0.003 results
    assert (run / "my_notes.txt").read_text() == "mine"
    assert (run / "analysis" / "notes.txt").read_text() == "mine too"
    assert "pruning_ratio: 0.003" in (run / "config.yaml").read_text()
    new = _manifest(run)
    assert new["status"] == "complete" and not [name for name in new["files"] if name.startswith("model")]
    assert "analysis/notes.txt" in new["preexisting"] and "analysis/notes.txt" not in new["files"]
    assert [name for name in old["files"] if (run / name).exists() and name not in new["files"]] == []
    assert not (run / ".gp-lightning.lock").exists()  # released with the run


def test_a_failed_run_is_marked_redone_by_the_same_command_and_refused_by_compare(
        tmp_path: Path, tiny_checkpoint: Path, wikitext: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _run(tiny_checkpoint, wikitext, run)

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed during save")

    monkeypatch.setattr("gp_lightning.pipeline.save_pruned", killed)
    with pytest.raises(RuntimeError, match="killed during save"):
        _run(tiny_checkpoint, wikitext, run, overwrite=True, pruning_ratio=0.003)
    monkeypatch.undo()
    assert _manifest(run)["status"] == "failed"
    assert not (run / "model").exists()  # the previous run's model went with the previous run
    capsys.readouterr()
    assert compare_main([str(run), str(run), "--output", str(tmp_path / "cmp")]) == 2
    assert "which did not finish (run.json says failed)" in capsys.readouterr().err
    assert _manifest(run)["status"] == "failed", _manifest(run)
    with pytest.raises(RunDirectoryError, match="unfinished run started with other settings"):
        _run(tiny_checkpoint, wikitext, run, pruning_ratio=0.004)
    _run(tiny_checkpoint, wikitext, run, overwrite=True, pruning_ratio=0.003)  # the same command as the failed one
    assert _manifest(run)["status"] == "complete" and (run / "model").is_dir()


def test_the_same_command_redoes_its_failed_run_without_overwrite(tmp_path: Path, tiny_checkpoint: Path,
                                                                  wikitext: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    run = tmp_path / "run"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug after setup")

    monkeypatch.setattr("gp_lightning.pipeline.save_pruned", broken)
    with pytest.raises(RuntimeError):
        _run(tiny_checkpoint, wikitext, run)
    monkeypatch.undo()
    assert _manifest(run)["status"] == "failed" and (run / "config.yaml").is_file()
    _run(tiny_checkpoint, wikitext, run)  # no --overwrite needed: the stub is this command's own
    assert _manifest(run)["status"] == "complete"


def test_overwrite_never_replaces_a_model_folder_no_run_wrote(tmp_path: Path, tiny_checkpoint: Path,
                                                              wikitext: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(RunDirectoryError, match="holds model that no gp-lightning run wrote"):
        _run(tiny_checkpoint, wikitext, mine, overwrite=True)
    assert (mine / "model" / "weights.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in mine.iterdir()) == ["model"]


def test_only_a_running_positive_pid_is_alive() -> None:
    """0 and negative pids name process groups to kill(): a manifest or staging name holding one has no owner."""
    import os

    from gp_lightning.runtime.io import process_alive

    assert process_alive(os.getpid())
    assert not process_alive(0) and not process_alive(-1)
