"""ImageFolder datasets, loaders and the device-side input stage.

Workers decode and crop to uint8 (``training.transforms``); ``collate_batch`` stacks the
images into a channels-last uint8 batch and sets unreadable images aside (their paths
travel with the batch so the main process can log and count them); ``DeviceLoader``
copies batches to the device ahead of use and normalises them there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from training.transforms import EvalTransform, TrainTransform

if TYPE_CHECKING:
    from models.preprocess import PreprocessConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_DEFAULT_WORKERS = 8
# Streams for copy/compute overlap are used only where they have been tested.
_SIDE_STREAM_DEVICES = ("cuda",)
# What a broken or truncated image file raises from Pillow (UnidentifiedImageError is an
# OSError); anything else is a bug and propagates.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class DatasetError(ValueError):
    """A dataset folder or image that cannot be used; the message names the path."""


def find_split_dirs(data_root: str | os.PathLike) -> tuple[Path, Path]:
    """``(data_root/train, data_root/val)``, or a DatasetError saying what is missing."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetError(f"data path not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    splits = []
    for name in ("train", "val"):
        folder = root / name
        if not folder.is_dir():
            raise DatasetError(f"no '{name}' folder in {root} "
                               f"(expected {root}/train/<class>/<image> and {root}/val/<class>/<image>)")
        splits.append(folder)
    return splits[0], splits[1]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_imagefolder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names, hidden ones skipped) and ``(path, label)`` samples.

    Images are found recursively under each class folder, in sorted path order, like
    torchvision's ImageFolder.
    """
    if not root.is_dir():
        raise DatasetError(f"data path not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if not found:
            raise DatasetError(f"class folder has no images: {root / name} "
                               f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, label) for path in sorted(found))
    return classes, samples


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` images; items are ``(image, label, None)``.

    ``transform`` receives the lazily opened PIL image (not decoded yet, so it may ask
    for a reduced JPEG decode). An image that cannot be read gives ``(None, label, path)``
    so the batch goes on without it, or raises DatasetError when ``strict``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any],
                 strict: bool = False) -> None:
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        self.classes, self.samples = scan_imagefolder(self.root)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, str | None]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return self.transform(img), label, None
        except _READ_ERRORS as error:
            if self.strict:
                raise DatasetError(f"cannot read image {path}: {error}") from error
            return None, label, path

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, classes={len(self.classes)}, "
                f"images={len(self)}, transform={self.transform!r})")


def build_datasets(data_root: str | os.PathLike, image_size: int, preprocess: PreprocessConfig,
                   strict: bool = False) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and val datasets under ``data_root`` with the model's crop, resize and filter."""
    train_dir, val_dir = find_split_dirs(data_root)
    train = ImageFolderDataset(train_dir, TrainTransform(image_size, preprocess.interpolation), strict)
    val = ImageFolderDataset(
        val_dir, EvalTransform(image_size, preprocess.eval_resize(image_size), preprocess.interpolation), strict)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(f"class folders differ between {train_dir} and {val_dir}: "
                           f"only in train: {_first(only_train)}; only in val: {_first(only_val)}")
    return train, val


def _first(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def collate_batch(items: Sequence[tuple[Any, int, str | None]]) -> Batch:
    """``(images, labels, skipped)``: unreadable items are dropped and their paths returned.

    uint8 images come out as an NCHW tensor with channels-last memory (one contiguous
    NHWC block), ready for a channels_last model. When every item was unreadable, images
    is an empty ``(0, 3, 0, 0)`` uint8 tensor and labels is empty; the engine skips it.
    Other image tensors (e.g. the classic float pipeline) are stacked as they are.
    """
    skipped = [path for image, _, path in items if image is None]
    kept = [(image, label) for image, label, _ in items if image is not None]
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    if not kept:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), labels, skipped
    images = [image for image, _ in kept]
    first = images[0]
    if first.dim() == 3 and first.permute(1, 2, 0).is_contiguous():
        # HWC memory behind a CHW view (our transforms): stack as NHWC (default_collate
        # writes straight into shared memory in a worker), then view as NCHW.
        stacked = default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    else:
        stacked = default_collate(images)
    return stacked, labels, skipped


