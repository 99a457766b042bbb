"""The training step and the evaluation pass.

Both take explicit objects (model, loader, loss, optimizer, precision...) and return a
dict of metrics; neither reads the command line. The loop has one path: forward under
autocast, loss, backward, optional unscale + clip, step, schedule.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from training.distributed import sum_across_ranks
from training.metrics import (Progress, RunningSums, StepClock, Throughput, accuracy_summary,
                              eval_line, fps_summary, train_line)
from training.precision import Precision

log = logging.getLogger("training")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite where no loss scaler skips such steps."""


class TrainingLoss(nn.Module):
    """Cross-entropy on the main logits, plus ``aux_weight`` x the auxiliary head's loss.

    Inception v3 returns (logits, aux_logits) in training mode; every other model, and
    Inception with its aux head off, returns logits alone.
    """

    def __init__(self, label_smoothing: float = 0.0, aux_weight: float = 0.4):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.aux_weight = aux_weight

    def forward(self, outputs: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, main logits)."""
        if isinstance(outputs, tuple):
            logits, aux_logits = outputs
            return (self.criterion(logits, target)
                    + self.aux_weight * self.criterion(aux_logits, target)), logits
        return self.criterion(outputs, target), outputs


@dataclass(frozen=True)
class LoopSettings:
    """How an epoch is run and reported (not what is trained)."""

    device: torch.device
    print_freq: int = 10
    fps_warmup_steps: int = 5
    max_steps: int | None = None
    clip_grad: float | None = None
    progress: str = "auto"
    show_progress: bool = True


def _batches(loader: Iterable, limit: int) -> Iterable[tuple[float, Any]]:
    """Yield (seconds waited for the batch, batch), at most ``limit`` batches."""
    iterator = iter(loader)
    for _ in range(limit):
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield time.perf_counter() - started, batch


def _note_skipped(paths: list[str], skipped: list[str]) -> None:
    for path in paths:
        log.warning("skipped unreadable image: %s", path)
    skipped.extend(paths)


def _check_finite(losses: list[torch.Tensor], first_step: int, epoch: int) -> None:
    """Stop at the first non-finite loss among ``losses`` (steps from ``first_step``)."""
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses))
    if not bool(finite.all()):
        offset = int((~finite).nonzero()[0].item())
        value = float(losses[offset].item())
        raise NonFiniteLossError(
            f"the loss became {value} at epoch {epoch} step {first_step + offset}; stopping. Lower --lr, "
            f"add --clip-grad, or use --amp --loss-scale dynamic to skip overflowing fp16 steps")


def train_one_epoch(model: nn.Module, loader: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                    epoch: int, settings: LoopSettings) -> dict[str, Any]:
    """Train for one epoch (or ``settings.max_steps`` steps); returns the epoch's metrics."""
    model.train()
    steps = min(len(loader), settings.max_steps or len(loader))
    sums, clock = RunningSums(settings.device), StepClock(settings.device)
    throughput = Throughput(settings.device, settings.fps_warmup_steps, steps)
    progress = Progress(settings.progress, settings.show_progress)
    skipped: list[str] = []
    unchecked: list[torch.Tensor] = []
    first_unchecked = 0
    started = time.perf_counter()
    throughput.begin()
    step = -1
    for step, (waited, (images, target, skipped_paths)) in enumerate(_batches(loader, steps)):
        clock.data_ready(waited)
        _note_skipped(skipped_paths, skipped)
        if images.shape[0] == 0:
            continue  # every image of this batch was unreadable
        with precision.autocast():
            loss, logits = loss_fn(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer)
        if settings.clip_grad:
            precision.unscale(optimizer)
            nn.utils.clip_grad_norm_(precision.clip_parameters(model, optimizer), settings.clip_grad)
        precision.step(optimizer)
        scheduler.step()
        sums.add(loss, logits, target)
        throughput.step_done(step, images.shape[0])
        if not precision.skips_nonfinite_steps:
            unchecked.append(loss.detach())
        if (step + 1) % settings.print_freq == 0 or step + 1 == steps:
            _check_finite(unchecked, first_unchecked, epoch)
            unchecked, first_unchecked = [], step + 1
            step_time, data_time = clock.read()
            progress.line(train_line(epoch, step + 1, steps, step_time, data_time, sums.read(),
                                     images.shape[0], optimizer.param_groups[0]["lr"]))
    progress.close()
    _check_finite(unchecked, first_unchecked, epoch)
    fps_local, fps_job = throughput.images_per_second()
    totals = sums.read(across_ranks=True)
    skipped_count = _count_across_ranks(len(skipped), settings)
    elapsed = time.perf_counter() - started
    log.info("Epoch: [%d] done  loss %.4f  Acc@1 %.3f  Acc@5 %.3f  images %d  skipped %d  time %.1fs",
             epoch, totals["loss"], totals["acc1"], totals["acc5"], totals["count"], skipped_count, elapsed)
    log.info(fps_summary(fps_job))
    return {"train_loss": totals["loss"], "train_acc1": totals["acc1"], "train_acc5": totals["acc5"],
            "train_steps": step + 1, "train_images": totals["count"], "skipped_images": skipped_count,
            "fps": fps_job, "fps_per_device": fps_local, "epoch_time": elapsed,
            "lr": optimizer.param_groups[0]["lr"]}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, criterion: Callable, precision: Precision,
             settings: LoopSettings) -> dict[str, Any]:
    """Validate on every image of ``loader`` once (each rank its own shard); job-wide metrics.

    ``model`` must be the bare model, not the DDP wrapper: ranks may hold different
    numbers of batches, and DDP's forward would wait for the others.
    """
    model.eval()
    started = time.perf_counter()
    steps = len(loader)
    sums, clock = RunningSums(settings.device), StepClock(settings.device)
    progress = Progress(settings.progress, settings.show_progress)
    skipped: list[str] = []
    for step, (waited, (images, target, skipped_paths)) in enumerate(_batches(loader, steps)):
        clock.data_ready(waited)
        _note_skipped(skipped_paths, skipped)
        if images.shape[0] == 0:
            continue
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, target)
        sums.add(loss, logits, target)
        if (step + 1) % settings.print_freq == 0 or step + 1 == steps:
            progress.line(eval_line(step + 1, steps, clock.read()[0], sums.read()))
    progress.close()
    totals = sums.read(across_ranks=True)
    log.info(accuracy_summary(totals["acc1"], totals["acc5"]))
    return {"val_loss": totals["loss"], "val_acc1": totals["acc1"], "val_acc5": totals["acc5"],
            "val_images": totals["count"], "val_skipped_images": _count_across_ranks(len(skipped), settings),
            "val_time": time.perf_counter() - started}


def _count_across_ranks(count: int, settings: LoopSettings) -> int:
    return int(sum_across_ranks(torch.tensor([count], device=settings.device)).item())
