"""Checkpoint files: atomic writes, safe reads, and finding the right one.

Writes are atomic (temporary file in the same folder, fsync, rename), so a crash, a kill
or a full disk leaves either the previous file or the new one, never a broken file.
Reads use ``weights_only=True``: a checkpoint is tensors and plain values only.
What a checkpoint holds is ``training.state.TrainingState``'s business (docs/OUTPUTS.md).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from models.errors import UserError

FORMAT_VERSION = 2
LAST_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


class CheckpointError(UserError):
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


def _first_readable(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        try:
            load_checkpoint(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def find_resume_checkpoint(folder: str | os.PathLike) -> Path | None:
    """For ``--resume auto``: the valid ``checkpoint.pth.tar`` directly in ``folder``.

    ``model_best.pth.tar`` is not a resume point (it may be older than the last one), so it
    is only used when the last checkpoint is missing or unreadable.
    """
    folder = Path(folder)
    return _first_readable(folder / name for name in (LAST_NAME, BEST_NAME) if (folder / name).is_file())


def default_search_roots(repo_dir: Path) -> list[Path]:
    """Where main.py and the test/ scripts write by default: ``./output``, ``<repo>/output``,
    ``<repo>/test/output`` and ``$TEST_OUTPUT_DIR``."""
    roots = [Path("output"), repo_dir / "output", repo_dir / "test" / "output"]
    if os.environ.get("TEST_OUTPUT_DIR"):
        roots.append(Path(os.environ["TEST_OUTPUT_DIR"]))
    return roots


def find_newest_run_checkpoint(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The checkpoint to use after training, for the demo and the export.

    Among the run folders below ``roots`` (a folder holding ``checkpoint.pth.tar`` or
    ``model_best.pth.tar``), the one written last; in it, its best model if readable, else
    its last checkpoint.
    """
    runs: dict[Path, float] = {}
    for root in {Path(root).resolve() for root in roots if Path(root).is_dir()}:
        for name in (LAST_NAME, BEST_NAME):
            for found in root.rglob(name):
                runs[found.parent] = max(runs.get(found.parent, 0.0), found.stat().st_mtime)
    for run in sorted(runs, key=runs.__getitem__, reverse=True):
        chosen = _first_readable(run / name for name in (BEST_NAME, LAST_NAME) if (run / name).is_file())
        if chosen is not None:
            return chosen
    return None


def checkpoint_for_inference(given: str | os.PathLike | None, repo_dir: Path) -> Path:
    """``given``, else the newest checkpoint main.py or a test/ script wrote (demo, export)."""
    if given is not None:
        return Path(given)
    roots = default_search_roots(repo_dir)
    found = find_newest_run_checkpoint(roots)
    if found is None:
        raise CheckpointError(f"no checkpoint found under {', '.join(str(root) for root in roots)}; train one "
                              f"first (bash quickstart.sh), or give --checkpoint FILE")
    return found