class EvalShardSampler(Sampler[int]):
    """Rank ``rank`` of ``world_size`` takes indices ``rank, rank + world_size, ...``.

    No padding, no dropping, no shuffling: across ranks every sample is seen exactly
    once, so summed counts give exact validation accuracy.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.world_size = world_size
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class SeededRandomSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``.

    Resuming at epoch k replays epoch k's order. ``set_epoch`` picks the epoch; without
    it each pass over the sampler moves to the next epoch, so the order never repeats.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int,
                 sampler: Sampler | None = None, seed: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = True, prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader yielding ``collate_batch`` batches.

    Args:
        train: shuffle (``sampler``, else ``SeededRandomSampler(seed)``) and drop the last
            partial batch; otherwise read in order (or ``sampler``'s order) and keep every image.
        workers: worker processes; 0 decodes in the main process, where augmentation
            draws from the global torch RNG (seed it with ``torch.manual_seed``).
        seed: seeds the shuffle and the workers' RNGs (each worker gets its own stream,
            the same on every run). Give each distributed rank a different seed
            (e.g. ``seed + rank``) so ranks augment differently.
    """
    if sampler is None:
        sampler = SeededRandomSampler(len(dataset), seed) if train else None
    generator = torch.Generator().manual_seed(seed)  # drawn once per epoch for the workers' base seed
    extra: dict[str, Any] = {}
    if workers > 0:
        # torch seeds torch, random and numpy in each worker from the base seed + worker
        # id, and limits each worker to one intra-op thread: no worker_init_fn needed.
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                      num_workers=workers, collate_fn=collate_batch, pin_memory=pin_memory,
                      drop_last=train, generator=generator, **extra)


def default_workers(world_size: int = 1) -> int:
    """Worker processes per training process: the usable CPUs split between the
    ``world_size`` processes on this machine, one CPU left to each main process, at most
    ``MAX_DEFAULT_WORKERS``; 0 (load in-process) when there is no spare CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, world_size)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


class DeviceLoader:
    """Batches from ``loader`` moved to ``device`` one step ahead, normalised there.

    Yields ``(images, labels, skipped)``: images ``dtype`` NCHW (channels-last memory if
    asked) equal to ``(x / 255 - mean) / std``, labels int64, both on ``device``. On CUDA
    the copy and normalisation of the next batch run on a side stream while the current
    batch is used; elsewhere the next batch is queued (non-blocking) before the current
    one is handed out. Use a loader with ``pin_memory=True`` for truly asynchronous copies.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = True, dtype: torch.dtype = torch.float32) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dtype = dtype
        self._mean = torch.tensor([m * 255 for m in mean], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor([s * 255 for s in std], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._row_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image width -> (mean, std) rows

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler's ``set_epoch`` when it has one (distributed, seeded shuffle)."""
        set_epoch = getattr(self.loader.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _to_device(self, batch: Batch) -> Batch:
        images, labels, skipped = batch
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceLoader expects uint8 images (training.transforms), got {images.dtype}")
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=fmt)  # on uint8, before the 4x larger float
        # Normalise in float32 whatever the output dtype, then cast: exact for half/bf16 too.
        images = self._normalise(images)
        if self.dtype != torch.float32:
            images = images.to(self.dtype)
        return images, labels, skipped

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` in float32.

        In channels-last memory the channel is the innermost dimension, so broadcasting a
        (1, C, 1, 1) mean gives the kernels an inner loop of C = 3 elements (about 4x slower
        on a CPU, bench/input_pipeline.py). The same arithmetic on rows of W x C values
        against a mean/std row repeated W times runs on contiguous vectors: bit-identical.
        """
        n, c, h, w = images.shape
        if not (images.numel() and images.is_contiguous(memory_format=torch.channels_last)):
            return images.to(torch.float32).sub_(self._mean).div_(self._std)
        if w not in self._row_stats:
            self._row_stats[w] = (self._mean.view(-1).repeat(w), self._std.view(-1).repeat(w))
        mean, std = self._row_stats[w]
        rows = images.permute(0, 2, 3, 1).reshape(n * h, w * c)  # a view of the NHWC memory
        rows = rows.to(torch.float32).sub_(mean).div_(std)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type in _SIDE_STREAM_DEVICES:
            return self._iter_side_stream()
        return self._iter_ahead()

    def _iter_ahead(self) -> Iterator[Batch]:
        pending = None
        for batch in self.loader:
            ready, pending = pending, self._to_device(batch)
            if ready is not None:
                yield ready
        if pending is not None:
            yield pending

    def _iter_side_stream(self) -> Iterator[Batch]:
        # Device-generic stream API (torch.Stream / torch.accelerator), so that only the
        # device module names torch.cuda.
        main = torch.accelerator.current_stream(self.device)
        side = torch.Stream(device=self.device)
        side.wait_stream(main)  # mean/std were made on the main stream
        pending = None
        for batch in self.loader:
            with side:
                prepared = self._to_device(batch)
            if pending is not None:
                yield pending
            # The main stream must see the side stream's work before it uses the batch, and
            # the allocator must not recycle the batch's memory (allocated on the side
            # stream) until the main stream's queued work on it has finished.
            main.wait_stream(side)
            images, labels, skipped = prepared
            images.record_stream(main)
            labels.record_stream(main)
            pending = images, labels, skipped
        if pending is not None:
            yield pending
