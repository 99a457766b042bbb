"""The input pipeline: from a data set to normalised batches on the device.

This ``__init__`` is the seam between the pipeline and the rest of the code. A source of
batches (``BatchSource``) is what the training loop and evaluation iterate: it has a length
in batches, a ``set_epoch`` (a new shuffle) and a ``skip`` to a sample position of the epoch
(a mid-epoch resume). ``build_loaders`` turns ``DataSettings`` (filled from the options by
``training.setup``, the only place that reads them) into this rank's ``Loaders``; with
``train=False`` (evaluation) it builds the validation batches only and never reads ``train/``.

The modules behind it, one concern each:

* ``scan``: the images of an ImageFolder split, scanned once per job (a cached index);
* ``imagefolder``: the ImageFolder format (dataset), and the decoding, collate and DataLoader
  every format shares;
* ``shards``: the sharded format (litdata chunks in a folder or an object store);
* ``sampling``: the seeded training sampler and the exact evaluation sampler;
* ``transforms``: augmentation settings and the uint8 transforms run in the workers;
* ``device_loader``: batches to the device one step ahead, normalised there;
* ``synthetic``: random batches already on the device (``--synthetic``);
* ``embedded``: the generated data set of ``--dummy``;
* ``mixing``: MixUp/CutMix on the device batch.

A new data format is a ``DecodingDataset`` (``imagefolder``) in its own module, and one branch
in ``_datasets`` (docs/ARCHITECTURE.md, "Where to add").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch

from models.preprocess import Normalizer
from training import distributed
from training.data.device_loader import DeviceLoader
from training.data.embedded import default_cache_dir, ensure_dummy_imagefolder
from training.data import shards
from training.data.imagefolder import (Batch, DecodingDataset, build_datasets, build_loader, build_transforms,
                                       default_workers)
from training.data.scan import DatasetError, index_for_job
from training.data.sampling import EvalShardSampler, TrainSampler
from training.data.synthetic import SYNTHETIC_NUM_CLASSES, SYNTHETIC_STEPS, SYNTHETIC_VAL_STEPS, SyntheticBatches
from training.data.transforms import AugmentSettings
from training.distributed import Topology

if TYPE_CHECKING:
    from models.preprocess import PreprocessConfig

__all__ = ["AugmentSettings", "Batch", "BatchSource", "DataSettings", "DatasetError", "DeviceTransfer", "Loaders",
           "build_loaders"]


class BatchSource(Protocol):
    """What the loop iterates: ``(images, labels, replaced_paths)`` batches on the device."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int:
        """Batches left in this epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: its own order and augmentation."""

    def skip(self, samples: int) -> None:
        """Leave out the first ``samples`` samples (of this rank) of the current epoch."""

    def close(self) -> None:
        """Stop its worker processes now (the run is over)."""


@dataclass(frozen=True)
class DataSettings:
    """What the input pipeline needs from the options.

    Attributes:
        root: the data set: an ImageFolder, or a sharded data set (a folder or an object-store URL,
            ``training.data.shards``); None means the embedded ``--dummy`` set (made on first use).
        dummy_dir: where the embedded set is kept (None: the cache folder).
        cache_dir: where scan indexes and the shard reader's cache of a run are kept (None: the
            cache folder, ``~/.cache/inception-xception``).
        synthetic: random batches on the device instead of a data set.
        image_size: the training crop (the validation crop too).
        batch_size: per device and batch.
        accum_steps: batches per optimizer step.
        workers: loader processes (None: from the CPU count).
        max_steps: optimizer steps per epoch at most (None: the whole epoch).
        num_classes: the class count of synthetic batches (None: 1000).
        strict: an unreadable image stops the run instead of being replaced.
        augment: the training augmentation and the evaluation crop.
    """

    root: str | None
    image_size: int
    batch_size: int
    dummy_dir: str | None = None
    cache_dir: str | None = None
    synthetic: bool = False
    accum_steps: int = 1
    workers: int | None = None
    max_steps: int | None = None
    num_classes: int | None = None
    strict: bool = False
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass(frozen=True)
class DeviceTransfer:
    """How batches reach the device (the device's capability row decides these)."""

    device: torch.device
    channels_last: bool = True
    pin_memory: dict[str, Any] = field(default_factory=dict)
    side_stream: bool = False


@dataclass
class Loaders:
    train: BatchSource | None  # None when built for evaluation only
    val: BatchSource
    class_names: list[str]
    train_images: int
    steps_per_epoch: int  # the full epoch's optimizer steps, capped by --max-steps
    batch_size: int  # per device and batch
    global_batch_size: int  # all devices' batches together
    accum_steps: int = 1  # batches per optimizer step

    @property
    def samples_per_step(self) -> int:
        """Images one device reads per optimizer step."""
        return self.batch_size * self.accum_steps

    def close(self) -> None:
        """Stop the loaders' worker processes (the run is over, or it failed)."""
        for source in (self.train, self.val):
            if source is not None:
                source.close()


