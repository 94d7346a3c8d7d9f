"""SIGTERM and SIGINT end a run at once, with a non-zero exit status and one line saying where it stopped.

A cluster scheduler (slurm before a requeue or at the time limit) sends SIGTERM and later SIGKILL.
Lightning only notes a SIGTERM during a loop and ends the loop with an exit status of 0, which a
scheduler reads as success; outside a loop nothing at all happens until the SIGKILL. Here the
signal becomes :class:`RunInterrupted` wherever the run is: everything on the way out runs
(``finally`` blocks, Lightning's teardown, the statistics checkpoints already written stay), and the
process exits with 128 + the signal number, as a shell reports a process ended by that signal.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class RunInterrupted(BaseException):  # noqa: N818 - not an error of the run: a request to stop it
    """The run was asked to stop by a signal (a BaseException, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise RunInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, ``signals`` raise :class:`RunInterrupted` (the previous handlers come back after)."""
    previous = {}
    for signum in signals:
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            previous[signum] = signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
