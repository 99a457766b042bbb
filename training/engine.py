"""The training step and the evaluation pass.

Both take explicit objects (model, batches, loss, optimizer, schedule, precision...) and
return a dict of metrics; neither reads the command line. The step has one path: seed,
learning rate, then for each of its ``accum_steps`` batches: mix, forward under autocast,
loss, backward (without a gradient all-reduce but for the last); then optional unscale +
clip, optimizer step, weight averaging. A ``StepControl`` (the run's) is asked after every
step whether to stop (preemption) and may write a mid-epoch checkpoint meanwhile.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Protocol

import torch
from torch import nn

from models.errors import UserError
from training.distributed import sum_across_ranks
from training.averaging import NoAverage
from training.metrics import (RunningSums, StepClock, Throughput, accuracy_summary, epoch_line, eval_line,
                              fps_summary, train_line)
from training.data.mixing import keep_batch
from training.precision import Precision
from training.progress import Display, Progress
from training.schedule import LrSchedule
from training.seeding import seed_step

log = logging.getLogger(__name__)

SKIPPED_STEPS_WARNING = 0.01  # warn when more than 1 % of an epoch's steps overflowed


class NonFiniteLossError(UserError):
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
    seed: int = 0
    rank: int = 0
    print_freq: int = 10
    fps_warmup_steps: int = 5
    clip_grad: float | None = None
    zero_grad_to_none: bool = True  # torch_npu's fused SGD needs gradients kept (False)
    progress: str = "auto"  # training.progress.MODES
    show_progress: bool = True

    @property
    def display(self) -> Display:
        return Display(self.progress, self.show_progress)


@dataclass(frozen=True)
class StepParts:
    """What an optimizer step adds to forward, backward and update; each defaults to nothing.

    Attributes:
        accum_steps: batches whose gradients are summed per optimizer step.
        no_sync: context in which a backward skips the gradient all-reduce (DDP's
            ``no_sync``); used for every batch of a step but the last.
        mix: ``(images, labels) -> (images, loss targets)``: MixUp/CutMix, or none.
        average: the weight average (``ModelEma``) updated after each optimizer step.
        averaged_model: the bare model the average follows.
    """

    accum_steps: int = 1
    no_sync: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    mix: Callable = keep_batch
    average: Any = field(default_factory=NoAverage)
    averaged_model: nn.Module | None = None


@dataclass(frozen=True)
class EpochPosition:
    """Which epoch, how many of its steps are already done (a resumed epoch), and how many it has."""

    epoch: int
    steps: int
    start_step: int = 0


class StepControl(Protocol):
    def after_step(self, position: EpochPosition, steps_done: int, sums: RunningSums) -> bool:
        """Called on every rank after every step; True stops the epoch there."""


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


def _note_replaced(paths: list[str], replaced: list[str]) -> None:
    for path in paths:
        log.warning("replaced unreadable image: %s", path)
    replaced.extend(paths)


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


def check_weights_before_saving(model: nn.Module, val_loss: float, epoch: int) -> None:
    """Never write a checkpoint of non-finite weights (the last good one is kept); warn when
    the validation loss alone is not finite (eval-mode BatchNorm statistics not settled yet)."""
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in model.state_dict().values()
                          if tensor.is_floating_point()]).all()
    if not bool(finite):
        raise NonFiniteLossError(f"the weights became non-finite during epoch {epoch}: this epoch is not saved "
                                 f"and the last checkpoint is kept. Lower --lr or add --clip-grad")
    if not math.isfinite(val_loss):
        log.warning("warning: the validation loss of epoch %d is %s: the model's outputs overflow in eval mode "
                    "(BatchNorm statistics not settled after few steps, or training diverging)", epoch, val_loss)


def _warn_skipped_steps(skipped: int, steps: int, epoch: int, precision: Precision) -> None:
    if steps and skipped > SKIPPED_STEPS_WARNING * steps:
        log.warning("warning: %d of %d steps (%.1f%%) of epoch %d were skipped because the fp16 gradients "
                    "overflowed (%s): use --loss-scale dynamic, or a lower --loss-scale",
                    skipped, steps, 100.0 * skipped / steps, epoch, precision.description)


def train_one_epoch(model: nn.Module, loader: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                    schedule: LrSchedule, precision: Precision, position: EpochPosition, settings: LoopSettings,
                    sums: RunningSums | None = None, control: StepControl | None = None,
                    report: Callable[[dict[str, Any]], None] | None = None,
                    parts: StepParts | None = None) -> dict[str, Any]:
    """Train the optimizer steps of ``position`` left to do; returns the epoch's metrics.

    Args:
        sums: the epoch's running sums so far (a resumed epoch), else new ones.
        report: receives one record per printed step (metrics.jsonl's ``step`` records).
        parts: accumulation, batch mixing and weight averaging (none by default).
    """
    parts = parts or StepParts()
    model.train()
    epoch, steps = position.epoch, position.steps
    sums = sums if sums is not None else RunningSums(settings.device)
    clock = StepClock(settings.device)
    throughput = Throughput(settings.device, settings.fps_warmup_steps, steps - position.start_step)
    progress = Progress(steps, f"Epoch {epoch}", display=settings.display, done=position.start_step)
    replaced: list[str] = []
    unchecked: list[torch.Tensor] = []
    first_unchecked, step, interrupted = position.start_step, position.start_step - 1, False
    batches = iter(_batches(loader, (steps - position.start_step) * parts.accum_steps))
    started = time.perf_counter()
    throughput.begin()
    for offset in range(steps - position.start_step):
        step = position.start_step + offset
        seed_step(settings.seed, epoch, step, settings.rank)
        lr = schedule.apply(optimizer, epoch, step, steps)
        optimizer.zero_grad(set_to_none=settings.zero_grad_to_none)
        done = _accumulate(model, batches, loss_fn, optimizer, precision, parts, sums, clock, replaced, unchecked)
        if done is None:  # the loader ran out of batches before this step
            step -= 1
            break
        clock.step_done()
        if settings.clip_grad:
            precision.unscale(optimizer)
            nn.utils.clip_grad_norm_(precision.clip_parameters(model, optimizer), settings.clip_grad)
        applied = precision.step(optimizer)
        parts.average.update(parts.averaged_model, applied)
        throughput.step_done(offset, done)
        if (step + 1) % settings.print_freq == 0 or step + 1 == steps:
            _check_finite(unchecked, first_unchecked, epoch)
            unchecked, first_unchecked = [], step + 1
            step_time, data_time = clock.read()
            running = sums.read()
            images_per_second = done / step_time if step_time > 0 else 0.0
            progress.report(train_line(epoch, step + 1, steps, step_time, data_time, running, done, lr),
                            loss=f"{running['loss']:.4g}", acc1=f"{running['acc1']:.1f}",
                            img_s=f"{images_per_second:.1f}", lr=f"{lr:.3g}")
            if report is not None:
                report({"mode": "step", "epoch": epoch, "step": step + 1, "steps": steps,
                        "global_step": epoch * steps + step + 1, "loss": running["loss"], "lr": lr,
                        "images_per_second": images_per_second})
        progress.advance()
        if control is not None and control.after_step(position, step + 1, sums):
            interrupted = True
            break
    progress.close()
    _check_finite(unchecked, first_unchecked, epoch)
    fps_local, fps_job = throughput.images_per_second()
    skipped_steps = precision.take_skipped_steps()
    if interrupted:
        return {"interrupted": True, "train_steps": step + 1}
    totals = sums.read(across_ranks=True)
    replaced_count = _count_across_ranks(len(replaced), settings)
    elapsed = time.perf_counter() - started
    log.info(epoch_line(epoch, totals, replaced_count, skipped_steps, elapsed))
    log.info(fps_summary(settings.device, fps_job))
    _warn_skipped_steps(skipped_steps, step + 1 - position.start_step, epoch, precision)
    return {"interrupted": False, "train_loss": totals["loss"], "train_acc1": totals["acc1"],
            "train_acc5": totals["acc5"], "train_steps": step + 1, "train_images": totals["count"],
            "replaced_images": replaced_count, "skipped_steps": skipped_steps, "fps": fps_job,
            "fps_per_device": fps_local, "epoch_time": elapsed, "lr": optimizer.param_groups[0]["lr"]}


def _accumulate(model: nn.Module, batches: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                precision: Precision, parts: StepParts, sums: RunningSums, clock: StepClock,
                replaced: list[str], unchecked: list[torch.Tensor]) -> int | None:
    """Forward and backward the batches of one optimizer step; the images they held (None: the
    loader ran out before the step was complete, which is then dropped: its last backward ran
    under ``no_sync``)."""
    images_done = 0
    step_loss = None
    for index in range(parts.accum_steps):
        try:
            waited, (images, target, replaced_paths) = next(batches)
        except StopIteration:
            return None
        clock.data_waited(waited)
        _note_replaced(replaced_paths, replaced)
        mixed, loss_target = parts.mix(images, target)
        last = index + 1 == parts.accum_steps
        with contextlib.nullcontext() if last else parts.no_sync():
            with precision.autocast():
                loss, logits = loss_fn(model(mixed), loss_target)
            precision.backward(loss / parts.accum_steps if parts.accum_steps > 1 else loss, optimizer)
        sums.add(loss, logits, target)
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        images_done += images.shape[0]
    if not precision.skips_nonfinite_steps:
        unchecked.append(step_loss)  # one per optimizer step: non-finite if any batch's loss was
    return images_done


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, criterion: Callable, precision: Precision,
             settings: LoopSettings, averaged: bool = False) -> dict[str, Any]:
    """Validate on every image of ``loader`` once (each rank its own shard); job-wide metrics.

    ``model`` must be the bare model, not the DDP wrapper: ranks may hold different
    numbers of batches, and DDP's forward would wait for the others. ``averaged``: the
    weights are the EMA's (its summary line says so, and the ModelZoo parser skips it).
    """
    model.eval()
    started = time.perf_counter()
    steps = len(loader)
    sums, clock = RunningSums(settings.device), StepClock(settings.device)
    progress = Progress(steps, "Test", unit="batch", display=settings.display)
    replaced: list[str] = []
    for step, (waited, (images, target, replaced_paths)) in enumerate(_batches(loader, steps)):
        clock.data_ready(waited)
        _note_replaced(replaced_paths, replaced)
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, target)
        sums.add(loss, logits, target)
        if (step + 1) % settings.print_freq == 0 or step + 1 == steps:
            running = sums.read()
            progress.report(eval_line(step + 1, steps, clock.read()[0], running), loss=f"{running['loss']:.4g}",
                            acc1=f"{running['acc1']:.1f}")
        progress.advance()
    progress.close()
    totals = sums.read(across_ranks=True)
    log.info(accuracy_summary(totals["acc1"], totals["acc5"], "EMA" if averaged else ""))
    return {"val_loss": totals["loss"], "val_acc1": totals["acc1"], "val_acc5": totals["acc5"],
            "val_images": totals["count"], "val_replaced_images": _count_across_ranks(len(replaced), settings),
            "val_time": time.perf_counter() - started}


def _count_across_ranks(count: int, settings: LoopSettings) -> int:
    return int(sum_across_ranks(torch.tensor([count], dtype=torch.int64, device=settings.device)).item())
