"""Counting and reporting: accuracy counts, running sums kept on the device, throughput,
log lines, ``metrics.jsonl`` and TensorBoard.

Sums stay on the device and are read (one synchronisation) only when a line is printed,
so the training step never waits for the host. The line formats are in docs/OUTPUTS.md.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training import device as devices
from training.distributed import sum_across_ranks

log = logging.getLogger("training")


def correct_counts(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (on the device)."""
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return torch.stack([hits[:, :min(k, k_max)].any(dim=1).sum() for k in topk])


class RunningSums:
    """Loss sum and top-1/top-5 hits accumulated on the device; the sample count on the host
    (batch sizes are known there, so no host-to-device copy is needed per step)."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        count = target.shape[0]
        hits = correct_counts(logits.detach(), target).double()
        self.totals += torch.cat([loss.detach().double().reshape(1) * count, hits])
        self.count += count

    def read(self, across_ranks: bool = False) -> dict[str, float]:
        """Mean loss and accuracies (percent); ``across_ranks`` sums every rank's counts first."""
        totals = torch.cat([self.totals, self.totals.new_tensor([float(self.count)])])
        if across_ranks:
            totals = sum_across_ranks(totals)
        loss_sum, top1, top5, count = totals.tolist()
        denominator = max(count, 1.0)
        return {"loss": loss_sum / denominator, "acc1": 100.0 * top1 / denominator,
                "acc5": 100.0 * top5 / denominator, "count": int(count)}


class Throughput:
    """Images per second after the first ``warmup_steps`` steps of an epoch.

    The clock starts (with one device synchronisation) when the warm-up ends and is read
    at the end of the epoch, so compilation and cache warm-up are left out.
    """

    def __init__(self, device: torch.device, warmup_steps: int, total_steps: int):
        self.device = device
        # An epoch shorter than the warm-up still measures its second half.
        self.warmup_steps = min(warmup_steps, total_steps // 2)
        self.images = 0
        self.start: float | None = None

    def begin(self) -> None:
        """Call before the first step of the epoch."""
        if self.warmup_steps == 0:
            self.start = time.perf_counter()

    def step_done(self, step: int, batch_images: int) -> None:
        """Call after step ``step`` (0-based) was queued."""
        if step >= self.warmup_steps:
            self.images += batch_images
        elif step + 1 == self.warmup_steps:
            devices.synchronize(self.device)
            self.start = time.perf_counter()

    def images_per_second(self) -> tuple[float, float]:
        """(this process, the whole job); call on every rank at the end of the epoch."""
        devices.synchronize(self.device)
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        local = self.images / elapsed if elapsed > 0 else 0.0
        job = float(sum_across_ranks(torch.tensor([local], dtype=torch.float64, device=self.device)).item())
        return local, job


class StepClock:
    """Host-side step and data-wait times between printed lines."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()
        self.data_time = 0.0
        self.steps = 0

    def data_ready(self, waited: float) -> None:
        self.data_time += waited
        self.steps += 1

    def read(self) -> tuple[float, float]:
        """(mean step time, mean data time) since the last read, after syncing the device."""
        devices.synchronize(self.device)
        now = time.perf_counter()
        steps = max(self.steps, 1)
        step_time, data_time = (now - self.last) / steps, self.data_time / steps
        self.last, self.data_time, self.steps = now, 0.0, 0
        return step_time, data_time


class Progress:
    """A one-line progress bar on a terminal, plain log lines in a log file."""

    def __init__(self, mode: str = "auto", enabled: bool = True):
        self.bar = enabled and (mode == "bar" or (mode == "auto" and sys.stdout.isatty()))
        self._open_line = False

    def line(self, text: str) -> None:
        if self.bar:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            self._open_line = True
        else:
            log.info(text)

    def close(self) -> None:
        if self._open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._open_line = False


def train_line(epoch: int, step: int, steps: int, step_time: float, data_time: float,
               sums: dict[str, float], batch_images: int, lr: float) -> str:
    width = len(str(steps))
    images_per_second = batch_images / step_time if step_time > 0 else 0.0
    return (f"Epoch: [{epoch}][{step:>{width}}/{steps}]  Time {step_time:.3f}  Data {data_time:.3f}  "
            f"Loss {sums['loss']:.4f}  Acc@1 {sums['acc1']:7.3f}  Acc@5 {sums['acc5']:7.3f}  "
            f"img/s {images_per_second:.1f}  lr {lr:.5f}")


def eval_line(step: int, steps: int, step_time: float, sums: dict[str, float]) -> str:
    width = len(str(steps))
    return (f"Test: [{step:>{width}}/{steps}]  Time {step_time:.3f}  Loss {sums['loss']:.4f}  "
            f"Acc@1 {sums['acc1']:7.3f}  Acc@5 {sums['acc5']:7.3f}")


def accuracy_summary(acc1: float, acc5: float) -> str:
    return f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}"


def fps_summary(fps: float) -> str:
    return f" * FPS@all {fps:.3f}"


class MetricsWriter:
    """Rank 0's ``metrics.jsonl`` and, when tensorboard is installed, its scalars."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._board = _open_tensorboard(output_dir) if enabled and tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, sort_keys=False) + "\n")
        if self._board is not None:
            step = int(record.get("epoch", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self._board.add_scalar(f"{record.get('mode', 'train')}/{key}", value, step)
            self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def _open_tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(output_dir))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    with Path(path).open(encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def setup_logging(rank: int, world_size: int) -> None:
    """Rank 0 logs INFO; other ranks WARNING and above; every line names its rank when distributed."""
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
