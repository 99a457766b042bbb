"""The device-side input stage: uint8 batches to the device, one step ahead, normalised there."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from models.preprocess import Normalizer
from training import device as devices
from training.data.imagefolder import Batch


class DeviceLoader:
    """Batches from ``loader`` moved to ``device`` one step ahead, normalised there.

    Yields ``(images, labels, replaced)``: float32 N x C x H x W images equal to
    ``(x / 255 - mean) / std`` (channels-last memory if asked), int64 labels, both on
    ``device``, and the paths of unreadable images the batch replaced. With
    ``side_stream`` the copy and normalisation of the next batch run on a side stream while
    the current batch is used; otherwise the next batch is queued before the current one is
    handed out. Copies are non-blocking from pinned loader memory only.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str, normalizer: Normalizer,
                 channels_last: bool = True, side_stream: bool = False) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.normalizer = normalizer
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.side_stream = side_stream

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler's ``set_epoch`` when it has one."""
        set_epoch = getattr(self.loader.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def skip(self, samples: int) -> None:
        """Leave out the first ``samples`` samples of this epoch (mid-epoch resume)."""
        self.loader.sampler.skip(samples)

    def close(self) -> None:
        """Stop the loader's worker processes now.

        They ignore SIGTERM and SIGINT (the main process stops the run, imagefolder.py), so they
        must not outlive it: at interpreter exit multiprocessing would join them for ever if
        anything still held the loader. DataLoader keeps its persistent workers' iterator in
        ``_iterator`` and has no public way to stop them; ``_shutdown_workers`` is what its own
        ``__del__`` calls (torch 2.3 to 2.14)."""
        iterator = getattr(self.loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        if iterator is not None:
            self.loader._iterator = None

    def _to_device(self, batch: Batch) -> Batch:
        images, labels, replaced = batch
        # Non-blocking only from pinned memory: from pageable memory MPS (which has no pinned
        # memory) may still be reading the host buffer after it was released, and hands out
        # corrupted batches (pytorch/pytorch#139550, #189690); elsewhere it gains little there.
        images = images.to(self.device, non_blocking=images.is_pinned())
        labels = labels.to(self.device, non_blocking=labels.is_pinned())
        images = images.contiguous(memory_format=self.memory_format)  # on uint8, before the 4x larger float
        return self.normalizer(images), labels, replaced

    def __iter__(self) -> Iterator[Batch]:
        return self._iter_side_stream() if self.side_stream else self._iter_queued()

    def _iter_queued(self) -> Iterator[Batch]:
        pending = None
        for batch in self.loader:
            ready, pending = pending, self._to_device(batch)
            if ready is not None:
                yield ready
        if pending is not None:
            yield pending

    def _iter_side_stream(self) -> Iterator[Batch]:
        main = devices.current_stream(self.device)
        side = devices.new_stream(self.device)
        side.wait_stream(main)  # the normaliser's mean/std were made on the main stream
        pending = None
        for batch in self.loader:
            with devices.use_stream(side, self.device):
                prepared = self._to_device(batch)
            if pending is not None:
                yield pending
            # The main stream must see the side stream's work before it uses the batch, and
            # the allocator must not recycle the batch's memory (allocated on the side
            # stream) until the main stream's queued work on it has finished.
            main.wait_stream(side)
            images, labels, replaced = prepared
            images.record_stream(main)
            labels.record_stream(main)
            pending = images, labels, replaced
        if pending is not None:
            yield pending
