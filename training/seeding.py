"""Seeds derived from the run's seed: every random draw is a function of where it happens.

Augmentation is seeded per sample (seed, epoch, dataset index), dropout per step (seed,
epoch, step, rank), the shuffle per epoch (seed, epoch), and an unreadable image's
replacement per sample. So a run resumed at any step, with any number of loader workers,
draws exactly what the uninterrupted run drew, and nothing random needs to be saved but
the seed itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import torch

# One stream per use, so that two uses never draw from the same numbers.
SHUFFLE = 1
AUGMENTATION = 2
DROPOUT = 3
REPLACEMENT = 4


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 63-bit seed for ``stream`` at ``keys`` (e.g. epoch and index), stable across runs."""
    text = ",".join(str(int(part)) for part in (seed, stream, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def draw_run_seed() -> int:
    """A fresh seed for a run started without ``--seed`` (saved in its checkpoints)."""
    return random.SystemRandom().randrange(2**31)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch's global generators (CPU and devices) for one training step: dropout."""
    torch.manual_seed(derive_seed(seed, DROPOUT, epoch, step, rank))


@contextlib.contextmanager
def seeded_torch(seed: int | None) -> Iterator[None]:
    """Within the block, torch's CPU generator starts from ``seed``; outside, it is untouched.

    ``None`` leaves the generator as it is (no determinism asked for).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
