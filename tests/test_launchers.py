"""prune.py under the launchers users run (torchrun, accelerate launch) with 2 CPU ranks, and streamed surgery.

Rank 0 writes the run; its table and plan must equal a single-process run of the same config.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE
from safetensors.torch import load_file

from gp_lightning.pipeline import oneshot

ROOT = Path(__file__).resolve().parent.parent
PRUNABLE = TINY_CHECKPOINT_PRUNABLE


def _settings(checkpoint: Path, wikitext: Path, output: Path) -> dict[str, object]:
    return dict(model=str(checkpoint), pruning_ratio=0.3 * PRUNABLE, num_samples=7, seq_len=32, batch_size=2,
                dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"), eval_max_windows=4,
                eval_seq_len=32, precision="32-true", eval_precision="32-true", accelerator="cpu", save_model=False,
                test_before_prune=False, output=str(output))


def _args(checkpoint: Path, wikitext: Path, output: Path) -> list[str]:
    return [item for key, value in _settings(checkpoint, wikitext, output).items() for item in (f"--{key}", str(value))]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, wikitext: Path) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    oneshot(**_settings(tiny_checkpoint, wikitext, out))
    return out


@pytest.mark.parametrize("launcher,strategy", [("torchrun", "fsdp"), ("accelerate", "ddp")])
def test_two_rank_launch_equals_single_process(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                               single_run: Path, launcher: str, strategy: str) -> None:
    out = tmp_path / "run"
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", _port()]
    else:  # on CPU: --multi_gpu starts 2 processes (--cpu with --num_processes 2 silently starts one)
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", _port()]
    done = subprocess.run([*head, str(ROOT / "prune.py"), *_args(tiny_checkpoint, wikitext, out), "--strategy", strategy],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr  # really two processes
    assert (out / "pruning_plan.json").read_text() == (single_run / "pruning_plan.json").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(out / "global_group_table.csv"),
                                  pd.read_csv(single_run / "global_group_table.csv"), rtol=1e-5)


def test_streamed_surgery_writes_the_in_memory_model(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    common = dict(model=str(tiny_checkpoint), pruning_ratio=0.3 * PRUNABLE, num_samples=4, seq_len=32, batch_size=2,
                  dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"), eval_max_windows=4,
                  eval_seq_len=32, precision="32-true", eval_precision="32-true", accelerator="cpu",
                  test_before_prune=False, remove_empty_layers=True)
    memory = oneshot(output=str(tmp_path / "memory"), **common)
    streamed = oneshot(output=str(tmp_path / "streamed"), streamed_surgery=True, **common)
    assert streamed.evaluation["ppl_after"] == memory.evaluation["ppl_after"]
    a = load_file(tmp_path / "memory" / "model" / "model.safetensors")
    b = load_file(tmp_path / "streamed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
