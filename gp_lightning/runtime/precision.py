"""Numerics: pick bf16 only where the hardware computes it natively.

On CPUs without AMX / AVX512-BF16 (e.g. AVX2-only machines) bf16 matmuls are emulated and several
times slower than float32, and CPU bf16 autocast is slower still, so ``auto`` means float32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def cpu_has_native_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability:
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(precision: str, accelerator: str = "auto") -> str:
    """Turn ``auto`` into a concrete Lightning precision string."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-true" if cpu_has_native_bf16() else "32-true"


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
