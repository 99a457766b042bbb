"""Learning-rate schedule: linear warm-up, then cosine or step decay, as a function of progress.

The learning rate at a step depends only on how far training has come, in epochs
(``epoch + step / steps_per_epoch``), never on a step count. So a run resumed on another
number of devices, with another batch size or ``--max-steps``, lands at the same point of
the curve, and there is no scheduler state to save. It is set before every step.

The ModelZoo scripts change the learning rate once per epoch (warm-up ``lr * (e + 1) /
(w + 1)``, then cosine by epoch); here the same curves are followed step by step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LrSchedule:
    """Peak learning rate times a warm-up ramp and a decay, over ``epochs``."""

    peak_lr: float
    epochs: int
    warmup_epochs: float = 0.0
    kind: str = "cosine"  # or "step"
    step_epochs: int = 30
    gamma: float = 0.1

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The multiplier of the peak rate for step ``step`` (0-based) of epoch ``epoch``.

        Written in steps of this run (``done / steps_per_epoch`` is the progress in epochs), so
        the curve is the same whatever the steps per epoch.
        """
        done = epoch * steps_per_epoch + step  # steps before this one
        warmup = self.warmup_epochs * steps_per_epoch
        if done + 1 <= warmup:
            return (done + 1) / warmup  # the first step already moves
        if self.kind == "step":
            return self.gamma ** (done // (self.step_epochs * steps_per_epoch))
        decay = max(self.epochs * steps_per_epoch - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(done - warmup, 0) / decay, 1.0)))

    def lr(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return self.peak_lr * self.factor(epoch, step, steps_per_epoch)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Set every parameter group's learning rate for this step; returns it."""
        lr = self.lr(epoch, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
