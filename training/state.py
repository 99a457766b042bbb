"""The training state: what a checkpoint holds, and the one place that restores it.

``TrainingState`` owns the model, optimizer and precision of a run and where the run
stands (epoch, step inside the epoch, best accuracy, seed). ``state_dict`` is the
checkpoint; ``restore`` applies the resume policy:

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

from models.loading import EMA_KEY, check_fits
from models.weights import extract_state_dict, load_weights
from training.checkpoint import FORMAT_VERSION, CheckpointError
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

    def state_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        identity = self.identity
        return {"format_version": FORMAT_VERSION, "arch": identity.arch, "epoch": self.epoch, "step": self.step,
                "steps_per_epoch": self.steps_per_epoch, "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.precision.state_dict(),
                "best_acc1": self.best_acc1, "num_classes": identity.num_classes,
                "class_names": list(identity.class_names), "image_size": identity.image_size,
                "model_options": dict(identity.model_options), "seed": self.seed, "layout": dict(self.layout),
                "epoch_sums": self.epoch_sums, "best_weights": self.best_weights, **self._average_state(),
                "args": args}

    def _average_state(self) -> dict[str, Any]:
        saved = self.average.state_dict()
        return {EMA_KEY: saved["weights"], "ema_updates": saved["updates"]} if saved else {}

    def restore(self, saved: dict[str, Any], source: Path, training: bool = True,
                start_epoch: int | None = None) -> None:
        """Continue from ``saved`` (a checkpoint read from ``source``).

        Args:
            training: also restore the optimizer and loss scaler (not needed to evaluate).
            start_epoch: an explicit ``--start-epoch``, which wins over the saved position.
        """
        check_fits(saved, source, self.identity.arch, self.identity.num_classes)
        load_weights(self.model, extract_state_dict(saved, str(source)), strict_head=True)
        self.epoch, self.step = int(saved.get("epoch", 0)), int(saved.get("step", 0))
        best = saved.get("best_acc1")
        self.best_acc1 = float(best) if best is not None else None
        self.best_weights = str(saved.get("best_weights", "model"))
        self.epoch_sums = saved.get("epoch_sums") if self.step else None
        if training:
            self._restore_optimization(saved, source)
            self._map_step(saved)
        if start_epoch is not None:
            self.epoch, self.step, self.epoch_sums = start_epoch, 0, None
        where = f"epoch {self.epoch}" + (f", step {self.step} of {self.steps_per_epoch}" if self.step else "")
        best = f"{self.best_acc1:.3f}" if self.best_acc1 is not None else "none yet"
        log.info("resumed from %s: %s, best Acc@1 %s", source, where, best)

    def _restore_optimization(self, saved: dict[str, Any], source: Path) -> None:
        if saved.get("optimizer") is None:
            raise CheckpointError(f"{source} has no optimizer state to resume training from; "
                                  f"use it with --pretrained instead")
        saved_kind = (saved.get("args") or {}).get("opt", "sgd")
        if saved_kind == self.optimizer_settings.kind:
            load_optimizer_state(self.optimizer, saved["optimizer"])
        else:
            log.info("note: the optimizer changed from %s to %s: its state starts fresh", saved_kind,
                     self.optimizer_settings.kind)
        apply_settings(self.optimizer, self.optimizer_settings)
        self.precision.load_state_dict(saved.get("scaler"))
        if saved.get(EMA_KEY) is not None and saved.get("ema_updates") is not None:
            self.average.load_state_dict({"weights": saved[EMA_KEY], "updates": saved["ema_updates"]})

    def _map_step(self, saved: dict[str, Any]) -> None:
        saved_steps = int(saved.get("steps_per_epoch") or self.steps_per_epoch)
        if not self.step or saved_steps == self.steps_per_epoch:
            return
        mapped = min(round(self.step / saved_steps * self.steps_per_epoch), self.steps_per_epoch)
        log.info("steps per epoch changed from %d to %d: resuming at step %d, the same fraction of the epoch",
                 saved_steps, self.steps_per_epoch, mapped)
        self.step = mapped
