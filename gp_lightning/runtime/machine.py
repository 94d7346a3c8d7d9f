"""What this machine can do: the one place every CPU- or GPU-dependent decision asks.

Three x86 CPU kinds meet users: AVX2-only (bf16 emulated, several times slower than float32),
AVX512 with AVX512-BF16 (native bf16 dot products) and Intel AMX (bf16 and int8 tiles, plus
AVX512-BF16). A CUDA GPU may sit next to any of them, with or without bf16. :func:`detect` reads
the machine once; every decision is a function of a :class:`Machine`, so a test can hand in any
kind (:data:`KINDS`) and check it on whatever CPU runs the suite. ``GP_LIGHTNING_MACHINE=<kind>``
forces a kind for a whole process tree (the real work then runs on the real CPU with the decisions
of that kind: a forced ``amx`` on an AVX2 machine computes bf16 emulated, slower but the same).

The decisions (the modules that act on them import this one):

| decision | AVX2-only | AVX512-BF16 | AMX | CUDA bf16 | CUDA no bf16 |
| --- | --- | --- | --- | --- | --- |
| ``auto`` precision, one process | 32-true | bf16-true | bf16-true | bf16-mixed | 32-true |
| ``auto`` precision, distributed/sharded | 32-true | 32-true | 32-true | bf16-mixed | 32-true |
| llama.cpp run flags | none | none | ``--no-repack`` (``llama-bench``: ``--repack 0``) | none | none |
| DeepSpeed CPU ops built ahead | shm comm | shm comm | shm comm | none | none |

A distributed or sharded run needs float32 parameters (gradients are all-reduced and sharded in
float32). On a CPU it also computes in float32, so that its statistics equal one process's (bf16
autocast rounds each batch's gradients); ``bf16-mixed`` would calibrate in 0.43x the time on an
AVX512-BF16 CPU (``bench/results/precision.md``) and is the user's to choose.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

ENV = "GP_LIGHTNING_MACHINE"


@dataclass(frozen=True)
class Machine:
    """The capabilities the project's decisions depend on."""

    kind: str
    """``avx2``, ``avx512``, ``avx512_bf16``, ``amx`` (the CPU), with ``+cuda`` / ``+cuda_no_bf16`` when a GPU is there."""
    cpu_flags: frozenset[str]
    """The x86 feature flags that matter here (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``, ``amx_int8``...)."""
    cuda: bool = False
    """A CUDA device is visible."""
    cuda_bf16: bool = False
    """That device computes bf16 natively (Ampere and later)."""
    cores: int = 1
    """CPU cores this process may run on (its affinity mask, not the host's count)."""

    @property
    def cpu_bf16(self) -> bool:
        """bf16 matrix products run natively on the CPU (AVX512-BF16 or AMX); else they are emulated."""
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    @property
    def amx(self) -> bool:
        """Intel AMX tiles: llama.cpp's AMX buffer type is compiled in by a native build here."""
        return bool({"amx_tile", "amx_int8", "amx_bf16"} & self.cpu_flags)

    def uses_gpu(self, accelerator: str = "auto") -> bool:
        """Whether work with this Lightning ``accelerator`` setting runs on the GPU."""
        return self.cuda and accelerator in ("auto", "gpu", "cuda")

    def llamacpp_run_flags(self) -> tuple[str, ...]:
        """Flags every llama.cpp tool run gets: ``--no-repack`` on AMX CPUs, where the AMX buffer type of a
        native build crashes on q8_0 (and is reported to on Q4_K_M, and wrong on q4_0): the ``extra buffer
        types`` that repacking enables are turned off."""
        return ("--no-repack",) if self.amx else ()

    def llamacpp_bench_flags(self) -> tuple[str, ...]:
        """The same for ``llama-bench``, which has its own parser and spells it ``--repack 0``."""
        return ("--repack", "0") if self.amx else ()

    def deepspeed_cpu_ops(self) -> tuple[str, ...]:
        """DeepSpeed op builders a CPU job JIT-compiles on first use, to build once ahead of the first run."""
        return () if self.cuda else ("ShareMemCommBuilder",)


_X86_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

#: Every kind a user may have, as the tests force them (flags as /proc/cpuinfo spells them).
KINDS: dict[str, Machine] = {
    "avx2": Machine("avx2", frozenset({"avx2"}), cores=2),
    "avx512": Machine("avx512", frozenset({"avx2", "avx512f"}), cores=2),
    "avx512_bf16": Machine("avx512_bf16", frozenset({"avx2", "avx512f", "avx512_bf16"}), cores=2),
    "amx": Machine("amx", frozenset(_X86_FLAGS), cores=2),
    "cuda": Machine("avx2+cuda", frozenset({"avx2"}), cuda=True, cuda_bf16=True, cores=2),
    "cuda_no_bf16": Machine("avx2+cuda_no_bf16", frozenset({"avx2"}), cuda=True, cores=2),
}


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()) & frozenset(_X86_FLAGS)
    except OSError:
        pass
    import torch  # no /proc (macOS, Windows): torch's own view of the vector unit

    capability = torch.backends.cpu.get_cpu_capability().upper()
    return frozenset({"avx2"} | ({"avx512f"} if "AVX512" in capability else set())
                     | ({"amx_tile", "amx_bf16", "avx512_bf16"} if "AMX" in capability else set()))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_kind(flags: frozenset[str]) -> str:
    if {"amx_tile", "amx_int8", "amx_bf16"} & flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2"


@functools.lru_cache(maxsize=1)
def detect() -> Machine:
    """This machine, read once per process (``GP_LIGHTNING_MACHINE`` forces one of :data:`KINDS`)."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in KINDS:
            from gp_lightning.runtime.errors import ConfigError

            raise ConfigError(f"{ENV}={forced!r} is not a machine kind: use one of {', '.join(KINDS)}, or unset it.")
        return dataclasses.replace(KINDS[forced], cores=_cores())
    import torch

    flags = _cpu_flags()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    kind = _cpu_kind(flags) + ("+cuda" if bf16 else "+cuda_no_bf16" if cuda else "")
    return Machine(kind, flags, cuda=cuda, cuda_bf16=bf16, cores=_cores())
