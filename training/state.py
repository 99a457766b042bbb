"""The training state: what a checkpoint holds, and the one place that restores it.

``TrainingState`` owns the model, optimizer and precision of a run and where the run
stands (epoch, step inside the epoch, best accuracy, seed). ``checkpoint`` is what its
checkpoint holds (the schema is ``training.checkpoint.Checkpoint``); ``restore`` applies the
resume policy:

* the weights, optimizer moments, loss scaler, position and best accuracy come from the
  checkpoint; the options the run uses were already resolved (``training.config``: typed
  options win, the rest come from the checkpoint), and are written back into the
  optimizer, whose saved state would otherwise put the old values back;
* an explicit ``--start-epoch`` overrides the checkpoint's position (as in timm);
* a mid-epoch checkpoint resumes at its step. When the steps per epoch changed (another
  world size, ``-b`` or ``--max-steps``), it resumes at the same fraction of the epoch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from models.weights import WeightsError, load_weights
from training.checkpoint import Checkpoint, CheckpointError
from training.averaging import NoAverage
from training.optim import OptimizerSettings, apply_settings, load_optimizer_state
from training.precision import Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint says about the model it holds (read by demo, export and resume)."""

    arch: str
    num_classes: int
    class_names: list[str]
    image_size: int
    model_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingState:
    """A run's trainable objects and its position.

    Attributes:
        epoch: completed epochs; training continues with epoch ``epoch``.
        step: steps of epoch ``epoch`` already done (a mid-epoch checkpoint), else 0.
        epoch_sums: the running loss/accuracy sums of that partial epoch, job-wide.
    """

    model: nn.Module  # the bare model, never the DDP or compile wrapper
    optimizer: Any
    precision: Precision
    optimizer_settings: OptimizerSettings
    identity: RunIdentity
    seed: int
    steps_per_epoch: int
    layout: dict[str, int]  # world_size, batch_size (per device) and accum_steps of this run
    average: Any = field(default_factory=NoAverage)  # the weight average (ModelEma), if kept
    epoch: int = 0
    step: int = 0
    best_acc1: float | None = None  # None until an epoch has been validated
    best_weights: str = "model"  # which weights reached best_acc1: "model", or "ema" (the average)
    is_best: bool = False
    epoch_sums: dict[str, Any] | None = None

    def finish_epoch(self, epoch: int, acc1: float, weights: str = "model") -> None:
        """Epoch ``epoch`` is done; ``acc1`` is its best validation Acc@1, of ``weights``."""
        self.is_best = self.best_acc1 is None or acc1 > self.best_acc1
        if self.is_best:
            self.best_acc1, self.best_weights = acc1, weights
        self.epoch, self.step, self.epoch_sums = epoch, 0, None

    def checkpoint(self, options: dict[str, Any]) -> Checkpoint:
        """What a checkpoint of this state holds; ``options``: the run's, as plain values."""
        identity, average = self.identity, self.average.state_dict()
        return Checkpoint(
            weights=self.model.state_dict(), arch=identity.arch, epoch=self.epoch, step=self.step,
            steps_per_epoch=self.steps_per_epoch, epoch_sums=self.epoch_sums, optimizer=self.optimizer.state_dict(),
            scaler=self.precision.state_dict(), best_acc1=self.best_acc1, best_weights=self.best_weights,
            num_classes=identity.num_classes, class_names=list(identity.class_names), image_size=identity.image_size,
            model_options=dict(identity.model_options), seed=self.seed, layout=dict(self.layout),
            ema_weights=average["weights"] if average else None, ema_updates=average["updates"] if average else None,
            options=options)

    def restore(self, saved: Checkpoint, source: Path, training: bool = True,
                start_epoch: int | None = None) -> None:
        """Continue from ``saved`` (a checkpoint read from ``source``).

        Args:
            training: also restore the optimizer, loss scaler and weight average (not needed to
                evaluate).
            start_epoch: an explicit ``--start-epoch``, which wins over the saved position.
        """
        saved.check_fits(source, self.identity.arch, self.identity.num_classes)
        try:
            load_weights(self.model, saved.weights, strict_head=True)
        except WeightsError as error:
            raise CheckpointError(f"{source}: {error}") from None
        self.epoch, self.step = saved.epoch, saved.step
        self.best_acc1, self.best_weights = saved.best_acc1, saved.best_weights or "model"
        self.epoch_sums = saved.epoch_sums if self.step else None
        if training:
            self._restore_optimization(saved, source)
            self._map_step(saved)
        if start_epoch is not None:
            self.epoch, self.step, self.epoch_sums = start_epoch, 0, None
        where = f"epoch {self.epoch}" + (f", step {self.step} of {self.steps_per_epoch}" if self.step else "")
        best = f"{self.best_acc1:.3f}" if self.best_acc1 is not None else "none yet"
        log.info("resumed from %s: %s, best Acc@1 %s", source, where, best)

    def _restore_optimization(self, saved: Checkpoint, source: Path) -> None:
        if saved.optimizer is None:
            raise CheckpointError(f"{source} has no optimizer state to resume training from; "
                                  f"use it with --pretrained instead")
        saved_kind = saved.options.get("opt", "sgd")
        if saved_kind == self.optimizer_settings.kind:
            try:
                load_optimizer_state(self.optimizer, saved.optimizer)
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                raise CheckpointError(f"{source}: its optimizer state does not fit this run's optimizer "
                                      f"({str(error).strip().splitlines()[0]}); use it with --pretrained") from None
        else:
            log.info("note: the optimizer changed from %s to %s: its state starts fresh", saved_kind,
                     self.optimizer_settings.kind)
        apply_settings(self.optimizer, self.optimizer_settings)
        self.precision.load_state_dict(saved.scaler)
        if saved.ema_weights is not None and saved.ema_updates is not None:
            self.average.load_state_dict({"weights": saved.ema_weights, "updates": saved.ema_updates})

    def _map_step(self, saved: Checkpoint) -> None:
        saved_steps = saved.steps_per_epoch or self.steps_per_epoch
        if not self.step or saved_steps == self.steps_per_epoch:
            return
        mapped = min(round(self.step / saved_steps * self.steps_per_epoch), self.steps_per_epoch)
        log.info("steps per epoch changed from %d to %d: resuming at step %d, the same fraction of the epoch",
                 saved_steps, self.steps_per_epoch, mapped)
        self.step = mapped
