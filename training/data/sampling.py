"""Samplers: which samples this rank reads, in which order, with which augmentation seed.

``TrainSampler`` yields ``SampleKey``s that carry each sample's augmentation seed, drawn from
the run's seed, the epoch and the index (``training.seeding``), so the same sample gets the
same crop whatever worker reads it, and a run resumed in the middle of an epoch
(``TrainSampler.skip``) reads exactly the rest of that epoch. ``EvalShardSampler`` splits
validation between ranks without padding, dropping or shuffling.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Sampler

from training.seeding import AUGMENTATION, SHUFFLE, derive_seed


class SampleKey(NamedTuple):
    """What the training sampler yields: a dataset index and its augmentation seed."""

    index: int
    seed: int




class TrainSampler(Sampler[SampleKey]):
    """This rank's share of a seeded permutation per epoch, with each sample's augmentation seed.

    The permutation of epoch ``e`` is drawn from ``(seed, e)`` and is the same on every rank;
    its tail is dropped so that it splits evenly, and rank ``r`` takes ``r, r + world, ...``.
    ``skip(n)`` leaves out the first ``n`` samples of the current epoch (mid-epoch resume).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped = 0

    @property
    def share(self) -> int:
        """Samples of one full epoch on this rank."""
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.skipped = 0

    def skip(self, count: int) -> None:
        self.skipped = min(count, self.share)

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SHUFFLE, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)[: self.share * self.world_size]
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        for index in self._order()[self.skipped:]:
            yield SampleKey(index, derive_seed(self.seed, AUGMENTATION, self.epoch, index))

    def __len__(self) -> int:
        return self.share - self.skipped


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
