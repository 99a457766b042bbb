"""The sharded format: an ImageFolder packed into litdata chunk files, read from a folder or a bucket.

A converted data set (``shard_dataset.py``) is a folder or an object-store prefix
(``s3://``, ``gs://``, ...) holding::

    shards.json    the class list, the image counts and the training order's seed (written last:
                   a destination without it is a conversion that did not finish)
    train/         litdata chunks of {index, label, image}: the original file's bytes, never
    val/           re-encoded; training images in a seeded shuffled order, validation in order

litdata (imported only when this format is used) stores and reads the chunks: in place from a
folder, or item by item with ranged reads from an object store, through a cache folder of
this run that holds the index only. Which samples a rank reads, in which order and with which
augmentation stays with ``training.data.sampling``, by ImageFolder index (each record keeps
its own): equal batches per rank, exact validation, a resume at the same step, and the same
tensor for the same sample and seed as the ImageFolder it came from.
"""
from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from PIL import Image

from models.errors import UserError
from training.data.imagefolder import DecodingDataset, Transforms, check_same_classes, find_split_dirs
from training.data.scan import DatasetError, FolderIndex, scan_imagefolder
from training.seeding import derive_seed

log = logging.getLogger(__name__)

LITDATA_VERSION = "0.2.76"  # the version requirements-dev.txt pins; its defaults change between releases
FORMAT_NAME = "inception-xception-shards"
FORMAT_VERSION = 1
METADATA_NAME = "shards.json"
SPLITS = ("train", "val")
REMOTE_SCHEMES = ("s3://", "gs://", "azure://", "r2://")
DEFAULT_CHUNK_BYTES = "64MB"
ORDER = 0x5A4D  # the stream of ``derive_seed`` that shuffles the stored training order


class ShardError(UserError):
    """A sharded data set that cannot be written or read; the message names it."""


def litdata():
    """The litdata module, or a ShardError saying how to install it."""
    try:
        import litdata as module
    except ImportError:
        raise ShardError(f"the sharded data format needs litdata: pip install litdata=={LITDATA_VERSION}") from None
    return module


def is_remote(location: str) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def is_shard_dataset(location: str | os.PathLike) -> bool:
    """Whether ``--data`` names a sharded data set (an object-store URL, or a folder with shards.json)."""
    return is_remote(str(location)) or (Path(location) / METADATA_NAME).is_file()


def _join(location: str, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names]) if is_remote(location) else str(Path(location, *names))


def _fs(location: str):
    """litdata's file-system provider for an object-store URL."""
    litdata()
    from litdata.streaming.fs_provider import _get_fs_provider  # pinned version: a stable internal

    try:
        return _get_fs_provider(location)
    except ValueError as error:
        raise ShardError(f"{location}: {error}") from None


def training_order(count: int, seed: int) -> list[int]:
    """The stored order of the training images: position -> ImageFolder index."""
    generator = torch.Generator().manual_seed(derive_seed(seed, ORDER))
    return torch.randperm(count, generator=generator).tolist()


# -- metadata -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardMetadata:
    classes: list[str]
    images: dict[str, int]
    order_seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": self.classes, "images": self.images,
                "order_seed": self.order_seed, "litdata": LITDATA_VERSION}

    @classmethod
    def from_dict(cls, saved: Any, source: str) -> ShardMetadata:
        if not isinstance(saved, dict) or saved.get("format") != FORMAT_NAME:
            raise ShardError(f"{source} is not a {METADATA_NAME} written by shard_dataset.py")
        if saved.get("version") != FORMAT_VERSION:
            raise ShardError(f"{source} has format version {saved.get('version')!r}; this code reads version "
                             f"{FORMAT_VERSION}: convert the data set again with this shard_dataset.py")
        return cls(list(saved["classes"]), {split: int(saved["images"][split]) for split in SPLITS},
                   int(saved["order_seed"]))


