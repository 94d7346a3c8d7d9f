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