def _data_root(settings: DataSettings, topology: Topology) -> str:
    if settings.root is not None:
        return str(settings.root)
    if topology.is_main:
        root = ensure_dummy_imagefolder(settings.dummy_dir)
    distributed.barrier()  # rank 0 made it; the others find it
    if not topology.is_main:
        root = ensure_dummy_imagefolder(settings.dummy_dir)
    return str(root)


def _datasets(settings: DataSettings, preprocess: PreprocessConfig, topology: Topology,
              train: bool) -> tuple[DecodingDataset | None, DecodingDataset]:
    """This job's datasets, in the format ``settings.root`` holds."""
    root = _data_root(settings, topology)
    cache = settings.cache_dir or str(default_cache_dir())
    if shards.is_shard_dataset(root):
        transforms = build_transforms(settings.image_size, preprocess, settings.augment)
        run_cache = shards.run_cache_dir(cache) if shards.is_remote(root) else None  # a folder is read in place
        return shards.build_shard_datasets(root, transforms, settings.strict, train, cache_dir=run_cache)
    return build_datasets(root, settings.image_size, preprocess, strict=settings.strict, augment=settings.augment,
                          train=train, scan=lambda split: index_for_job(split, cache, topology.is_main))


def _synthetic_loaders(settings: DataSettings, transfer: DeviceTransfer, seed: int, count: int) -> Loaders:
    num_classes = settings.num_classes or SYNTHETIC_NUM_CLASSES
    steps = min(SYNTHETIC_STEPS, settings.max_steps or SYNTHETIC_STEPS)  # optimizer steps, as with real data
    make = dict(batch_size=settings.batch_size, image_size=settings.image_size, num_classes=num_classes,
                device=transfer.device, channels_last=transfer.channels_last, seed=seed)
    train = SyntheticBatches(steps=steps * settings.accum_steps, **make)
    names = [f"class_{index}" for index in range(num_classes)]
    val = SyntheticBatches(steps=SYNTHETIC_VAL_STEPS, **make)
    return Loaders(train, val, names, train.num_images, steps, settings.batch_size,
                   settings.batch_size * count, settings.accum_steps)


def build_loaders(settings: DataSettings, preprocess: PreprocessConfig, topology: Topology, transfer: DeviceTransfer,
                  seed: int, train: bool = True) -> Loaders:
    """The training and validation batches of this rank, on ``transfer.device``.

    Args:
        train: also the training batches (False, for evaluation: ``train/`` is not read, and
            ``Loaders.train`` is None).
    """
    if settings.synthetic:
        return _synthetic_loaders(settings, transfer, seed, topology.process_count)
    train_set, val_set = _datasets(settings, preprocess, topology, train)
    global_batch = settings.batch_size * topology.process_count
    workers = settings.workers if settings.workers is not None else default_workers(topology.local_process_count)
    common = dict(workers=workers, channels_last=transfer.channels_last, pin_memory=transfer.pin_memory)
    val_sampler = EvalShardSampler(len(val_set), topology.process_rank, topology.process_count)
    val = build_loader(val_set, settings.batch_size, val_sampler, train=False, **common)
    normalizer = Normalizer(preprocess.mean, preprocess.std, transfer.device)
    wrap = dict(device=transfer.device, normalizer=normalizer, channels_last=transfer.channels_last,
                side_stream=transfer.side_stream)
    if train_set is None:
        return Loaders(None, DeviceLoader(val, **wrap), list(val_set.classes), 0, 0, settings.batch_size,
                       global_batch, settings.accum_steps)
    if len(train_set) < global_batch * settings.accum_steps:
        raise DatasetError(f"the training set has {len(train_set)} images, fewer than one step "
                           f"({settings.batch_size} per device x {topology.process_count} devices"
                           f"{f' x {settings.accum_steps} accumulated batches' if settings.accum_steps > 1 else ''})")
    train_sampler = TrainSampler(len(train_set), seed, topology.process_rank, topology.process_count)
    train_loader = build_loader(train_set, settings.batch_size, train_sampler, train=True, **common)
    full_epoch = len(train_loader) // settings.accum_steps
    steps = min(full_epoch, settings.max_steps or full_epoch)
    return Loaders(DeviceLoader(train_loader, **wrap), DeviceLoader(val, **wrap), list(train_set.classes),
                   len(train_set), steps, settings.batch_size, global_batch, settings.accum_steps)