def _download_text(source: str, location: str) -> str:
    with tempfile.TemporaryDirectory(prefix="shards-") as scratch:
        local = Path(scratch) / METADATA_NAME
        try:
            _fs(location).download_file(source, str(local))
        except ShardError:
            raise
        except Exception as error:  # the providers raise their SDK's own errors
            raise ShardError(f"cannot read {source}: {error} (a data set converted by shard_dataset.py? "
                             f"for an S3-compatible store set AWS_ENDPOINT_URL)") from None
        return local.read_text()


def read_metadata(location: str) -> ShardMetadata:
    """``location``'s shards.json."""
    source = _join(location, METADATA_NAME)
    if is_remote(location):
        text = _download_text(source, location)
    else:
        try:
            text = Path(source).read_text()
        except OSError as error:
            raise ShardError(f"cannot read {source}: {error.strerror or error}") from None
    try:
        return ShardMetadata.from_dict(json.loads(text), source)
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{source} is damaged: {error}") from None


# -- reading --------------------------------------------------------------------------------------

class ShardDataset(DecodingDataset):
    """One split of a sharded data set, by ImageFolder index: decoded exactly as ``ImageFolderDataset``.

    The litdata reader is opened lazily in each process that reads (each DataLoader worker
    gets its own, with its own connections).
    """

    def __init__(self, location: str, split: str, metadata: ShardMetadata, transform: Callable[[Image.Image], Any],
                 strict: bool = False, cache_dir: str | None = None) -> None:
        self.location = _join(location, split)
        self.transform = transform
        self.strict = strict
        self.classes = metadata.classes
        self.count = metadata.images[split]
        self.cache_dir = cache_dir
        order = training_order(self.count, metadata.order_seed) if split == "train" else None
        self.positions = _inverse(order) if order is not None else None
        self._reader: Any = None
        self._reader_pid: int | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_reader_pid": None}

    def _stream(self) -> Any:
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = litdata().StreamingDataset(self.location, cache_dir=self.cache_dir)
            self._reader_pid = os.getpid()
        return self._reader

    def record(self, index: int) -> dict[str, Any]:
        position = self.positions[index] if self.positions is not None else index
        record = self._stream()[position]
        if record["index"] != index:
            raise ShardError(f"{self.location} is damaged: position {position} holds image {record['index']}, "
                             f"not {index}")
        return record

    def name(self, index: int) -> str:
        return f"{self.location} image {index}"

    def open_image(self, index: int) -> tuple[Image.Image, int]:
        record = self.record(index)
        return Image.open(io.BytesIO(bytes(record["image"]))), int(record["label"])

    def where(self) -> str:
        return f"at {self.location}"


def _inverse(order: list[int]) -> list[int]:
    positions = [0] * len(order)
    for position, index in enumerate(order):
        positions[index] = position
    return positions


def build_shard_datasets(location: str, transforms: Transforms, strict: bool = False, train: bool = True,
                         cache_dir: str | None = None) -> tuple[ShardDataset | None, ShardDataset]:
    """The training (unless ``train`` is False) and validation sets of a sharded data set."""
    litdata()
    metadata = read_metadata(location)
    val = ShardDataset(location, "val", metadata, transforms.eval, strict, cache_dir)
    training = ShardDataset(location, "train", metadata, transforms.train, strict, cache_dir) if train else None
    return training, val


# -- the cache folder of a run ------------------------------------------------------------------------

