"""Checkpoint files: the one place that writes and reads the training state.

Writes are atomic (temporary file in the same folder, fsync, rename), so a crash or a
full disk leaves either the previous file or the new one, never a broken file.
Reads use ``weights_only=True``: a checkpoint is tensors and plain values only.
The schema is documented in docs/OUTPUTS.md.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import models

FORMAT_VERSION = 1
LAST_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform; the rename itself is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dict, with a one-line error naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(error)}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry)")
    return state


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def find_latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest readable ``checkpoint.pth.tar``/``model_best.pth.tar`` below ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for name in (LAST_NAME, BEST_NAME) for p in folder.rglob(name)),
        key=lambda p: p.stat().st_mtime, reverse=True)
    return _first_readable(candidates)


def _first_readable(candidates) -> Path | None:
    for candidate in candidates:
        try:
            load_checkpoint(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def find_resume_checkpoint(folder: str | os.PathLike) -> Path | None:
    """For ``--resume auto``: the newest valid ``checkpoint.pth.tar`` directly in ``folder``.

    ``model_best.pth.tar`` is not a resume point (it may be older than the last epoch),
    so it is only used when the last checkpoint is missing or unreadable.
    """
    folder = Path(folder)
    return _first_readable(folder / name for name in (LAST_NAME, BEST_NAME) if (folder / name).is_file())


def check_compatible(state: dict[str, Any], path: str | os.PathLike, arch: str,
                     num_classes: int) -> None:
    """Refuse a checkpoint of another architecture or class count, naming both."""
    file_arch = _canonical_arch(state.get("arch"))
    if file_arch is not None and file_arch != arch:
        raise CheckpointError(f"{path} is a checkpoint of {file_arch}, but -a is {arch}")
    file_classes = state.get("num_classes")
    if file_classes is not None and file_classes != num_classes:
        raise CheckpointError(
            f"{path} was trained for {file_classes} classes, but this run has {num_classes}")


def _canonical_arch(name: Any) -> str | None:
    """The registry's name for a checkpoint's ``arch`` entry (ModelZoo files use aliases)."""
    if not isinstance(name, str):
        return None
    try:
        return models.resolve_arch(name)
    except ValueError:
        return name
