"""Storage that fails for real: a full disk and a folder that cannot be written.

As root (CI, this machine) both are small tmpfs mounts: a full one gives ENOSPC, a
read-only one EROFS; root ignores permission bits, so a ``chmod`` would prove nothing.
Without root (or without the right to mount), a full disk is ``RLIMIT_FSIZE`` in the child
process (SIGXFSZ ignored, so the write fails with EFBIG); without root an unwritable folder
is a ``chmod 555`` one (EACCES).
"""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator

AS_ROOT = os.geteuid() == 0


def _mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True,
                   capture_output=True, text=True)


def _try_mount_tmpfs(target: Path, options: str) -> bool:
    """A container without the right to mount falls back to the file-size limit."""
    try:
        _mount_tmpfs(target, options)
    except subprocess.CalledProcessError:
        return False
    return True


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def full_disk(folder: Path, holds: int, free: int) -> Iterator[Callable[[], None] | None]:
    """``folder``, made to hold ``holds`` bytes of files the test puts there, with only about
    ``free`` bytes more for what a child process writes.

    Yields the ``preexec_fn`` the child must run (no file larger than ``free``), or None when
    the folder is a tmpfs of ``holds + free`` bytes (root).
    """
    if AS_ROOT and _try_mount_tmpfs(folder, f"size={holds + free},mode=0755"):
        try:
            yield None
        finally:
            _unmount(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (free, free))

    yield limit_file_size


@contextlib.contextmanager
def unwritable_folder(folder: Path) -> Iterator[Path]:
    """An existing, empty folder no file can be created in."""
    if AS_ROOT:
        _mount_tmpfs(folder, "ro,size=1m")
        try:
            yield folder
        finally:
            _unmount(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
