"""Writing a run's files so that a crash, a kill or a full disk never leaves a broken one.

``replace_file`` writes into a temporary file beside the target
(``.<name>.<host>-<pid>.<token>.tmp``; a later write removes those of a killed process),
fsyncs it and renames it over the target: readers see the old file or the new one. A
target that exists but is not a regular file (``/dev/stdout``, ``/dev/null``, a named pipe) is
written in place, as ``open`` would: renaming over it would replace the device or the pipe
itself. A symbolic link to a regular file is replaced itself by ``replace_file`` (a run's own
files: a link never lets a run overwrite another run's checkpoint) and followed by
``replacing`` (an output the user named: the file the link names is replaced, the link kept).
``replacing`` does the same for writers that want a file name rather than a stream (the
ONNX exporter, the csv module), and lets the caller check the file before it is renamed. The
temporary file is created with mode 0666 less the umask, as any file the user creates, so
a team sharing the folder can read the result (``tempfile.mkstemp`` would give 0600).
Every OS error becomes a ``WriteError`` naming the path and the OS's reason; the old file
is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from models.errors import UserError

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"


class WriteError(UserError):
    """A file the run cannot write (full disk, no permission, read-only file system...)."""


def temporary_pattern(name: str) -> str:
    """The glob of ``replace_file``'s temporary files for a file called ``name``."""
    return f".{name}.*{TEMPORARY_SUFFIX}"


def describe_os_error(path: Path | str, error: OSError, doing: str = "cannot write") -> str:
    """``cannot write PATH: <the OS's reason>`` (one line)."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space, or write elsewhere)"
    return f"{doing} {path}: {reason}"


class _RecordingStream:
    """Passes writes to ``stream`` and keeps the OS error a write raised: torch.save reports
    a failed write as an unrelated ``RuntimeError`` from its zip writer."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)  # tell, seek...: what other writers may ask for


def _writer_tag() -> str:
    """Who writes a temporary file: this host and process (``<host>-<pid>``)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_writers_files(path: Path) -> None:
    """Remove the temporary files of ``path`` that a killed process of this host left (``kill -9``
    in the middle of a write: an ONNX file or a checkpoint is tens of MB). Those of live processes,
    and of other hosts sharing the folder, stay."""
    host = socket.gethostname()
    for temporary in path.parent.glob(temporary_pattern(glob.escape(path.name))):
        writer = temporary.name[len(path.name) + 2:-len(TEMPORARY_SUFFIX)].rsplit(".", 1)[0]
        writer_host, _, pid = writer.rpartition("-")
        if writer_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            temporary.unlink()
            log.info("removed %s, the temporary file of an interrupted write", temporary)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _create_beside(path: Path) -> tuple[int, Path]:
    _remove_dead_writers_files(path)
    while True:
        temporary = path.parent / f".{path.name}.{_writer_tag()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        try:
            # 0o666: the umask decides, as for any new file.
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically with ``write(stream)``; returns the path.

    Raises:
        WriteError: the file could not be written; ``path`` is unchanged.
    """
    path = Path(path)
    target, replaceable = _where_to_write(path, follow_link=False)
    if not replaceable:
        _write_in_place(path, write)
        return path
    try:
        handle, temporary = _create_beside(target)
    except OSError as error:
        raise WriteError(describe_os_error(path, error)) from None
    recording = None
    try:
        with os.fdopen(handle, "wb") as stream:
            recording = _RecordingStream(stream)
            write(recording)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _raise_as_write_error(path, error, recording)
        raise
    _fsync_directory(target.parent)
    return path


def _where_to_write(path: Path, follow_link: bool) -> tuple[Path, bool]:
    """The file a rename would replace (a link's target with ``follow_link``), and whether it
    may be replaced by a rename: not when it exists and is not a regular file."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)  # through links, /dev/stdout's to a pipe too
    except OSError:  # not there yet (or not reachable: creating the temporary file will say why)
        regular = True
    return (Path(os.path.realpath(path)) if regular and follow_link else path), regular


def _write_in_place(path: Path, write: Callable[[BinaryIO], None]) -> None:
    recording = None
    try:
        with open(path, "wb") as stream:
            recording = _RecordingStream(stream)
            write(recording)
    except BaseException as error:
        _raise_as_write_error(path, error, recording)
        raise


def _raise_as_write_error(path: Path, error: BaseException, recording: _RecordingStream | None) -> None:
    """Raise ``WriteError`` when ``error`` comes from the OS (directly, or through a writer that
    reported a failed write as something else); return otherwise."""
    cause = error if isinstance(error, OSError) else (recording.error if recording else None)
    if cause is not None and not isinstance(error, KeyboardInterrupt):
        raise WriteError(describe_os_error(path, cause)) from None


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (and check); when the block ends without
    an exception, the file is flushed and renamed over ``path``, otherwise removed, and ``path``
    is left as it was. Creates ``path``'s folder if needed. A symbolic link is followed, and a
    target that is not a regular file is yielded itself, to be written in place (module docstring).

    Raises:
        WriteError: the temporary file, or the rename, failed (an OS error naming it or ``path``).
    """
    path = Path(path)
    target, replaceable = _where_to_write(path, follow_link=True)
    if not replaceable:
        with _os_errors_as_write_errors(path, path):
            yield path
        return
    with _os_errors_as_write_errors(path, path):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_beside(target)
        os.close(handle)
    try:
        with _os_errors_as_write_errors(path, temporary, target):
            yield temporary
            _fsync_file(temporary)
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(target.parent)


@contextlib.contextmanager
def _os_errors_as_write_errors(path: Path, *written: Path) -> Iterator[None]:
    """An OS error about one of the ``written`` files (or about none) becomes a ``WriteError``
    naming ``path``; one about another file the block read stays what it is."""
    try:
        yield
    except OSError as error:
        if error.filename not in (None, *map(str, written)):
            raise
        raise WriteError(describe_os_error(path, error)) from None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())
