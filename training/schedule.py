"""Learning-rate schedule: linear warm-up, then cosine or step decay, stepped every batch.

Built on ``torch.optim.lr_scheduler.LambdaLR``, so its state (the step count) is saved
and restored with the checkpoint and a resumed run continues on the same curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LrCurve:
    """The multiplier of the peak learning rate at each training step."""

    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    kind: str = "cosine"  # or "step"
    step_epochs: int = 30
    gamma: float = 0.1

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.gamma ** (step // (self.step_epochs * self.steps_per_epoch))
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, curve: LrCurve) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=curve)


def restore_position(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Resume at the saved step, on the curve of *this* run's options.

    LambdaLR would also restore the saved curve's fields (a resumed run with more
    ``--epochs`` would keep the old length); only the position is taken from the file.
    """
    state = dict(state)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
