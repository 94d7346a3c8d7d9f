"""prune.py under the launchers users run (torchrun, accelerate launch) with 2 CPU ranks, and streamed surgery.

Each launch prunes and then fine-tunes (``--finetune``: every rank joins the recovery from the model
rank 0 saved), so one launch per launcher checks both against a single-process run of the same
config (``--strategy ddp`` in one process, and no precision flag: ``auto`` resolves alike for one
process and two, float32 parameters on every CPU kind, under bf16 autocast where the CPU computes
bf16 natively): rank 0's table and plan equal the single process's, and 2 gloo ranks x batch 2
fine-tune as 1 process x batch 4 does (the same examples per step: same losses, same weights). The
fine-tune distills from the dense model mixed with the LM loss, so the teacher runs under every
strategy too.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE
from safetensors.torch import load_file

from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.pipeline import oneshot
from gp_lightning.runtime.precision import resolve

ROOT = Path(__file__).resolve().parent.parent
PRUNABLE = TINY_CHECKPOINT_PRUNABLE

#: The recovery fine-tune (``--finetune_config``); its batch is per rank.
FINETUNE = ("finetune_method: lora\nfinetune_loss: kd+lm\nkd_temperature: 2\nfinetune_samples: 8\nval_samples: 2\n"
            "learning_rate: 0.01\nlora_dropout: 0\nlog_every_n_steps: 1\ntest_before_finetune: false\n")


def _finetune_config(directory: Path, batch_size: int) -> str:
    path = directory / f"finetune-batch{batch_size}.yaml"
    path.write_text(FINETUNE + f"batch_size: {batch_size}\n")
    return str(path)


def _settings(checkpoint: Path, wikitext: Path, output: Path, finetune_batch: int) -> dict[str, object]:
    """No ``precision``: ``auto`` must pick for one process what it picks for two (see the module's doc)."""
    return dict(model=str(checkpoint), pruning_ratio=0.3 * PRUNABLE, num_samples=7, seq_len=32, batch_size=2,
                dataset=str(wikitext / "valid.txt"), eval_dataset=str(wikitext / "test.txt"), eval_max_windows=4,
                eval_seq_len=32, eval_precision="32-true", accelerator="cpu",
                test_before_prune=False, output=str(output), finetune=True,
                finetune_config=_finetune_config(output.parent, finetune_batch))


def _args(settings: dict[str, object]) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, wikitext: Path) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    result = oneshot(**_settings(tiny_checkpoint, wikitext, out, finetune_batch=4), strategy="ddp")  # one process
    assert result.finetuned is not None and result.finetuned.evaluation["finetune_loss"] == "kd+lm"
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
    args = _args(_settings(tiny_checkpoint, wikitext, out, finetune_batch=2))
    done = subprocess.run([*head, str(ROOT / "prune.py"), *args, "--strategy", strategy],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr  # really two processes
    results = [json.loads((run / "evaluation_results.json").read_text()) for run in (out, single_run)]
    assert results[0]["precision"] == results[1]["precision"] == resolve("auto", "cpu", strategy)
    assert f"precision={results[0]['precision']} (auto: a " in done.stderr  # the log line says why
    assert (out / "pruning_plan.json").read_text() == (single_run / "pruning_plan.json").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(out / "global_group_table.csv"),
                                  pd.read_csv(single_run / "global_group_table.csv"), rtol=1e-5)

    tuned = json.loads((out / "finetune" / "evaluation_results.json").read_text())
    assert tuned["finetune_loss"] == "kd+lm" and tuned["optimizer_steps"] == 2
    columns = ["step", "train_loss", "val_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "finetune" / "analysis" / "finetune_loss.csv")[columns],
                                  pd.read_csv(single_run / "finetune" / "analysis" / "finetune_loss.csv")[columns],
                                  rtol=1e-5)
    a, b = load_pruned(single_run / "finetune" / "model"), load_pruned(out / "finetune" / "model")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


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
