"""Config groups every workflow shares, and the machinery that makes a config out of groups.

A workflow's config (``PruneConfig``, ``FinetuneConfig``) is a dataclass whose fields are argument
groups: small dataclasses that validate themselves, with the doc of each key next to it. Keys stay
flat for users (``--pruning_ratio``, ``pruning_ratio:`` in YAML): every key belongs to exactly one
group, :meth:`GroupedConfig.from_flat` sends each to its group and :meth:`GroupedConfig.to_dict`
gives the flat view back. Nothing here imports torch, so ``--help`` and bad flags answer at once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from gp_lightning.runtime.errors import ConfigError, check_config

Precision = Literal["auto", "bf16-mixed", "bf16-true", "32-true"]
StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed"]
LogLevel = Literal["debug", "info", "warning", "error"]
#: The ``accelerator`` values: Lightning's names of what this toolkit runs on (``gpu`` and ``cuda`` are one).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")

Config = TypeVar("Config", bound="GroupedConfig")


@dataclass
class RunConfig:
    """Run directory, seed and console"""

    output: str = "runs/prune"
    """Run directory that receives everything the run writes."""
    overwrite: bool = False
    """Replace the results of an earlier run in ``output``."""
    seed: int = 42
    """Seed for the choice of data and anything random."""
    log_level: LogLevel = "info"
    """Console detail: ``info`` (progress bars, gp-lightning's log lines, real warnings), ``debug`` (also
    every line other libraries print; ``-v``), ``warning`` or ``error``."""

    def __post_init__(self) -> None:
        check_config(bool(self.output), "output", self.output, "must name a run directory")


@dataclass
class DistributedConfig:
    """Numerics and processes"""

    precision: Precision = "auto"
    """Numerics of calibration or training. ``auto``: bf16 where the hardware computes it natively (a bf16
    GPU: ``bf16-mixed``; a CPU with AMX/AVX512-BF16: ``bf16-true`` in one process), else float32, and float32
    for DDP, FSDP, ZeRO-3 or several processes on a CPU (their statistics then equal one process's); the log
    says which and why. ``bf16-mixed``: bf16 autocast over float32 weights. ``bf16-true``: bf16 weights. ``32-true``:
    all float32. Importance statistics always accumulate in float32; saved weights keep the source's dtype."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` (the CUDA GPU when there is one, else the CPU), ``cpu``, or ``gpu``
    (``cuda``: a CUDA GPU, refused on a machine without one)."""
    strategy: StrategyName = "auto"
    """Across processes: ``auto`` (one process, or DDP when a launcher started several), ``ddp`` (each rank
    holds the model; data is sharded), ``fsdp`` (FSDP2: parameters and gradients sharded over ranks),
    ``deepspeed`` (ZeRO-3). Launch with torchrun, srun or ``accelerate launch``; on CPU the ranks talk
    over gloo."""
    devices: int | Literal["auto"] = "auto"
    """Processes per node (``auto``: what the launcher started, else 1)."""
    num_nodes: int = 1
    """Number of nodes."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations during backward instead of keeping them: activation
    memory of about one layer instead of all, for roughly a third more compute."""

    def __post_init__(self) -> None:
        check_config(self.accelerator in ACCELERATORS, "accelerator", self.accelerator,
                     f"must be one of {', '.join(ACCELERATORS)}: gp-lightning runs on CPUs and CUDA GPUs")
        if self.accelerator in ("gpu", "cuda"):
            from gp_lightning.runtime.machine import detect

            check_config(detect().uses_gpu(self.accelerator), "accelerator", self.accelerator,
                         f"needs a CUDA GPU, and this machine ({detect().kind}) has none: pass --accelerator cpu "
                         "(or auto)")
        check_config(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be at least 1")
        check_config(self.devices == "auto" or int(self.devices) >= 1, "devices", self.devices,
                     "must be at least 1, or auto")


def grouped(cls: type[Config]) -> type[Config]:
    """``@dataclass`` for a workflow config: every annotated field is an argument group, by default its defaults."""
    hints = typing.get_type_hints(cls)
    for name in cls.__dict__.get("__annotations__", {}):
        if name not in cls.__dict__:
            setattr(cls, name, dataclasses.field(default_factory=hints[name]))
    return dataclass(cls)


class GroupedConfig:
    """Base of the workflow configs: dataclasses whose fields are argument groups with flat keys."""

    @classmethod
    def group_fields(cls) -> Iterator[tuple[str, type]]:
        """``(attribute, group class)`` of every group, in declaration order."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            yield f.name, hints[f.name]

    @classmethod
    def key_owners(cls) -> dict[str, str]:
        """Flat key -> the attribute of the group it belongs to."""
        owners: dict[str, str] = {}
        for attribute, group in cls.group_fields():
            for f in dataclasses.fields(group):
                if f.name in owners:
                    raise TypeError(f"{cls.__name__}: key {f.name!r} is in groups {owners[f.name]} and {attribute}")
                owners[f.name] = attribute
        return owners

    @classmethod
    def from_flat(cls: type[Config], values: Mapping[str, Any] | None = None, **more: Any) -> Config:
        """The config of flat keys (YAML, flags, ``oneshot(**keys)``); unknown keys are an error."""
        values = {**(values or {}), **more}
        owners = cls.key_owners()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise ConfigError(f"Unknown config key(s) {unknown}: see --help for the keys.")
        groups: dict[str, dict[str, Any]] = {attribute: {} for attribute, _ in cls.group_fields()}
        for key, value in values.items():
            groups[owners[key]][key] = value
        return cls(**{attribute: group(**groups[attribute]) for attribute, group in cls.group_fields()})

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value, flat, in group order (what ``config.yaml`` holds)."""
        out: dict[str, Any] = {}
        for attribute, _ in self.group_fields():
            out.update(dataclasses.asdict(getattr(self, attribute)))
        return out

    def replace(self: Config, **values: Any) -> Config:
        """A copy with some flat keys changed (validated again)."""
        return type(self).from_flat({**self.to_dict(), **values})

    @classmethod
    def given(cls: type[Config], config: Config | None = None, **keys: Any) -> Config:
        """``config`` with ``keys`` changed, or the defaults with ``keys`` (the one-call entries' arguments)."""
        if config is None:
            return cls.from_flat(keys)
        return config.replace(**keys) if keys else config
