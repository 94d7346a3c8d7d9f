"""Statistics checkpoints: a calibration killed after k batches and resumed equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import calibrate, tiny_model

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
    assert (tmp_path / "calibration_state" / "rank0.pt").is_file()
    assert torch.load(tmp_path / "calibration_state" / "rank0.pt", weights_only=False)["batches_done"] == 2
    resumed = _run(method, tmp_path, checkpoint_every=2, resume=True)
    for layer in whole.mlp:
        assert torch.equal(resumed.mlp[layer], whole.mlp[layer])
        assert torch.equal(resumed.attention[layer], whole.attention[layer])


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no statistics checkpoint"):
        _run("taylor", tmp_path, resume=True)
