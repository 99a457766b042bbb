"""Replacing a user's output file atomically: write a temporary file beside it, rename it into
place only when it is complete (and checked), so a crash, a full disk or a failed check leaves
the previous file as it was and no partial file behind.

The temporary file is created with mode 0o666 minus the umask, as ``open(path, "w")`` would
create the file itself (``tempfile.mkstemp`` would give 0o600, and the rename would keep it).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an
    exception it replaces ``path`` (flushed to disk first), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_beside(path)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _create_beside(path: Path) -> Path:
    while True:
        # The suffix keeps the real one last: writers that pick a format from it still see it.
        candidate = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return candidate


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())
