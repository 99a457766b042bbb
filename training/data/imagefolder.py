"""The ImageFolder format, and what every format shares: decoding by key, collate, DataLoader.

The folder is indexed by ``training.data.scan``. Workers decode and crop to uint8
(``training.data.transforms``), each sample with the augmentation seed its ``SampleKey``
carries (``training.data.sampling``). An unreadable
image is replaced by another sample chosen from the same seed, so every batch is full and
every rank stays in step; its path travels with the batch to be counted and logged.
``training.data.device_loader.DeviceLoader`` moves batches to the device.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from training.data.sampling import SampleKey
from training.data.scan import DatasetError, FolderIndex, scan_imagefolder
from training.data.transforms import AugmentSettings, EvalTransform, TrainTransform, extra_augmentation
from training.seeding import AUGMENTATION, REPLACEMENT, derive_seed, seeded_torch

if TYPE_CHECKING:
    from models.preprocess import PreprocessConfig


MAX_DEFAULT_WORKERS = 8
MAX_REPLACEMENTS = 16  # unreadable replacements in a row before the data set is declared broken
# What opening or decoding a broken or truncated image file raises from Pillow
# (UnidentifiedImageError is an OSError). Only the open and the decode are guarded.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def find_split_dirs(data_root: str | os.PathLike, names: Sequence[str] = ("train", "val")) -> tuple[Path, ...]:
    """``data_root/<name>`` for each of ``names``, or a DatasetError saying what is missing."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetError(f"data path not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    splits = []
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DatasetError(f"no '{name}' folder in {root} "
                               f"(expected {root}/train/<class>/<image> and {root}/val/<class>/<image>)")
        splits.append(folder)
    return tuple(splits)


def _decode(transform: Callable, img: Image.Image) -> Any:
    """The transform's decode half; a plain transform gets the fully decoded RGB image."""
    decode = getattr(transform, "decode", None)
    if decode is not None:
        return decode(img)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _finish(transform: Callable, decoded: Any) -> Any:
    finish = getattr(transform, "finish", None)
    return finish(decoded) if finish is not None else transform(decoded)


class DecodingDataset(Dataset):
    """Images decoded and transformed by key; items are ``(image, label, replaced_name)``.

    A data format provides ``__len__``, ``name(index)`` (for messages) and ``open_image(index)``
    (a lazily opened PIL image and its label); decoding, the seeded augmentation and
    the replacement of unreadable images are the same for every format, so a sample index
    and seed give the same tensor whatever the format.

    The key is an index, or a ``SampleKey`` whose seed makes the augmentation reproducible.
    An image that cannot be opened or decoded is replaced by another sample chosen from
    the key (``replaced_name`` names the unreadable one, else it is None), or raises
    DatasetError when ``strict``. Errors of the transform itself are bugs and propagate.
    """

    transform: Callable[[Image.Image], Any]
    strict: bool = False
    classes: list[str]

    def name(self, index: int) -> str:
        raise NotImplementedError

    def open_image(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def where(self) -> str:
        """The data set's location, for messages."""
        raise NotImplementedError

    def _read(self, index: int, seed: int | None) -> tuple[Any, int] | None:
        """The decoded sample and its label, or None when its image is unreadable."""
        with seeded_torch(seed):
            try:
                img, label = self.open_image(index)
                with img:
                    decoded = _decode(self.transform, img)
            except READ_ERRORS as error:
                if self.strict:
                    raise DatasetError(f"cannot read image {self.name(index)}: {error}") from error
                return None
            return _finish(self.transform, decoded), label

    def _replacement(self, key: int | SampleKey, attempt: int) -> tuple[int, int | None]:
        if isinstance(key, SampleKey):
            return (derive_seed(key.seed, REPLACEMENT, attempt) % len(self),
                    derive_seed(key.seed, AUGMENTATION, attempt))
        return int(torch.randint(len(self), (1,)).item()), None

    def __getitem__(self, key: int | SampleKey) -> tuple[Any, int, str | None]:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), None)
        sample = self._read(index, seed)
        if sample is not None:
            return (*sample, None)
        unreadable = self.name(index)
        for attempt in range(MAX_REPLACEMENTS):
            index, seed = self._replacement(key, attempt)
            sample = self._read(index, seed)
            if sample is not None:
                return (*sample, unreadable)
        raise DatasetError(f"cannot read image {unreadable}, nor {MAX_REPLACEMENTS} replacements for it: "
                           f"is the data set {self.where()} readable?")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.where()}, classes={len(self.classes)}, "
                f"images={len(self)}, transform={self.transform!r})")