def run_cache_dir(cache_root: str | os.PathLike) -> str:
    """A cache folder for this process, removed at exit; the folders of processes gone (a crash)
    are removed first, so no run ever reads another's half-written cache or waits on its locks."""
    parent = Path(cache_root) / "shards"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ShardError(f"cannot make the shard cache folder {parent}: {error.strerror or error} "
                         f"(set XDG_CACHE_HOME to a writable folder)") from None
    host = socket.gethostname()
    for folder in parent.glob(f"{host}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    folder = parent / f"{host}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)  # a reused pid's leftovers
    folder.mkdir()
    atexit.register(shutil.rmtree, folder, True)
    return str(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# -- writing --------------------------------------------------------------------------------------

def _destination_state(location: str) -> str:
    """``empty``, ``complete`` (a finished conversion) or ``partial`` (anything else there)."""
    if is_remote(location):
        fs = _fs(location)
        if fs.exists(_join(location, METADATA_NAME)):
            return "complete"
        return "empty" if all(fs.is_empty(_join(location, split)) for split in SPLITS) else "partial"
    root = Path(location)
    if (root / METADATA_NAME).exists():
        return "complete"
    return "partial" if any((root / split).exists() for split in SPLITS) else "empty"


def _clear(location: str) -> None:
    if is_remote(location):
        fs = _fs(location)
        for name in (METADATA_NAME, *[split + "/" for split in SPLITS]):
            fs.delete_file_or_directory(_join(location, name))
        return
    for split in SPLITS:
        shutil.rmtree(Path(location) / split, ignore_errors=True)
    (Path(location) / METADATA_NAME).unlink(missing_ok=True)


def _write_split(samples: Iterable[tuple[int, str, int]], folder: str, chunk_bytes: str,
                 advance: Callable[[int], Any]) -> int:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(folder, chunk_bytes=chunk_bytes)
    count = 0
    for count, (index, path, label) in enumerate(samples, start=1):
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise DatasetError(f"cannot read image {path}: {error.strerror or error}") from None
        writer.add_item(count - 1, {"index": index, "label": label, "image": data})
        advance(1)
    writer.done()
    writer.merge()
    return count


def _upload(staging: Path, location: str) -> None:
    fs = _fs(location)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            fs.upload_file(str(path), _join(location, *path.relative_to(staging).parts))


def convert_imagefolder(data_root: str | os.PathLike, location: str, seed: int = 0, overwrite: bool = False,
                        chunk_bytes: str = DEFAULT_CHUNK_BYTES, progress: Callable[[int], Any] | None = None,
                        scan: Callable[[Path], FolderIndex] = scan_imagefolder) -> ShardMetadata:
    """Write the ImageFolder at ``data_root`` as a sharded data set at ``location`` (a folder or URL).

    The images are found by the training scan (same classes, labels and checks); shards.json is
    written last. A destination with a finished or partial conversion is refused unless
    ``overwrite``.

    Args:
        seed: the stored training order's seed.
        progress: called with the number of images written since the last call.
    """
    litdata()
    location = str(location)
    state = _destination_state(location)
    if state != "empty":
        if not overwrite:
            what = "a converted data set" if state == "complete" else "a conversion that did not finish"
            raise ShardError(f"{location} already holds {what}; pass --overwrite to replace it, or choose "
                             f"another --output")
        _clear(location)
    train_dir, val_dir = find_split_dirs(data_root)
    train, val = scan(train_dir), scan(val_dir)
    check_same_classes(train.classes, val.classes, train_dir, val_dir)
    order = training_order(len(train.samples), seed)
    advance = progress or (lambda count: None)
    splits = {"train": [(index, *train.samples[index]) for index in order],
              "val": [(index, path, label) for index, (path, label) in enumerate(val.samples)]}
    with tempfile.TemporaryDirectory(prefix="shards-") as scratch:
        staging = Path(scratch) if is_remote(location) else Path(location)
        for split, samples in splits.items():
            _write_split(samples, str(staging / split), chunk_bytes, advance)
        metadata = ShardMetadata(train.classes, {split: len(samples) for split, samples in splits.items()}, seed)
        if is_remote(location):
            _upload(staging, location)
            (staging / METADATA_NAME).write_text(json.dumps(metadata.to_dict(), indent=1) + "\n")
            _fs(location).upload_file(str(staging / METADATA_NAME), _join(location, METADATA_NAME))
        else:
            _write_metadata_atomically(Path(location), metadata)
    return metadata


def _write_metadata_atomically(root: Path, metadata: ShardMetadata) -> None:
    target = root / METADATA_NAME
    staging = root / f".{METADATA_NAME}.tmp"
    staging.write_text(json.dumps(metadata.to_dict(), indent=1) + "\n")
    os.replace(staging, target)
