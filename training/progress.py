"""Progress of long steps: a tqdm bar (percentage, rate, ETA) on a terminal, log lines elsewhere.

A bar is for someone watching a terminal. Log files and the ModelZoo scripts, whose parsers
read the per-step lines (``Epoch: [e][s/n] ... Loss ...``, docs/OUTPUTS.md), get those lines
instead, at the print steps. ``--progress`` chooses: ``auto`` (a bar when stdout is a
terminal), ``bar`` or ``lines``; ``configure`` sets the process's choice once at start, as
logging is set up once.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from models.errors import UserError

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines")


@dataclass(frozen=True)
class Display:
    """How this process shows progress: ``mode`` (auto, bar, lines) and whether it shows any
    (only rank 0 does in a distributed job)."""

    mode: str = "auto"
    enabled: bool = True

    def shows_bars(self) -> bool:
        if not self.enabled or self.mode == "lines":
            return False
        return self.mode == "bar" or _stdout_is_terminal()


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


QUIET = Display("lines", enabled=False)  # for work that shows no progress at all
_display = Display()
FALLBACK_COLUMNS = 100


def _width() -> dict[str, Any]:
    """Follow the terminal's width; a fixed one where it reports none (a pseudo-terminal of size
    0, or stdout redirected with ``--progress bar``), where tqdm would draw an empty bar."""
    try:
        if os.get_terminal_size(sys.stdout.fileno()).columns > 0:
            return {"dynamic_ncols": True}
    except (AttributeError, OSError, ValueError):
        pass
    return {"ncols": FALLBACK_COLUMNS}


def configure(mode: str, enabled: bool) -> None:
    """Set this process's display (main.py: ``--progress``, rank 0 only)."""
    global _display
    _display = Display(mode, enabled)


# What a program that was killed by SIGPIPE exits with (128 + 13): ``demo.py | head`` ends so.
BROKEN_PIPE_EXIT_CODE = 141


def silence(stream: Any = None) -> bool:
    """Point ``stream``'s file descriptor (stdout's by default) at the null device, after its
    reader went away: what is printed later, and the interpreter's flush at exit, go nowhere
    instead of failing. Whether it could (a stream without a descriptor cannot)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, (stream or sys.stdout).fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def tool_status(action: Callable[[], Any]) -> int:
    """Run a command-line tool's ``action`` (demo.py, pthtar2onnx.py) and return its exit status:
    0, 1 with one ``error:`` line for a ``UserError``, ``BROKEN_PIPE_EXIT_CODE`` quietly when its
    reader went away (``| head``), 130 with one line on Ctrl-C (files are replaced atomically, so
    nothing half-written is left). A bug keeps its traceback."""
    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        silence()
        return BROKEN_PIPE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class ConsoleHandler(logging.StreamHandler):
    """The log's console handler: a record is written above an open bar, never into its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except BrokenPipeError:
            self._reader_gone()
        except Exception:  # logging's own policy: report through handleError, never raise
            self.handleError(record)

    def _reader_gone(self) -> None:
        """The console's reader went away (``main.py | head``). The run goes on (its figures are in
        metrics.jsonl); what it prints from now on goes to the null device, as Python's docs advise
        for a broken pipe, so that neither this handler nor the interpreter's exit reports it again."""
        if not silence(self.stream):
            self.setStream(open(os.devnull, "w"))  # noqa: SIM115 (kept for the process's life)
        try:
            print("warning: the console's reader went away (broken pipe): the run goes on, its log lines go "
                  "nowhere now; metrics.jsonl has its figures", file=sys.stderr, flush=True)
        except OSError:
            pass


class Progress:
    """One task's progress: a bar advanced every step, or the caller's lines at its print steps.

    Log records reach the console through ``ConsoleHandler`` (``training.metrics.setup_logging``),
    which keeps them off the bar's line.
    """

    def __init__(self, total: int | None, description: str, unit: str = "step", display: Display | None = None,
                 done: int = 0):
        """``done``: units already done before this process started (a resumed epoch), left out of the rate."""
        display = display or _display
        self._bar: tqdm | None = None
        self.enabled = display.enabled
        if display.shows_bars():
            self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stdout, leave=True, initial=done,
                             **_width())

    @property
    def shows_bar(self) -> bool:
        return self._bar is not None

    def advance(self, count: int = 1) -> None:
        """``count`` more units done (host-side only: no device synchronisation)."""
        if self._bar is not None:
            self._bar.update(count)

    def report(self, line: str, **figures: Any) -> None:
        """A print step: ``line`` goes to the log without a bar; with one, ``figures`` go next to it."""
        if self._bar is not None:
            self._bar.set_postfix(figures, refresh=False)
        elif self.enabled:
            log.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
