"""Two CPU ranks (gloo) under torchrun give the same per-unit statistics as one process on the same data.

Seven windows over two ranks also exercises uneven shards (the last rank is padded with a
zero-weight window). FSDP2 shards every weight along dim 0 and ZeRO-3 partitions its flattened
elements, so both row units (q/k/v, gate/up) and column units (o_proj/down_proj) are assembled from
per-rank partial sums.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import model, windows

from gp_lightning.architecture import describe
from gp_lightning.calibration import run_calibration
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.selection import select
from gp_lightning.table import build_table

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str) -> UnitImportance:
    out = tmp_path / "importance.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out, weights_only=False)
    return UnitImportance(saved["attention"], saved["mlp"], gradient_statistics=saved.get("gradient_statistics"))


@pytest.mark.parametrize("strategy,method,extra", [
    ("ddp", "taylor", []),
    ("fsdp", "taylor", []),
    ("ddp", "wanda", []),
    ("fsdp", "wanda", []),
    ("ddp", "taylor_2nd", ["--fisher_batch_size", "1"]),
    ("deepspeed", "taylor", []),
    ("deepspeed", "wanda", []),
])
def test_two_ranks_equal_one_process(tmp_path: Path, strategy: str, method: str, extra: list[str]) -> None:
    distributed = _torchrun(tmp_path, "--strategy", strategy, "--method", method, *extra)
    net = model("qwen2")
    layout = describe(net)
    fisher = int(extra[1]) if extra else None
    single = run_calibration(net, layout, windows(7), 2, accelerator="cpu", progress=False, method=method,
                             fisher_batch_size=fisher)
    for kind in ("attention", "mlp"):
        for layer, values in getattr(single, kind).items():
            torch.testing.assert_close(getattr(distributed, kind)[layer], values, rtol=1e-5, atol=0)
    if single.gradient_statistics is not None and strategy != "deepspeed":  # ranks combine gradient figures exactly
        for mine, theirs in zip(distributed.gradient_statistics["blocks"], single.gradient_statistics["blocks"],
                                strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                assert mine[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-10))
    for ratio in (0.05, 0.15):
        a = select(build_table(layout, single), layout, ratio)
        b = select(build_table(layout, distributed), layout, ratio)
        assert a.plan.to_json() == b.plan.to_json()


def test_fsdp_killed_and_resumed_equals_one_process(tmp_path: Path) -> None:
    """Both ranks die after 2 batches; the restarted job loads each rank's sharded gradients."""
    state = str(tmp_path / "state")
    out = tmp_path / "importance.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), "--out", str(out), "--strategy", "fsdp", "--windows", "9",
           "--checkpoint_dir", state, "--checkpoint_every", "1", "--kill_after", "2"]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not out.exists()
    resumed = _torchrun(tmp_path, "--strategy", "fsdp", "--windows", "9", "--checkpoint_dir", state, "--resume")
    net = model("qwen2")
    single = run_calibration(net, describe(net), windows(9), 2, accelerator="cpu", progress=False)
    for layer, values in single.mlp.items():
        torch.testing.assert_close(resumed.mlp[layer], values, rtol=1e-5, atol=0)
        torch.testing.assert_close(resumed.attention[layer], single.attention[layer], rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["taylor", "wanda"])
def test_fsdp_sharded_load_reads_only_local_rows(tmp_path: Path, method: str) -> None:
    """Ranks build the model on the meta device and read their own rows from a multi-shard checkpoint."""
    checkpoint = tmp_path / "checkpoint"
    model("qwen2").save_pretrained(checkpoint, max_shard_size="20KB")
    assert len(list(checkpoint.glob("*.safetensors"))) > 2
    distributed = _torchrun(tmp_path, "--strategy", "fsdp", "--method", method, "--from_dir", str(checkpoint))
    net = model("qwen2")
    single = run_calibration(net, describe(net), windows(7), 2, accelerator="cpu", progress=False, method=method)
    for kind in ("attention", "mlp"):
        for layer, values in getattr(single, kind).items():
            torch.testing.assert_close(getattr(distributed, kind)[layer], values, rtol=1e-5, atol=0)


def test_fsdp_bf16_mixed_accumulates_in_float32(tmp_path: Path) -> None:
    """Layers gathered and run in bf16 (MixedPrecisionPolicy); gradients reduced into float32 shards."""
    distributed = _torchrun(tmp_path, "--strategy", "fsdp", "--precision", "bf16-mixed")
    net = model("qwen2")
    exact = run_calibration(net, describe(net), windows(7), 2, accelerator="cpu", progress=False)
    for layer, values in exact.mlp.items():
        assert distributed.mlp[layer].dtype == torch.float64
        torch.testing.assert_close(distributed.mlp[layer], values, rtol=0.05, atol=0)
        torch.testing.assert_close(distributed.attention[layer], exact.attention[layer], rtol=0.05, atol=0)
