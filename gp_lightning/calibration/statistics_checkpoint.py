"""Statistics checkpoints: save what calibration has accumulated every N batches, resume after a crash.

A calibration pass over a 70B model on a shared cluster can be preempted. Every ``every`` batches
each rank writes its accumulated state (atomically) to ``directory/rank{r}.safetensors``: the number
of batches done and its collector's statistics (Taylor: the accumulated gradients of its parameter
shards and the Fisher sums; Wanda: the input-norm sums). Resuming loads them and skips the batches
already done, so the sums continue in the same order and the result is bit-identical to an
uninterrupted pass.

The file is safetensors: tensors only, plus a JSON header (``__metadata__``) that holds the shape of
the collector's state and the settings that produced it (model, method, a hash of the windows, batch
size, precision, seed, world size). Nothing in it is executed when it is read, so a copied or shared
run directory cannot run code, and a resume whose settings differ is refused with the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gp_lightning.runtime.errors import CalibrationError

FORMAT = "gp-lightning statistics checkpoint"
VERSION = 1


class Checkpointable(Protocol):
    def statistics_state(self) -> dict[str, Any]: ...

    def load_statistics_state(self, state: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None: ...


def windows_hash(windows: torch.Tensor) -> str:
    """A short fingerprint of the calibration windows (their token ids, in order)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``value`` (dicts, lists, tuples, numbers, strings, None) whose tensors are moved into
    ``tensors`` under numbered keys."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[flatten(k, tensors), flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a statistics checkpoint cannot hold a {type(value).__name__}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`; anything but the kinds it writes is an error (the file is untrusted)."""
    if not isinstance(skeleton, dict) or len(skeleton) != 1:
        raise ValueError("malformed structure")
    (kind, body), = skeleton.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [unflatten(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"unknown entry '{kind}'")


def write_state(path: Path, header: dict[str, Any], state: Any) -> None:
    """``state`` as safetensors with ``header`` and the state's skeleton as JSON, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    metadata = {"format": FORMAT, "header": json.dumps({**header, "version": VERSION}),
                "structure": json.dumps(skeleton)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_state(path: Path) -> tuple[dict[str, Any], Any]:
    """The header and the state of a file :func:`write_state` wrote; anything else is a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        if metadata.get("format") != FORMAT:
            raise ValueError("it has no gp-lightning header")
        header = json.loads(metadata["header"])
        if header.get("version") != VERSION:
            raise ValueError(f"it is version {header.get('version')}, this gp-lightning reads {VERSION}")
        return header, unflatten(json.loads(metadata["structure"]), tensors)
    except Exception as exc:  # noqa: BLE001 - any flaw of an untrusted file is the same user error
        raise CalibrationError(f"resume: {path} is not a readable statistics checkpoint ({exc}). Run without "
                               "--resume (or with --overwrite) to calibrate from the start.") from None


class StatisticsCheckpoint(L.Callback):
    """Saves and restores a collector's statistics (it must run after the collector in the callback list).

    ``settings``: what must be the same to continue a pass (compared on resume, with the world size).
    """

    def __init__(self, directory: str | Path, every: int, collector: Checkpointable, resume: bool = False,
                 settings: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.every = every
        self.collector = collector
        self.resume = resume
        self.settings = dict(settings or {})
        self.batches_done = 0
        self._state: dict[str, Any] | None = None

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.safetensors"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.settings["world_size"] = trainer.world_size
        if not self.resume:
            return
        path = self._path(trainer.global_rank)
        if not path.is_file():
            raise CalibrationError(f"resume: no statistics checkpoint at {path}. Run without --resume, or pass the "
                                   "--output of the interrupted run (it must have used --checkpoint_every).")
        header, state = read_state(path)
        saved = header.get("settings", {})
        differ = sorted(key for key in set(saved) | set(self.settings) if saved.get(key) != self.settings.get(key))
        if differ:
            shown = ", ".join(f"{key} {saved.get(key)!r} -> {self.settings.get(key)!r}" for key in differ)
            raise CalibrationError(f"resume: the statistics checkpoint in {self.directory} was written with other "
                                   f"settings ({shown}). Resume with the interrupted run's settings, or start again "
                                   "with --overwrite.")
        self._state = {**header, "collector": state}
        self.batches_done = int(header["batches_done"])
        trainer.datamodule.skip_batches = self.batches_done

    def finish_loaded(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Finish a resumed pass whose checkpoint covered every batch (Lightning then runs no epoch and calls no
        train hooks): load the statistics and let the collector score them. False when nothing was loaded."""
        if self._state is None:
            return False
        self.on_train_start(trainer, pl_module)
        self.collector.on_train_end(trainer, pl_module)
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            self.collector.load_statistics_state(self._state["collector"])
            pl_module.backward_passes = int(self._state["backward_passes"])
            self._state = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches_done += 1
        if self.every and self.batches_done % self.every == 0:
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        header = {"batches_done": self.batches_done, "backward_passes": int(getattr(pl_module, "backward_passes", 0)),
                  "settings": self.settings}
        write_state(self._path(trainer.global_rank), header, self.collector.statistics_state())
