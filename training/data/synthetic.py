"""Synthetic batches already on the device: the training step measured without any input
pipeline (``main.py --synthetic``, and the benchmarks' reference point)."""
from __future__ import annotations

from typing import Iterator

import torch

SYNTHETIC_NUM_CLASSES = 1000
SYNTHETIC_STEPS = 100  # per epoch, unless --max-steps is smaller
SYNTHETIC_VAL_STEPS = 2


class SyntheticBatches:
    """``steps`` copies of one random normalised batch, shaped like DeviceLoader's output."""

    def __init__(self, batch_size: int, image_size: int, num_classes: int, steps: int, device: torch.device,
                 channels_last: bool = True, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(num_classes, (batch_size,), generator=generator)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(device).contiguous(memory_format=fmt)
        self.labels = labels.to(device)
        self.steps = steps
        self.remaining = steps
        self.batch_size = batch_size
        self.num_images = steps * batch_size

    def __len__(self) -> int:
        return self.remaining

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        remaining, self.remaining = self.remaining, self.steps
        for _ in range(remaining):
            yield self.images, self.labels, []

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle; here so the loop treats every loader alike."""

    def skip(self, samples: int) -> None:
        """Every batch is the same: a resumed epoch just has fewer steps left."""
        self.remaining = max(0, self.steps - samples // self.batch_size)

    def close(self) -> None:
        """No worker processes to stop."""
