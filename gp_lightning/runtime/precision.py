"""Numerics: what ``auto`` means on this machine for this run, and the dtypes that follow from a precision.

``auto`` asks :mod:`gp_lightning.runtime.machine`: bf16 only where the hardware computes it natively,
and bf16 weights (``bf16-true``) only where the run can hold them: a distributed or sharded run
all-reduces and shards float32 gradients. There ``auto`` is ``bf16-mixed`` on a bf16 GPU and
``32-true`` on a CPU: bf16 autocast rounds each batch's gradients, so the global table would depend
on how the windows are split over ranks, while a float32 run selects exactly what one process
selects. That costs time on a native-bf16 CPU (``bf16-mixed`` calibrates in 0.43x the time of
``32-true`` on an AVX512-BF16 CPU, ``bench/precision.py``): a user who prefers the speed sets it.
Where bf16 is emulated (AVX2-only CPUs) ``auto`` is ``32-true`` everywhere. A precision the user set
is kept as it is (and refused with a clear error where it cannot work).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gp_lightning.runtime.machine import Machine, detect


@dataclass(frozen=True)
class Choice:
    """A concrete Lightning precision and why it was chosen (the log line says both)."""

    precision: str
    reason: str


def needs_float32_parameters(strategy: str, world: int) -> bool:
    """Whether this run's strategy keeps float32 parameters: DDP/FSDP/ZeRO-3, and any run of several processes."""
    return strategy in ("ddp", "fsdp", "deepspeed") or world > 1


def choose(precision: str, accelerator: str = "auto", strategy: str = "auto", world: int = 1,
           machine: Machine | None = None) -> Choice:
    """``precision`` as a concrete Lightning precision for a run of ``world`` processes with ``strategy``."""
    if precision != "auto":
        return Choice(precision, "set in the config")
    machine = machine or detect()
    if machine.uses_gpu(accelerator):
        if machine.cuda_bf16:
            return Choice("bf16-mixed", "auto: the GPU computes bf16 natively")
        return Choice("32-true", "auto: the GPU has no native bf16")
    if not machine.cpu_bf16:
        return Choice("32-true", f"auto: this CPU ({machine.kind}) emulates bf16, float32 is faster")
    if needs_float32_parameters(strategy, world):
        return Choice("32-true", f"auto: a {strategy} run of {world} process(es) needs float32 parameters, and float32 "
                                 "compute keeps its statistics equal to one process's (bf16 autocast would round "
                                 "each batch's gradients: set bf16-mixed to trade that for speed)")
    return Choice("bf16-true", f"auto: this CPU ({machine.kind}) computes bf16 natively")


def resolve(precision: str, accelerator: str = "auto", strategy: str = "auto", world: int = 1) -> str:
    """Turn ``auto`` into a concrete Lightning precision string (see :func:`choose`)."""
    return choose(precision, accelerator, strategy, world).precision


def holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of dtype ``narrow`` is exactly a value of ``wide`` (float32 holds bf16 and float16)."""
    if wide == narrow:
        return True
    return wide in (torch.float32, torch.float64) and torch.finfo(wide).bits > torch.finfo(narrow).bits


def load_dtype(precision: str) -> torch.dtype:
    """Parameter dtype for a resolved precision (mixed precision keeps float32 weights)."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast for bf16 precisions (a no-op on weights that are already bf16); for the others autocast is
    off, also inside an enclosing one (the KD teacher's logits inside a bf16-mixed training step are float32
    when the evaluation precision is 32-true)."""
    enabled = precision.startswith("bf16")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        yield
