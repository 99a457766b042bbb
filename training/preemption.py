"""Stopping cleanly: preemption signals, mid-epoch checkpoints, and the agreement between ranks.

SIGTERM (what torchrun, Kubernetes and most schedulers send) and SIGUSR1 (what SLURM sends
ahead of a time limit with ``--signal``) set a flag. After every training step all ranks
agree, on a CPU side channel, whether any of them was signalled and whether a periodic
mid-epoch checkpoint is due (``--save-every`` minutes, ``--save-every-steps``); then they
write it together and, when signalled, stop. The process exits with
``PREEMPTED_EXIT_CODE`` and ``--resume auto`` continues from that exact step.

A second signal while the checkpoint is written is ignored: the write is atomic, so even a
kill at that moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Callable, Iterator

from training import distributed
from training.engine import EpochPosition
from training.metrics import RunningSums

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, resumable
STOP_SIGNALS = tuple(sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if sig)


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint."""


class StopSignals:
    """Remembers the first stop signal this process received."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            log.warning("%s received: stopping after this step and writing a checkpoint", name)
        else:
            log.warning("%s received while stopping: ignored, the checkpoint is being written", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle the stop signals inside the block; the previous handlers come back after it."""
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


SaveMidEpoch = Callable[[EpochPosition, int, RunningSums], None]


class RunControl:
    """The engine's ``StepControl``: periodic mid-epoch checkpoints and stopping on a signal.

    Args:
        save: writes a mid-epoch checkpoint; called on every rank (rank 0 writes).
        every_minutes, every_steps: periodic checkpoints (0: off); rank 0's clock decides.
    """

    def __init__(self, signals: StopSignals, save: SaveMidEpoch, every_minutes: float, every_steps: int,
                 is_main: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.signals = signals
        self.save = save
        self.every_seconds = every_minutes * 60.0
        self.every_steps = every_steps
        self.is_main = is_main
        self.clock = clock
        self.last_save = clock()
        self.steps_since_save = 0

    def _save_due(self) -> bool:
        if not self.is_main:
            return False
        by_steps = self.every_steps > 0 and self.steps_since_save >= self.every_steps
        by_time = self.every_seconds > 0 and self.clock() - self.last_save >= self.every_seconds
        return by_steps or by_time

    def after_step(self, position: EpochPosition, steps_done: int, sums: RunningSums) -> bool:
        self.steps_since_save += 1
        stop, save = distributed.agree([int(self.signals.received is not None), int(self._save_due())])
        if stop or (save and steps_done < position.steps):
            self.save(position, steps_done, sums)
            self.last_save, self.steps_since_save = self.clock(), 0
        return bool(stop)

    def epoch_saved(self) -> None:
        self.last_save, self.steps_since_save = self.clock(), 0

    def stop_requested(self) -> bool:
        """Whether any rank was signalled (all ranks call this together)."""
        return bool(distributed.agree([int(self.signals.received is not None)])[0])
