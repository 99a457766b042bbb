"""Running main.py and the launchers as real processes: start, wait for a log line, finish, kill."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

LAUNCH_TIMEOUT = 300  # seconds; a launch normally takes 15-60 s on two busy cores


def launch(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``command`` in the repository root, stdout and stderr to ``log``."""
    return launch_with(command, log, **env)


def launch_with(command: list[str], log: Path, preexec_fn=None, **env: str) -> subprocess.Popen:
    """``launch``, running ``preexec_fn`` in the child first (a umask, a resource limit...)."""
    # Several processes share two cores: one intra-op thread each avoids oversubscription.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    with log.open("w") as stream:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=stream, stderr=subprocess.STDOUT,
                                preexec_fn=preexec_fn)


def main_command(*args: object) -> list[str]:
    return [sys.executable, "main.py", *[str(a) for a in args]]


def finish(process: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> str:
    """Wait for ``process`` (killing it after ``timeout``) and return its output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"still running after {timeout}s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def run_to_end(command: list[str], log: Path, **env: str) -> tuple[int, str]:
    process = launch(command, log, **env)
    output = finish(process, log)
    return process.returncode, output


def kill_tree(process: subprocess.Popen) -> None:
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.kill()
    process.wait()


def wait_until(found, what: str, process: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT):
    """Poll ``found()`` until it returns something while ``process`` runs; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        result = found()
        if result:
            return result
        if process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_tree(process)
            pytest.fail(f"no {what} within {timeout}s")
        time.sleep(0.02)


def wait_for_line(pattern: str, process: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> str:
    """Wait until a line of ``log`` matches ``pattern`` while ``process`` runs; returns the line."""
    expression = re.compile(pattern)

    def matching_line() -> str | None:
        return next((line for line in log.read_text().splitlines() if expression.search(line)), None)

    return wait_until(matching_line, f"a line matching {pattern!r}", process, log, timeout)


def wait_for_file(path: Path, process: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Wait until ``path`` exists while ``process`` runs."""
    wait_until(path.exists, f"{path.name}", process, log, timeout)


def run_together(commands: list[list[str]], logs: list[Path]) -> list[tuple[int, str]]:
    """Start every command at once (the processes of one job); their exit codes and outputs."""
    processes = [launch(command, log) for command, log in zip(commands, logs)]
    outputs = [finish(process, log) for process, log in zip(processes, logs)]
    return [(process.returncode, output) for process, output in zip(processes, outputs)]


def worker_of(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of global ``rank`` among the launcher's descendants."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:  # exited meanwhile, or not readable
            continue
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def run_in_terminal(command: list[str], timeout: float = LAUNCH_TIMEOUT, columns: int = 120) -> tuple[int, str]:
    """Run ``command`` in the repository root with stdout and stderr on a pseudo-terminal of
    ``columns`` columns, as someone at a terminal would; its exit code and everything it printed."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([main], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                kill_tree(process)
                pytest.fail(f"still running after {timeout}s:\n{b''.join(chunks).decode(errors='replace')[-4000:]}")
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(main)
    return process.returncode, b"".join(chunks).decode(errors="replace")
