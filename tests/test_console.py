"""The console of a run shows progress, gp-lightning's log lines and real warnings, not third-party noise."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CHECKPOINT_PRUNABLE

from gp_lightning.cli import prune_main
from gp_lightning.runtime.console import configure_console

ROOT = Path(__file__).resolve().parent.parent

#: Lines `make demo` printed before the console was cleaned up (issue 12), and our own deprecations.
NOISE = ("`past_key_values` is deprecated", "Reading global config value for per-layer attribute",
         "module(s) in eval mode", "litlogger", "configure_optimizers` returned `None`", "Setting accelerator to CPU",
         "GPU available:", "TPU available:", "`isinstance(treespec, LeafSpec)` is deprecated", "FutureWarning",
         "DeprecationWarning")


def _args(checkpoint: Path, wikitext: Path, output: Path) -> list[str]:
    return ["--model", str(checkpoint), "--output", str(output), "--pruning_ratio", str(0.2 * TINY_CHECKPOINT_PRUNABLE),
            "--num_samples", "4", "--seq_len", "32", "--batch_size", "2", "--dataset", str(wikitext / "valid.txt"),
            "--eval_dataset", str(wikitext / "test.txt"), "--eval_max_windows", "2", "--eval_seq_len", "32",
            "--precision", "32-true", "--eval_precision", "32-true"]


def test_a_run_prints_no_known_noise(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    done = subprocess.run([sys.executable, "-W", "default", str(ROOT / "prune.py"),
                           *_args(tiny_checkpoint, wikitext, tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert [line for line in NOISE if line in console] == []
    assert "[gp-lightning] calibration (taylor) in" in done.stderr  # our log lines do show
    assert "Pruned " in done.stdout


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_verbose_shows_what_is_hidden(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen = _Records()
    lightning.addHandler(seen)
    try:
        assert prune_main(["-v", *_args(tiny_checkpoint, wikitext, tmp_path / "run"), "--save_model", "false"]) == 0
        assert any(m.startswith("GPU available:") for m in seen.messages)  # Lightning's lines get through
        assert "[gp-lightning] calibration (taylor) in" in capsys.readouterr().err
        assert logging.getLogger("gp_lightning").getEffectiveLevel() == logging.DEBUG
        configure_console("info")
        seen.messages.clear()
        assert prune_main(_args(tiny_checkpoint, wikitext, tmp_path / "again")) == 0
        assert not any(m.startswith("GPU available:") for m in seen.messages)  # and are hidden again
    finally:
        lightning.removeHandler(seen)
        configure_console("info")
