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
        """The multiplier of the peak rate for step ``step`` (0-based) of epoch ``epoch``."""
        start = epoch + step / steps_per_epoch  # progress, in epochs, when the step begins
        end = epoch + (step + 1) / steps_per_epoch
        if end <= self.warmup_epochs:
            return end / self.warmup_epochs  # the first step already moves: (step + 1) / warm-up steps
        if self.kind == "step":
            return self.gamma ** int(start // self.step_epochs)
        decay = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(max(start - self.warmup_epochs, 0.0) / decay, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return self.peak_lr * self.factor(epoch, step, steps_per_epoch)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Set every parameter group's learning rate for this step; returns it."""
        lr = self.lr(epoch, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
