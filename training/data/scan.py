"""Finding the images of an ImageFolder split, once per job.

``scan_imagefolder`` walks ``<split>/<class>/**/<image>``. The rules that keep a data set honest:

* names that start with ``.`` are not images nor classes (hidden files, macOS ``._*`` files,
  ``.ipynb_checkpoints``);
* symbolic links to files are followed; a linked folder is followed once: a folder already
  walked (a link back into the class, a second link to the same place) is not walked again,
  so every image is counted once; a linked folder that leads out of the class folder's real
  tree (``ln -s .. up``) is refused with the link named, since its images would be counted
  under this class and often again under their own;
* two class folders that are one real folder (a linked class folder) are refused;
* a folder that cannot be read is an error naming it, never a class "without images".

``index_for_job`` gives every rank the same ``FolderIndex`` at the cost of one scan per job:
rank 0 reuses the cached index of an unchanged tree or scans (and caches), then broadcasts it.
The cache lives outside the data folder (which may be read-only), and is reused only while
the modification time of every folder of the tree is what it was: adding, removing or
renaming a file changes its folder's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import UserError
from training import distributed
from training.atomic import WriteError, replace_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
INDEX_FORMAT = 1
# A folder changed this recently may change again within its file system's timestamp
# granularity (1-2 s on some), unseen: such a tree is scanned but its index not cached.
RACY_SECONDS = 2.0


class DatasetError(UserError):
    """A dataset folder or image that cannot be used; the message names the path."""


@dataclass
class FolderIndex:
    """What a scan finds: class names (sorted) and ``(path, label)`` samples in sorted path order.

    ``folders`` maps every folder walked to its modification time (ns), the cache's proof
    that the tree has not changed.
    """

    classes: list[str]
    samples: list[tuple[str, int]]
    folders: dict[str, int] = field(default_factory=dict)


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _unreadable(path: str | os.PathLike, error: OSError) -> DatasetError:
    return DatasetError(f"cannot read folder {path}: {error.strerror or error} (check its permissions)")


def _class_names(root: Path) -> list[str]:
    try:
        with os.scandir(root) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise _unreadable(root, error) from None


def _walk_class(folder: Path, folders: dict[str, int]) -> list[str]:
    """The image paths under one class folder (see the module's rules), sorted."""
    real_top = os.path.realpath(folder)
    visited: set[str] = set()
    found: list[str] = []

    def refuse(error: OSError) -> None:
        raise _unreadable(error.filename or folder, error)

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=refuse):
        real = os.path.realpath(dirpath)
        if real in visited:  # a second way into a folder already walked: its images are counted
            dirnames[:] = []
            continue
        if real != real_top and not real.startswith(real_top + os.sep):
            raise DatasetError(f"the symbolic link {dirpath} leads out of its class folder {folder} (to {real}): "
                               f"its images would be counted under the wrong class; remove the link or "
                               f"replace it with the images")
        visited.add(real)
        folders[dirpath] = os.stat(dirpath).st_mtime_ns
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, name) for name in filenames if is_image(name))
    return sorted(found)


def _refuse_shared_class_folders(root: Path, classes: list[str]) -> None:
    """Two class names for one real folder (a linked class folder) would label its images twice."""
    seen: dict[str, str] = {}
    for name in classes:
        real = os.path.realpath(root / name)
        if real in seen:
            raise DatasetError(f"class folders {root / seen[real]} and {root / name} are the same folder ({real}): "
                               f"its images would be counted under both classes")
        seen[real] = name


def scan_imagefolder(root: str | os.PathLike) -> FolderIndex:
    """Classes (sorted sub-folder names, hidden ones skipped) and ``(path, label)`` samples of
    ``root/<class>/**/<image>``, in sorted path order per class, like torchvision's ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data path not found: {root}")
    classes = _class_names(root)
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    folders = {str(root): os.stat(root).st_mtime_ns}
    _refuse_shared_class_folders(root, classes)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = _walk_class(root / name, folders)
        if not found:
            raise DatasetError(f"class folder has no images: {root / name} "
                               f"(extensions: {' '.join(IMAGE_EXTENSIONS)}; names starting with '.' are skipped)")
        samples.extend((path, label) for path in found)
    return FolderIndex(classes, samples, folders)


# -- the cached index -------------------------------------------------------------------------

def index_cache_file(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where the index of the split at ``root`` is cached (one file per real path)."""
    key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
    return Path(cache_dir) / "scans" / f"{key}.json"


def _unchanged(folders: dict[str, int]) -> bool:
    try:
        return all(os.stat(path).st_mtime_ns == mtime for path, mtime in folders.items())
    except OSError:
        return False


def load_cached_index(root: str | os.PathLike, cache_dir: str | os.PathLike) -> FolderIndex | None:
    """The cached index of ``root`` if its tree is unchanged since, else None."""
    path = index_cache_file(root, cache_dir)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("format") != INDEX_FORMAT or saved.get("root") != str(root):
        return None
    try:
        folders, classes, files = dict(saved["folders"]), list(saved["classes"]), list(saved["files"])
        if len(files) != len(classes) or not _unchanged(folders):
            return None
        prefix = str(root) + os.sep
        samples = [(prefix + relative, label) for label, names in enumerate(files) for relative in names]
    except (KeyError, TypeError, ValueError):  # a damaged cache file costs a scan
        return None
    return FolderIndex(classes, samples, folders)


def save_index(index: FolderIndex, root: str | os.PathLike, cache_dir: str | os.PathLike,
               scanned_at_ns: int) -> bool:
    """Cache ``index`` unless a folder changed too recently to be trusted; whether it did."""
    if any(mtime >= scanned_at_ns - RACY_SECONDS * 1e9 for mtime in index.folders.values()):
        return False
    prefix = len(str(root)) + 1
    files: list[list[str]] = [[] for _ in index.classes]
    for path, label in index.samples:
        files[label].append(path[prefix:])
    payload = {"format": INDEX_FORMAT, "root": str(root), "classes": index.classes, "files": files,
               "folders": index.folders}
    target = index_cache_file(root, cache_dir)
    text = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_file(target, lambda stream: stream.write(text))
    except OSError as error:
        log.info("note: the scan of %s is not cached (%s: %s)", root, target, error.strerror or error)
        return False
    except WriteError as error:  # a cache that cannot be written costs a scan next time, nothing more
        log.info("note: the scan of %s is not cached (%s)", root, error)
        return False
    return True


def cached_scan(root: str | os.PathLike, cache_dir: str | os.PathLike | None) -> FolderIndex:
    """``root``'s index: the cached one while the tree is unchanged, else a new scan (cached)."""
    root = Path(root).absolute()
    if cache_dir is None:
        return scan_imagefolder(root)
    cached = load_cached_index(root, cache_dir)
    if cached is not None:
        return cached
    started = time.time_ns()
    index = scan_imagefolder(root)
    save_index(index, root, cache_dir, started)
    return index


def index_for_job(root: str | os.PathLike, cache_dir: str | os.PathLike | None, is_main: bool) -> FolderIndex:
    """The same index on every rank, from one scan (or cache read) on rank 0.

    A DatasetError on rank 0 reaches every rank, so the job stops with the same one line.
    """
    result: FolderIndex | DatasetError | None = None
    if is_main:
        try:
            result = cached_scan(root, cache_dir)
        except DatasetError as error:
            result = error
    result = distributed.broadcast_object(result)
    if isinstance(result, DatasetError):
        raise result
    return result
