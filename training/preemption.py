"""Stopping cleanly: stop signals, mid-epoch checkpoints, and the agreement between ranks.

SIGTERM (what torchrun, Kubernetes and most schedulers send), SIGUSR1 (what SLURM sends
ahead of a time limit with ``--signal``) and a first SIGINT (Ctrl-C) set a flag. After
every training step all ranks agree, on a CPU side channel, whether any of them was
signalled and whether a periodic mid-epoch checkpoint is due (``--save-every`` minutes,
``--save-every-steps``); then they write it together and, when signalled, stop. Exit
status (docs/RESUME.md): ``PREEMPTED_EXIT_CODE`` (75) after SIGTERM/SIGUSR1,
``INTERRUPTED_EXIT_CODE`` (130) after Ctrl-C; every rank exits with the same one, and
``--resume auto`` continues from that exact step.

Repeated signals: another SIGTERM/SIGUSR1 while stopping is ignored (the write is atomic,
so even a kill then leaves the previous checkpoint intact). A second SIGINT, or any stop
signal after a first SIGINT (torchrun turns a second Ctrl-C into SIGTERM), stops at once,
without a new checkpoint: a person who insists wants out. Outside the training loop (while
the run is built, or ``-e`` evaluates) there is nothing to save: any stop signal stops at
once, with the same exit status.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Callable, Iterator

from training import distributed
from training.engine import EpochPosition
from training.metrics import RunningSums

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after writing a checkpoint, resumable
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shells' convention for Ctrl-C
EXIT_CODES = {"SIGTERM": PREEMPTED_EXIT_CODE, "SIGUSR1": PREEMPTED_EXIT_CODE, "SIGINT": INTERRUPTED_EXIT_CODE}
STOP_SIGNALS = tuple(getattr(signal, name) for name in EXIT_CODES if hasattr(signal, name))


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint; ``exit_code`` says which kind."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class StopNow(BaseException):
    """Stop at once, without a new checkpoint (a BaseException: no ``except Exception`` holds it up)."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class StopSignals:
    """Remembers the first stop signal this process received, and stops at once when insisted on.

    Attributes:
        received: the first signal's name, None until one arrives.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._saving_stop = False  # inside the training loop: a stop waits for the step's end and saves
        self._ended = False  # the run is over (done or failed): a stop signal changes nothing

    @property
    def exit_code(self) -> int:
        """The exit status the received signal calls for (0: none received)."""
        return EXIT_CODES[self.received] if self.received else 0

    def _handle(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if self._ended:
            log.warning("%s received while the run ends: ignored", name)
            return
        first = self.received is None
        if first:
            self.received = name
        if first and self._saving_stop:
            again = "; Ctrl-C again stops at once, without it" if name == "SIGINT" else ""
            log.warning("%s received: stopping after this step and writing a checkpoint%s", name, again)
        elif first:
            log.warning("%s received: stopping at once (there is nothing to save at this point)", name)
            raise StopNow(self.exit_code)
        elif name == "SIGINT" or self.received == "SIGINT":
            when = "again" if name == self.received else f"after {self.received}"
            log.warning("%s received %s: stopping at once; the last checkpoint written is kept", name, when)
            raise StopNow(self.exit_code)
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

    @contextlib.contextmanager
    def ended(self) -> Iterator[None]:
        """Tearing down after the run, however it went: a signal now must not replace its outcome
        (a failure's message, or the status of a finished run) with a stop."""
        self._ended = True
        try:
            yield
        finally:
            self._ended = False

    @contextlib.contextmanager
    def saving_stop(self) -> Iterator[None]:
        """The training loop: a stop signal now takes effect at the end of the step, with a checkpoint
        (outside it, while the run is built or evaluated, there is nothing to save: it stops at once)."""
        self._saving_stop = True
        try:
            yield
        finally:
            self._saving_stop = False


def _terminal_signals_the_group() -> bool:
    """Whether this process is the foreground job of a terminal, whose Ctrl-C reaches its children too."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def forwarded_stop_signals(pids: list[int]) -> Iterator[None]:
    """For a launcher process (``--multiprocessing-distributed``): pass the stop signals it
    receives on to its worker processes and keep waiting for them, which then stop as
    described above. A Ctrl-C typed in the terminal already reaches every process of the
    foreground job, so it is not passed on a second time (that would be an "again")."""
    def forward(number: int, _frame) -> None:
        if number == signal.SIGINT and _terminal_signals_the_group():
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield
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
        self.exit_code = 0  # the job's agreed exit status once a stop is agreed

    def _save_due(self) -> bool:
        if not self.is_main:
            return False
        by_steps = self.every_steps > 0 and self.steps_since_save >= self.every_steps
        by_time = self.every_seconds > 0 and self.clock() - self.last_save >= self.every_seconds
        return by_steps or by_time

    def after_step(self, position: EpochPosition, steps_done: int, sums: RunningSums) -> bool:
        self.steps_since_save += 1
        # The largest exit code wins: a Ctrl-C on any rank makes the whole job's status 130.
        code, save = distributed.agree([self.signals.exit_code, int(self._save_due())])
        if code or (save and steps_done < position.steps):
            self.save(position, steps_done, sums)
            self.last_save, self.steps_since_save = self.clock(), 0
        self.exit_code = code
        return bool(code)

    def epoch_saved(self) -> None:
        self.last_save, self.steps_since_save = self.clock(), 0

    def stop_requested(self) -> int:
        """The agreed exit status when any rank was signalled, else 0 (all ranks call this together)."""
        self.exit_code = distributed.agree([self.signals.exit_code])[0]
        return self.exit_code