class ImageFolderDataset(DecodingDataset):
    """``root/<class>/<image>`` images (``training.data.scan`` finds them, or ``index`` lists them)."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any],
                 strict: bool = False, index: FolderIndex | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        index = index if index is not None else scan_imagefolder(self.root)
        self.classes, self.samples = index.classes, index.samples
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def open_image(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return Image.open(path), label

    def where(self) -> str:
        return f"under {self.root}"


@dataclass(frozen=True)
class Transforms:
    """The training transform and the evaluation transform of a run."""

    train: Callable[[Image.Image], Any]
    eval: Callable[[Image.Image], Any]


def build_transforms(image_size: int, preprocess: PreprocessConfig,
                     augment: AugmentSettings | None = None) -> Transforms:
    """The model's crop, resize and filter, with the augmentation of ``augment``."""
    augment = augment or AugmentSettings()
    interpolation = augment.interpolation or preprocess.interpolation
    evaluation = dataclasses.replace(preprocess, crop_pct=augment.crop_pct) if augment.crop_pct else preprocess
    train = TrainTransform(image_size, interpolation, augment.scale, augment.ratio, augment.hflip,
                           extra=extra_augmentation(augment.auto_augment, augment.random_erase))
    return Transforms(train, EvalTransform(image_size, evaluation.eval_resize(image_size), interpolation))


def check_same_classes(train: list[str], val: list[str], train_where: object, val_where: object) -> None:
    """A DatasetError when the training and validation class lists differ."""
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        detail = (f"only in train: {_first(only_train)}; only in val: {_first(only_val)}" if only_train or only_val
                  else "the same names in another order")
        raise DatasetError(f"class folders differ between {train_where} and {val_where}: {detail}")


def build_datasets(data_root: str | os.PathLike, image_size: int, preprocess: PreprocessConfig,
                   strict: bool = False, augment: AugmentSettings | None = None, train: bool = True,
                   scan: Callable[[Path], FolderIndex] = scan_imagefolder,
                   ) -> tuple[ImageFolderDataset | None, ImageFolderDataset]:
    """Train and val datasets under ``data_root`` with the model's crop, resize and filter.

    Args:
        train: also the training set (False: ``train/`` is never read, the train set is None).
        scan: how a split is indexed (``training.data.scan.index_for_job`` in a job).
    """
    transforms = build_transforms(image_size, preprocess, augment)
    if not train:
        val_dir, = find_split_dirs(data_root, ("val",))
        return None, ImageFolderDataset(val_dir, transforms.eval, strict, index=scan(val_dir))
    train_dir, val_dir = find_split_dirs(data_root)
    train_set = ImageFolderDataset(train_dir, transforms.train, strict, index=scan(train_dir))
    val = ImageFolderDataset(val_dir, transforms.eval, strict, index=scan(val_dir))
    check_same_classes(train_set.classes, val.classes, train_dir, val_dir)
    return train_set, val


def _first(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -- batches ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Collate:
    """Stack ``(image, label, replaced_path)`` items into ``(images, labels, replaced_paths)``.

    uint8 images come out N x C x H x W; with ``channels_last`` their memory is one NHWC block
    (what our transforms produce, stacked straight into shared memory by a worker), else plain
    contiguous NCHW, for devices that take no other format (the copy to the device is then
    one contiguous transfer).
    """

    channels_last: bool = True

    def __call__(self, items: Sequence[tuple[Any, int, str | None]]) -> Batch:
        replaced = [path for _, _, path in items if path is not None]
        labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
        images = [image for image, _, _ in items]
        if self.channels_last and images[0].dim() == 3:
            stacked = default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
        else:
            stacked = default_collate([image.contiguous() for image in images])
        return stacked, labels, replaced


def collate_batch(items: Sequence[tuple[Any, int, str | None]]) -> Batch:
    """``Collate()`` with channels-last memory."""
    return Collate(channels_last=True)(items)


# -- loaders ------------------------------------------------------------------------------

def _ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: leave SIGTERM/SIGUSR1/SIGINT to the main process, which stops cleanly
    and shuts the workers down (SLURM signals every process of the job, a terminal's Ctrl-C
    every process of the foreground job)."""
    for number in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT):
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


def build_loader(dataset: Dataset, batch_size: int, sampler: Sampler, *, train: bool, workers: int,
                 channels_last: bool = True, pin_memory: dict[str, Any] | None = None,
                 prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader of ``Collate`` batches over ``sampler``'s order.

    Args:
        train: drop the last partial batch (every step of an epoch has the same shape).
        workers: worker processes; 0 decodes in the main process. Workers stay alive across
            epochs; the samples' seeds, not the workers', decide the augmentation.
        pin_memory: ``training.device.pin_memory_options`` for the device, or None.
    """
    extra: dict[str, Any] = dict(pin_memory or {})
    if workers > 0:
        extra.update(persistent_workers=True, worker_init_fn=_ignore_stop_signals)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      collate_fn=Collate(channels_last), drop_last=train, **extra)


def default_workers(processes_on_node: int = 1) -> int:
    """Worker processes per training process: the usable CPUs split between the processes
    on this machine, one CPU left to each main process, at most ``MAX_DEFAULT_WORKERS``;
    0 (load in-process) when there is no spare CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, processes_on_node)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))

