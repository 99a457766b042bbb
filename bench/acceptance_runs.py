"""Running the entry points for ``bench/acceptance.py``: processes with a console log each,
a few at a time, each after the runs it needs, killed on purpose or after a timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.01


@dataclass
class Run:
    """One process (tree) to run: its command, console log, and output folder."""

    name: str
    command: list[str]
    log: Path
    output_dir: Path
    after: tuple[str, ...] = ()  # runs that must have finished first
    kill_when: Callable[[], bool] | None = None  # SIGKILL the process tree as soon as this holds
    inspect: Callable[[], Any] | None = None  # read its files right after it ends, before another run changes them


@dataclass
class Outcome:
    code: int | None  # None: killed (on purpose, or after the timeout)
    output: str
    seconds: float
    killed: bool = False
    timed_out: bool = False
    inspected: Any = None


def execute(run: Run, timeout: float, threads: int | None = None) -> Outcome:
    """Run ``run.command`` in the repository root (``threads``: its OMP_NUM_THREADS)."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    killed = timed_out = False
    with run.log.open("w", encoding="utf-8") as stream:
        # A session of its own: a kill reaches main.py's DataLoader workers and torchrun's children.
        process = subprocess.Popen(run.command, cwd=REPO, env=environment, stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None:
            killed = run.kill_when is not None and run.kill_when()
            timed_out = time.perf_counter() - started > timeout
            if killed or timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    output = run.log.read_text(encoding="utf-8", errors="replace")
    inspected = run.inspect() if run.inspect is not None else None
    return Outcome(None if killed or timed_out else process.returncode, output, seconds, killed, timed_out, inspected)


def execute_all(runs: list[Run], jobs: int, timeout: float, threads: int | None = None,
                on_finish: Callable[[Run, Outcome], None] = lambda run, outcome: None) -> dict[str, Outcome]:
    """Run everything, ``jobs`` processes at a time, each as soon as the runs it needs have
    finished; runs that others wait for start first."""
    awaited = {name for run in runs for name in run.after}
    unknown = awaited - {run.name for run in runs}
    if unknown:
        raise ValueError(f"runs wait for runs that are not planned: {sorted(unknown)}")
    waiting = sorted(runs, key=lambda run: run.name not in awaited)
    outcomes: dict[str, Outcome] = {}
    running: dict[Future, Run] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while waiting or running:
            for run in [run for run in waiting if all(name in outcomes for name in run.after)]:
                waiting.remove(run)
                running[pool.submit(execute, run, timeout, threads)] = run
            if not running:
                raise ValueError(f"runs that wait for each other: {[run.name for run in waiting]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                outcomes[run.name] = future.result()
                on_finish(run, outcomes[run.name])
    return outcomes


def failure_line(outcome: Outcome, timeout: float) -> str:
    """Why a run failed, in one line: its last ``error:`` line, else its last line (a traceback's)."""
    if outcome.timed_out:
        return f"still running after {timeout:.0f}s (hung?)"
    lines = [line.strip() for line in outcome.output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit status {outcome.code}: {last}"
