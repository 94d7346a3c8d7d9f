"""What every workflow does around its own steps: one run directory, resolved numerics, a seed, a log.

A recipe (torchtune's shape) is ``setup`` -> its steps -> ``save`` -> ``cleanup``. :class:`Recipe`
holds the part that pruning and fine-tuning share; each workflow adds its steps.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.config import DistributedConfig, Precision, RunConfig
from gp_lightning.runtime.io import RunLock, check_run_dir, lock_new_run_dir, open_run_log
from gp_lightning.runtime.precision import choose
from gp_lightning.runtime.ranks import global_rank, world_size

log = logging.getLogger("gp_lightning")


class Recipe:
    """The shared base: run directory (rank 0 writes), precision, seed, log file, timings."""

    def __init__(self, run: RunConfig, distributed: DistributedConfig, eval_precision: Precision) -> None:
        self.rank = global_rank()
        self.run_dir = Path(run.output)
        self.timings: dict[str, float] = {}
        self._run, self._distributed, self._eval_precision = run, distributed, eval_precision
        self._log_handler: logging.Handler = logging.NullHandler()
        self._lock: RunLock | None = None  # rank 0's hold on the run directory, for the run's lifetime

    def start(self, overwrite: bool, config: dict[str, Any], resume: bool = False) -> None:
        """Claim the run directory (see :func:`check_run_dir`: refused while another live run holds it or when it holds
        another run, cleared of the previous run's files with ``overwrite``, kept for ``resume``; locked until
        :meth:`cleanup`); resolve numerics, seed."""
        import lightning as L

        if self.rank == 0:
            self._lock = check_run_dir(self.run_dir, overwrite, config, resume)
        d = self._distributed
        choice = choose(d.precision, d.accelerator, d.strategy, self.world_size())
        self.precision, self.precision_reason = choice.precision, choice.reason
        self.eval_precision = choose(self._eval_precision, d.accelerator).precision  # rank 0 alone evaluates
        L.seed_everything(self._run.seed, verbose=False)

    def world_size(self) -> int:
        """Processes of this run: what the launcher started, else what Lightning will start (devices x nodes)."""
        d = self._distributed
        planned = (d.devices if isinstance(d.devices, int) else 1) * d.num_nodes
        return max(world_size(), planned)

    def open_log(self, config: dict[str, Any]) -> None:
        """Rank 0: ``config.yaml`` and ``training.log`` in the run directory (the other ranks write nothing); a
        directory that did not exist at :meth:`start` is made and locked now."""
        if self.rank == 0:
            if self._lock is None:
                self._lock = lock_new_run_dir(self.run_dir)
            self._log_handler = open_run_log(self.run_dir, log, config)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Seconds of the block into ``timings[key]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = time.perf_counter() - start

    def finish(self) -> None:
        """Rank 0: mark the run directory complete (its manifest, written last)."""
        if self.rank == 0 and self._started():
            run_manifest.finish(self.run_dir)
            self._finished = True

    def _started(self) -> bool:
        return not isinstance(self._log_handler, logging.NullHandler)

    def cleanup(self) -> None:
        """Detach this run's log file; a run that started writing but did not finish is marked failed; the run
        directory's lock is released."""
        if self.rank == 0 and self._started() and not getattr(self, "_finished", False):
            with contextlib.suppress(OSError):
                run_manifest.finish(self.run_dir, "failed")
        log.removeHandler(self._log_handler)
        self._log_handler.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
