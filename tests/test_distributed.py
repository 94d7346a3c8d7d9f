"""Two CPU ranks (gloo) under torchrun give the same per-unit statistics as one process on the same data.

Seven windows over two ranks also exercises uneven shards (the last rank is padded with a
zero-weight window). FSDP2 shards every weight along dim 0 and ZeRO-3 partitions its flattened
elements, so both row units (q/k/v, gate/up) and column units (o_proj/down_proj) are assembled from
per-rank partial sums; the compensation's Gram sums are all-reduced the same way. Every case of one
torchrun launch runs in the same process group, one after the other (a launch costs more than a
case): the kill-and-resume test's killed job is a launch of its own, made before the shared launch,
whose resume case finishes it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import calibrate
from conftest import selection as selection_config
from distributed_worker import compensation, model, search, windows
from safetensors.torch import load_file

from gp_lightning.calibration.units import UnitImportance
from gp_lightning.model.layout import describe
from gp_lightning.selection.greedy import select
from gp_lightning.table.build import build_table

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"

#: case name -> worker options (and what the single-process reference runs with)
CASES: dict[str, dict[str, object]] = {
    "ddp-taylor": {"strategy": "ddp", "method": "taylor"},
    "fsdp-taylor": {"strategy": "fsdp", "method": "taylor"},
    "ddp-wanda": {"strategy": "ddp", "method": "wanda"},
    "fsdp-wanda": {"strategy": "fsdp", "method": "wanda"},
    "ddp-taylor_2nd": {"strategy": "ddp", "method": "taylor_2nd", "fisher_batch_size": 1},
    "deepspeed-taylor": {"strategy": "deepspeed", "method": "taylor"},
    "deepspeed-wanda": {"strategy": "deepspeed", "method": "wanda"},
    "fsdp-sharded-load-taylor": {"strategy": "fsdp", "method": "taylor", "from_dir": "SHARDED"},
    "fsdp-sharded-load-wanda": {"strategy": "fsdp", "method": "wanda", "from_dir": "SHARDED"},
    "fsdp-bf16-mixed": {"strategy": "fsdp", "method": "taylor", "precision": "bf16-mixed"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _load(out: Path) -> UnitImportance:
    tensors = load_file(out)
    parts: dict[str, dict[int, torch.Tensor]] = {"attention": {}, "mlp": {}}
    for key, values in tensors.items():
        kind, layer = key.split(".")
        parts[kind][int(layer)] = values
    statistics = json.loads(out.with_suffix(".json").read_text())
    return UnitImportance(parts["attention"], parts["mlp"], gradient_statistics=statistics)


#: The kill-and-resume job: FSDP, 9 windows, statistics checkpointed after every batch.
RESUMED = {"strategy": "fsdp", "method": "taylor", "windows": 9}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every case of CASES, the resume of a killed job and the compensation from one torchrun launch of two ranks.

    Also holds ``killed`` (the killed launch) and ``root`` (where the outputs are).
    """
    root = tmp_path_factory.mktemp("two-ranks")
    resumed = root / "resumed"
    job = {**RESUMED, "out": str(resumed / "importance.st"), "run_dir": str(resumed)}
    killed = _launch(*(f for key, value in job.items() for f in (f"--{key}", str(value))), "--checkpoint_every", "1",
                     "--kill_after", "2")
    killed_wrote = sorted(p.name for p in resumed.iterdir())
    sharded = root / "sharded-checkpoint"
    model("qwen2").save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    cases = [{**options, "from_dir": str(sharded) if options.get("from_dir") else None, "out": str(root / f"{name}.st")}
             for name, options in CASES.items()]
    cases.append({**job, "resume": True})
    cases.append({"kind": "compensation", "out": str(root / "compensation.st")})
    cases.append({"kind": "search", "out": str(root / "search.json")})
    (root / "cases.json").write_text(json.dumps(cases))
    done = _launch("--cases", str(root / "cases.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: _load(root / f"{name}.st") for name in CASES} | {"killed": killed, "killed_wrote": killed_wrote,
                                                                  "root": root}


def _single(method: str = "taylor", fisher_batch_size: int | None = None, count: int = 7) -> UnitImportance:
    net = model("qwen2")
    return calibrate(net, windows(count), 2, method, fisher_batch_size=fisher_batch_size)


def _assert_equal(distributed: UnitImportance, single: UnitImportance, rtol: float = 1e-5) -> None:
    for kind in ("attention", "mlp"):
        for layer, values in getattr(single, kind).items():
            got = getattr(distributed, kind)[layer]
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, values, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", [name for name in CASES if "sharded" not in name and "bf16" not in name])
def test_two_ranks_equal_one_process(two_ranks: dict[str, object], name: str) -> None:
    case = CASES[name]
    distributed = two_ranks[name]
    net = model("qwen2")
    layout = describe(net)
    single = _single(str(case["method"]), case.get("fisher_batch_size"))  # type: ignore[arg-type]
    _assert_equal(distributed, single)
    if single.gradient_statistics is not None and case["strategy"] != "deepspeed":  # ranks combine figures exactly
        for mine, theirs in zip(distributed.gradient_statistics["blocks"], single.gradient_statistics["blocks"],
                                strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                assert mine[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-10))
    for ratio in (0.05, 0.15):
        a = select(build_table(layout, single), layout, selection_config(ratio))
        b = select(build_table(layout, distributed), layout, selection_config(ratio))
        assert a.plan.to_json() == b.plan.to_json()


@pytest.mark.parametrize("method", ["taylor", "wanda"])
def test_fsdp_sharded_load_reads_only_local_rows(two_ranks: dict[str, object], method: str) -> None:
    """Ranks build the model on the meta device and read their own rows from a multi-shard checkpoint."""
    _assert_equal(two_ranks[f"fsdp-sharded-load-{method}"], _single(method))


def test_fsdp_bf16_mixed_accumulates_in_float32(two_ranks: dict[str, object]) -> None:
    """Layers gathered and run in bf16 (MixedPrecisionPolicy); gradients reduced into float32 shards."""
    _assert_equal(two_ranks["fsdp-bf16-mixed"], _single(), rtol=0.05)


def test_fsdp_killed_and_resumed_equals_one_process(two_ranks: dict[str, object]) -> None:
    """Both ranks die after 2 batches; the restarted job loads each rank's sharded gradients."""
    assert two_ranks["killed"].returncode != 0
    assert two_ranks["killed_wrote"] == ["calibration_state"]  # statistics checkpoints, no result
    _assert_equal(_load(two_ranks["root"] / "resumed" / "importance.st"), _single(count=9))


def test_two_ranks_give_the_gram_sums_of_one_process(two_ranks: dict[str, object]) -> None:
    """Seven windows over two gloo ranks (one padded): the same refit as one process."""
    ranks = load_file(two_ranks["root"] / "compensation.st")
    single = compensation()
    assert len(ranks) == 2 * len(single.weights)
    for (layer, block), weight in single.weights.items():
        torch.testing.assert_close(ranks[f"{layer}.{block}.w"], weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ranks[f"{layer}.{block}.b"], single.biases[(layer, block)], rtol=1e-4, atol=1e-5)


def test_two_ranks_search_choose_what_one_process_chooses(two_ranks: dict[str, object]) -> None:
    """The width search with its fitness windows spread over two gloo ranks: the same choices, and the same figures
    up to the rounding of the refits' Gram sums, which two ranks add in another order (as in the compensation)."""
    ranks = json.loads((two_ranks["root"] / "search.json").read_text())
    single = search()
    assert ranks["kept"] == single["kept"] and ranks["chosen"]["from"] == single["chosen"]["from"]
    assert [h.get("best_mutant") for h in ranks["history"]] == pytest.approx(
        [h.get("best_mutant") for h in single["history"]], rel=1e-4)
    assert ranks["held_out"] == pytest.approx(single["held_out"], rel=1e-4)
    assert ranks["window_passes"] < single["window_passes"]  # each rank measured only its own windows
