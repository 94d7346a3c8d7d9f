"""Statistics checkpoints: a calibration killed after k batches and resumed equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import calibrate, tiny_model

from gp_lightning.calibration.statistics_checkpoint import read_state
from gp_lightning.runtime.errors import CalibrationError

WINDOWS = torch.randint(0, 101, (10, 16), generator=torch.Generator().manual_seed(11))


class Kill(L.Callback):
    """Simulates a crash (preemption) right after batch ``after``."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx + 1 == self.after:
            raise RuntimeError("killed")


def _run(method: str, tmp_path: Path, **kwargs: object):
    model = tiny_model("qwen2", layers=2)
    return calibrate(model, WINDOWS, 2, method, fisher_batch_size=1 if method == "taylor_2nd" else None,
                     run_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("method", ["taylor", "taylor_2nd", "wanda"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path: Path, method: str) -> None:
    whole = _run(method, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="killed"):
        _run(method, tmp_path, checkpoint_every=2, extra_callbacks=[Kill(after=3)])  # saved after batch 2
    header, _ = read_state(tmp_path / "calibration_state" / "rank0.safetensors")
    assert header["batches_done"] == 2 and header["settings"]["method"] == method
    resumed = _run(method, tmp_path, checkpoint_every=2, resume=True)
    for layer in whole.mlp:
        assert torch.equal(resumed.mlp[layer], whole.mlp[layer])
        assert torch.equal(resumed.attention[layer], whole.attention[layer])


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no statistics checkpoint"):
        _run("taylor", tmp_path, resume=True)


def _killed_after_two(tmp_path: Path, **kwargs: object) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        _run("taylor", tmp_path, checkpoint_every=2, extra_callbacks=[Kill(after=3)], **kwargs)


@pytest.mark.parametrize("change", [{"seed": 1}, {"windows": WINDOWS.flip(0)}, {"batch": 1}])
def test_resume_with_other_settings_is_refused(tmp_path: Path, change: dict) -> None:
    """A statistics checkpoint continues only the pass that wrote it: same windows, seed and batch size."""
    _killed_after_two(tmp_path)
    model = tiny_model("qwen2", layers=2)
    key = {"seed": "seed", "windows": "windows", "batch": "batch_size"}[next(iter(change))]
    with pytest.raises(CalibrationError, match=f"other settings .*{key}"):
        calibrate(model, change.get("windows", WINDOWS), change.get("batch", 2), "taylor",
                  seed=int(change.get("seed", 0)), run_dir=tmp_path, checkpoint_every=2, resume=True)


class _Payload:
    """An object whose unpickling runs code: what a hostile statistics file would hold."""

    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("touch pwned",))


def test_resume_never_runs_code_from_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle (old format or planted under the new name) is refused as unreadable, and nothing it holds runs."""
    import pickle

    monkeypatch.chdir(tmp_path)
    state = tmp_path / "calibration_state"
    state.mkdir()
    for name in ("rank0.pt", "rank0.safetensors"):
        (state / name).write_bytes(pickle.dumps({"batches_done": 1, "world_size": 1, "collector": _Payload()}))
    with pytest.raises(CalibrationError, match="not a readable statistics checkpoint"):
        _run("taylor", tmp_path, checkpoint_every=2, resume=True)
    assert not (tmp_path / "pwned").exists()
    source = Path(__file__).resolve().parent.parent / "gp_lightning"
    assert not [p for p in source.rglob("*.py") if "weights_only=False" in p.read_text() or "import pickle" in
                p.read_text()]


@pytest.mark.parametrize("method", ["taylor", "wanda"])
def test_resuming_a_pass_that_was_saved_after_its_last_batch_finishes_it(tmp_path: Path, method: str) -> None:
    """The kill came after the last checkpoint covered every batch: nothing is left to run, the result is whole."""
    whole = _run(method, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="killed"):
        _run(method, tmp_path, checkpoint_every=1, extra_callbacks=[Kill(after=5)])  # 10 windows / 2: batch 5 of 5
    header, _ = read_state(tmp_path / "calibration_state" / "rank0.safetensors")
    assert header["batches_done"] == 5
    resumed = _run(method, tmp_path, checkpoint_every=1, resume=True)
    for layer in whole.mlp:
        assert torch.equal(resumed.mlp[layer], whole.mlp[layer])
        assert torch.equal(resumed.attention[layer], whole.attention[layer])


def test_resume_takes_only_an_unfinished_run_of_the_same_settings(tmp_path: Path, tiny_checkpoint: Path,
                                                                   wikitext: Path, capsys: pytest.CaptureFixture
                                                                   ) -> None:
    """A finished run, or one started with other settings, is refused before any of its files is rewritten."""
    import shutil

    from gp_lightning.cli import prune_main

    args = ["--model", str(tiny_checkpoint), "--dataset", str(wikitext / "valid.txt"), "--num_samples", "4",
            "--seq_len", "32", "--pruning_ratio", "0.001", "--test_before_prune", "false", "--test_after_prune",
            "false", "--save_model", "false", "--compensation", "none"]
    assert prune_main([*args, "--output", str(tmp_path / "done")]) == 0
    config = (tmp_path / "done" / "config.yaml").read_bytes()
    assert prune_main([*args, "--output", str(tmp_path / "done"), "--resume", "--checkpoint_every", "1"]) == 2
    assert "has finished" in capsys.readouterr().err
    assert (tmp_path / "done" / "config.yaml").read_bytes() == config

    unfinished = tmp_path / "unfinished"  # what an interrupted run leaves: its config, no results
    unfinished.mkdir()
    shutil.copy(tmp_path / "done" / "config.yaml", unfinished / "config.yaml")
    changed = [a if a != "0.001" else "0.002" for a in args]
    assert prune_main([*changed, "--output", str(unfinished), "--resume", "--checkpoint_every", "1"]) == 2
    err = capsys.readouterr().err
    assert "other settings (pruning_ratio 0.001 -> 0.002)" in err
    assert (unfinished / "config.yaml").read_bytes() == config


def test_resume_into_a_directory_that_does_not_exist_leaves_nothing(tmp_path: Path, tiny_checkpoint: Path,
                                                                     wikitext: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Refused in one line before the model is loaded: no directory, no config.yaml, no failed run.json."""
    from gp_lightning.cli import prune_main

    missing = tmp_path / "runs" / "typo"
    assert prune_main(["--model", str(tiny_checkpoint), "--dataset", str(wikitext / "valid.txt"), "--num_samples",
                       "4", "--seq_len", "32", "--pruning_ratio", "0.001", "--test_before_prune", "false",
                       "--test_after_prune", "false", "--output", str(missing), "--resume", "--checkpoint_every",
                       "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{missing}' does not exist, so there is no run to resume" in err, err
    assert list(tmp_path.iterdir()) == []
