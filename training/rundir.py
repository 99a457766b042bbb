"""The output folder of a run: who holds it, what it already holds, and whether it can be written.

A live run holds its ``--output_dir`` with a lock file, ``.run.lock``, that names the host,
the process and the start time (rank 0 holds it: only rank 0 writes). The lock itself is a
POSIX record lock on that file, which the OS drops when the process ends, however it ends:
a lock left by a dead process (``kill -9``, the worker torchrun restarts) is taken over
with a log line, a live one is refused. On file systems without record locks the file's
content decides (a dead process on this host, or an earlier attempt of the same torchrun
job, is taken over).

The folder policy (``admit``): a new run never writes over or mixes with another run's
files without an explicit choice. A fresh run into a folder that holds a run's files is
refused with the ways out (``--resume auto``, another ``--output_dir``, ``--overwrite``,
which removes only the files this project writes there, saying which). ``--resume`` of a
checkpoint of this folder continues its run; ``-e`` appends its record.

The run that holds the folder also removes the temporary files an interrupted write left
behind (only this project's names), with a log line.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import UserError
from training.atomic import describe_os_error, temporary_pattern

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# What main.py writes into its output folder (docs/OUTPUTS.md).
RUN_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.jsonl", "args.json", "curves.png")
RUN_FILE_PATTERNS = ("events.out.tfevents.*",)
TEMPORARY_PATTERNS = (*(temporary_pattern(name) for name in RUN_FILES if name != "metrics.jsonl"),
                      ".curves.png.*.png")  # the curves' temporary name in earlier versions
_NO_RECORD_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunFolderError(UserError):
    """An output folder this run may not or cannot use; the message names it and the ways out."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run folder: what the lock file says."""

    host: str
    pid: int
    started: str
    job: str | None = None  # torchrun's TORCHELASTIC_RUN_ID
    attempt: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(),
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   os.environ.get("TORCHELASTIC_RUN_ID"), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            fields: dict[str, Any] = json.loads(text)
            return cls(str(fields["host"]), int(fields["pid"]), str(fields["started"]), fields.get("job"),
                       int(fields.get("attempt") or 0))
        except (ValueError, KeyError, TypeError):
            return None

    def __str__(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def is_gone(self, me: "Holder") -> bool:
        """Whether this holder has certainly ended (used where the OS keeps no record locks)."""
        if self.job and self.job == me.job and self.attempt < me.attempt:
            return True  # torchrun stops every worker of an attempt before it starts the next
        if self.host != me.host:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return self.pid == me.pid  # a run of this same process that was not released


def _read(descriptor: int) -> str:
    os.lseek(descriptor, 0, os.SEEK_SET)
    return os.read(descriptor, 4096).decode("utf-8", "replace")


class RunFolder:
    """An output folder held by this process (``claim``) until ``release``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self._descriptor: int | None = None

    # -- holding it ----------------------------------------------------------------------------

    @classmethod
    def claim(cls, path: str | os.PathLike) -> "RunFolder":
        """Create the folder if needed, check that it can be written, hold it, tidy it."""
        folder = cls(Path(path))
        folder._create()
        folder._lock()
        folder._remove_stale_temporaries()
        return folder

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--output_dir {self.path} is a file, not a folder: give a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(describe_os_error(self.path, error, "cannot create the output folder")) from None

    def _lock(self) -> None:
        me = Holder.this_process()
        for _ in range(10):  # the file may be replaced under us by a run releasing or taking it over
            try:
                descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise RunFolderError(describe_os_error(self.path, error, "cannot write into the output folder")) \
                    from None
            try:
                previous = self._acquire(descriptor, me)
                if self._still_at_path(descriptor):
                    self._write_holder(descriptor, me)
                    break
            except BaseException:
                os.close(descriptor)
                raise
            os.close(descriptor)
        else:
            raise RunFolderError(f"{self.lock_path} keeps changing: another program is taking this folder; "
                                 f"give another --output_dir")
        self._descriptor = descriptor
        if previous is not None:
            log.info("%s: took over the lock of a run that ended without releasing it (%s)", self.path, previous)

    def _acquire(self, descriptor: int, me: Holder) -> Holder | None:
        """Hold the record lock on ``descriptor``; the holder that the file named, if any."""
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locks = True
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN, *_NO_RECORD_LOCKS):
                raise RunFolderError(describe_os_error(self.lock_path, error, "cannot lock")) from None
            locks = error.errno not in _NO_RECORD_LOCKS
            if locks:
                raise RunFolderError(self._in_use(Holder.parse(_read(descriptor)))) from None
        previous = Holder.parse(_read(descriptor))
        if not locks and previous is not None and previous != me and not previous.is_gone(me):
            raise RunFolderError(self._in_use(previous, checked=False))
        return previous

    def _in_use(self, holder: Holder | None, checked: bool = True) -> str:
        who = f" ({holder})" if holder else ""
        unsure = "" if checked else (f"; this file system keeps no locks, so if that run has ended, "
                                     f"delete {self.lock_path}")
        return (f"{self.path} is in use by another run{who}: wait for it to end, or give another "
                f"--output_dir{unsure}")

    def _still_at_path(self, descriptor: int) -> bool:
        try:
            return os.path.samestat(os.fstat(descriptor), os.stat(self.lock_path))
        except FileNotFoundError:
            return False

    def _write_holder(self, descriptor: int, me: Holder) -> None:
        text = json.dumps({"host": me.host, "pid": me.pid, "started": me.started, "job": me.job,
                           "attempt": me.attempt}) + "\n"
        try:
            os.ftruncate(descriptor, 0)
            os.lseek(descriptor, 0, os.SEEK_SET)
            os.write(descriptor, text.encode())
            os.fsync(descriptor)
        except OSError as error:
            raise RunFolderError(describe_os_error(self.lock_path, error)) from None

    def release(self) -> None:
        """Let the folder go (the lock file is removed; closing it drops the lock)."""
        if self._descriptor is None:
            return
        try:
            if self._still_at_path(self._descriptor):
                self.lock_path.unlink()
        except OSError:
            pass  # the folder became unwritable: the OS still drops the lock below
        os.close(self._descriptor)
        self._descriptor = None

    def warn_if_short_of_space(self, checkpoint_bytes: int) -> None:
        """A warning at start when the folder's file system cannot take this run's checkpoints
        (``checkpoint.pth.tar`` and ``model_best.pth.tar``, each written beside the old one)."""
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        held = sum(path.stat().st_size for path in self.run_files() if path.name in RUN_FILES[:2])
        if free + held < 3 * checkpoint_bytes:
            log.warning("warning: %s has %.2f GiB free, and a checkpoint of this run takes about %.2f GiB (two "
                        "files, each written beside the previous one): the run will stop when a save fails",
                        self.path, free / 2**30, checkpoint_bytes / 2**30)

    def _remove_stale_temporaries(self) -> None:
        stale = sorted({path for pattern in TEMPORARY_PATTERNS for path in self.path.glob(pattern) if path.is_file()})
        removed = []
        for path in stale:
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            removed.append(f"{path.name} ({size / 2**20:.0f} MB)")
        if removed:
            log.info("removed the temporary file(s) of an interrupted write from %s: %s", self.path,
                     ", ".join(removed))

    # -- what it holds -------------------------------------------------------------------------

    def run_files(self) -> list[Path]:
        """The files a run of this project wrote here."""
        found = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        for pattern in RUN_FILE_PATTERNS:
            found.extend(sorted(self.path.glob(pattern)))
        return found

    def holds_checkpoint(self) -> bool:
        return any(path.name in RUN_FILES[:2] for path in self.run_files())

    def contains(self, path: str | os.PathLike) -> bool:
        path = Path(path)
        try:
            return path.parent.exists() and os.path.samefile(path.parent, self.path)
        except OSError:
            return False


def admit(folder: RunFolder, *, resume: Path | None, auto: bool, evaluate: bool, overwrite: bool) -> None:
    """The folder policy for a run that holds ``folder`` (rank 0, before anything is written).

    Args:
        resume: the checkpoint ``--resume`` names (explicit or found by ``auto``), if any.
        auto: ``--resume auto``: the folder's own run continues (or starts, with no checkpoint file).
        evaluate: ``-e``: only appends its record to ``metrics.jsonl``.
        overwrite: ``--overwrite``: remove this project's files from the folder first.
    """
    continuing = resume is not None and folder.contains(resume)
    if overwrite and continuing:
        raise RunFolderError(f"--overwrite would remove {resume}, the checkpoint --resume names: leave out "
                             f"--overwrite to continue that run")
    if evaluate or auto or continuing:
        return
    found = folder.run_files()
    if not found:
        return
    names = ", ".join(path.name for path in found)
    if overwrite:
        for path in found:
            try:
                path.unlink()
            except OSError as error:
                raise RunFolderError(describe_os_error(path, error, "--overwrite: cannot remove")) from None
        kept = sorted(path.name for path in folder.path.iterdir() if path.name != LOCK_NAME)
        log.info("--overwrite: removed %s from %s%s", names, folder.path,
                 f" (kept what this project does not write: {', '.join(kept)})" if kept else "")
        return
    raise RunFolderError(f"{folder.path} already holds a run ({names}): continue it with --resume auto, write to "
                         f"another --output_dir, or replace it with --overwrite (removes those files only)")
