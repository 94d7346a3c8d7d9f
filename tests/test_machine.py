"""The capability matrix: every CPU/GPU-dependent decision, checked for each machine kind a user may have."""

from __future__ import annotations

import os

import pytest

from gp_lightning.runtime import machine
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.runtime.precision import choose, holds

CPU_KINDS = ("avx2", "avx512", "avx512_bf16", "amx")

#: kind -> (auto precision in one process, auto precision when distributed / sharded)
EXPECTED_PRECISION = {
    "avx2": ("32-true", "32-true"),
    "avx512": ("32-true", "32-true"),
    "avx512_bf16": ("bf16-true", "32-true"),
    "amx": ("bf16-true", "32-true"),
    "cuda": ("bf16-mixed", "bf16-mixed"),
    "cuda_no_bf16": ("32-true", "32-true"),
}


@pytest.mark.parametrize("kind", list(machine.KINDS))
def test_auto_precision_of_every_kind(kind: str) -> None:
    m = machine.KINDS[kind]
    single, sharded = EXPECTED_PRECISION[kind]
    assert choose("auto", machine=m).precision == single
    for strategy, world in (("auto", 2), ("ddp", 1), ("ddp", 2), ("fsdp", 2), ("deepspeed", 1)):
        choice = choose("auto", strategy=strategy, world=world, machine=m)
        assert choice.precision == sharded, (strategy, world)
        assert choice.reason.startswith("auto:")
    # a CPU run asked for explicitly on a GPU machine decides as the CPU does
    cpu = choose("auto", accelerator="cpu", machine=m).precision
    assert cpu == ("bf16-true" if m.cpu_bf16 else "32-true")


@pytest.mark.parametrize("kind", list(machine.KINDS))
def test_explicit_precision_is_kept_on_every_kind(kind: str) -> None:
    for precision in ("bf16-true", "bf16-mixed", "32-true"):
        choice = choose(precision, strategy="ddp", world=2, machine=machine.KINDS[kind])
        assert choice.precision == precision and choice.reason == "set in the config"


@pytest.mark.parametrize("kind", list(machine.KINDS))
def test_llamacpp_and_deepspeed_decisions(kind: str) -> None:
    m = machine.KINDS[kind]
    assert m.llamacpp_run_flags() == (("--no-repack",) if kind == "amx" else ())
    assert m.deepspeed_cpu_ops() == (() if kind.startswith("cuda") else ("ShareMemCommBuilder",))


def test_forcing_a_kind_and_a_bad_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    machine.detect.cache_clear()
    try:
        for kind in machine.KINDS:
            monkeypatch.setenv(machine.ENV, kind)
            machine.detect.cache_clear()
            forced = machine.detect()
            assert forced.cpu_flags == machine.KINDS[kind].cpu_flags and forced.cuda == machine.KINDS[kind].cuda
            assert choose("auto").precision == EXPECTED_PRECISION[kind][0]
        monkeypatch.setenv(machine.ENV, "sparc")
        machine.detect.cache_clear()
        with pytest.raises(ConfigError, match="GP_LIGHTNING_MACHINE='sparc' is not a machine kind: use one of avx2"):
            machine.detect()
    finally:
        monkeypatch.delenv(machine.ENV)
        machine.detect.cache_clear()


def test_detect_reads_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real machine's kind follows its /proc/cpuinfo flags (whatever CPU runs the suite, forced or not)."""
    monkeypatch.delenv(machine.ENV, raising=False)
    machine.detect.cache_clear()
    with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
        flags = set(next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split())
    found = machine.detect()
    assert found.amx == bool({"amx_tile", "amx_int8", "amx_bf16"} & flags)
    assert found.cpu_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert found.kind.split("+")[0] in CPU_KINDS
    assert found.cores == len(os.sched_getaffinity(0))  # llama.cpp threads and build jobs
    machine.detect.cache_clear()  # a kind forced for the whole suite applies again


def test_holds() -> None:
    import torch

    assert holds(torch.float32, torch.bfloat16) and holds(torch.float32, torch.float16)
    assert holds(torch.bfloat16, torch.bfloat16) and holds(torch.float64, torch.float32)
    assert not holds(torch.bfloat16, torch.float32) and not holds(torch.float16, torch.bfloat16)
    assert not holds(torch.bfloat16, torch.float16)
