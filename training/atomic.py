"""Writing a run's files so that a crash, a kill or a full disk never leaves a broken one.

``replace_file`` writes into a temporary file beside the target (``.<name>.<token>.tmp``),
fsyncs it and renames it over the target: readers see the old file or the new one.
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
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from models.errors import UserError

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


def _create_beside(path: Path) -> tuple[int, Path]:
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
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
    try:
        handle, temporary = _create_beside(path)
    except OSError as error:
        raise WriteError(describe_os_error(path, error)) from None
    recording = None
    try:
        with os.fdopen(handle, "wb") as stream:
            recording = _RecordingStream(stream)
            write(recording)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = error if isinstance(error, OSError) else (recording.error if recording else None)
        if cause is not None and not isinstance(error, KeyboardInterrupt):
            raise WriteError(describe_os_error(path, cause)) from None
        raise
    _fsync_directory(path.parent)
    return path


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
    is left as it was. Creates ``path``'s folder if needed.

    Raises:
        WriteError: the temporary file, or the rename, failed (an OS error naming it or ``path``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_beside(path)
        os.close(handle)
    except OSError as error:
        raise WriteError(describe_os_error(path, error)) from None
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.filename not in (None, str(temporary), str(path)):
            raise  # not the write: another file the block read
        raise WriteError(describe_os_error(path, error)) from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())
