"""Counting and reporting: accuracy counts, running sums kept on the device, throughput,
log lines, ``metrics.jsonl`` and TensorBoard.

Sums stay on the device and are read (one synchronisation) only when a line is printed,
so the training step never waits for the host. The line formats are in docs/OUTPUTS.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from training import device as devices
from training.atomic import WriteError, describe_os_error
from training.distributed import sum_across_ranks
from training.progress import ConsoleHandler

log = logging.getLogger(__name__)


def correct_counts(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (on the device)."""
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return torch.stack([hits[:, :min(k, k_max)].any(dim=1).sum() for k in topk])


class RunningSums:
    """Loss sum and top-1/top-5 hits of an epoch, kept on the device between printed lines.

    Device accumulators are float32 (loss) and int64 (hits): the dtypes every collective
    backend accepts (HCCL has no float64). Each read moves them into float64/int totals on
    the host, so long epochs lose no precision. The sample count is known on the host.
    """

    def __init__(self, device: torch.device):
        self._loss = torch.zeros((), dtype=torch.float32, device=device)
        self._hits = torch.zeros(2, dtype=torch.int64, device=device)
        self.loss_sum = 0.0
        self.hits = [0, 0]
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        count = target.shape[0]
        self._loss += loss.detach().float() * count
        self._hits += correct_counts(logits.detach(), target)
        self.count += count

    def _flush(self) -> None:
        self.loss_sum += float(self._loss.item())
        top1, top5 = self._hits.tolist()
        self.hits = [self.hits[0] + top1, self.hits[1] + top5]
        self._loss.zero_()
        self._hits.zero_()

    def read(self, across_ranks: bool = False) -> dict[str, float]:
        """Mean loss and accuracies (percent); ``across_ranks`` sums every rank's counts first."""
        state = self.job_state_dict() if across_ranks else self._local_state()
        (top1, top5), count = state["hits"], state["count"]
        denominator = max(count, 1)
        return {"loss": state["loss_sum"] / denominator, "acc1": 100.0 * top1 / denominator,
                "acc5": 100.0 * top5 / denominator, "count": int(count)}

    def _local_state(self) -> dict[str, Any]:
        self._flush()
        return {"loss_sum": self.loss_sum, "hits": list(self.hits), "count": self.count}

    def job_state_dict(self) -> dict[str, Any]:
        """Every rank's totals so far, summed (all ranks call it together)."""
        self._flush()
        loss_sum = float(sum_across_ranks(torch.tensor([self.loss_sum], dtype=torch.float32,
                                                       device=self._loss.device)).item())
        top1, top5, count = sum_across_ranks(torch.tensor([*self.hits, self.count], dtype=torch.int64,
                                                          device=self._hits.device)).tolist()
        return {"loss_sum": loss_sum, "hits": [top1, top5], "count": count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.hits, self.count = float(state["loss_sum"]), list(state["hits"]), int(state["count"])


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
        """Call after the ``step``-th step (0-based) of this run of the loop was queued."""
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
        job = float(sum_across_ranks(torch.tensor([local], dtype=torch.float32, device=self.device)).item())
        return local, job


class StepClock:
    """Host-side step and data-wait times between printed lines."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()
        self.data_time = 0.0
        self.steps = 0

    def data_ready(self, waited: float) -> None:
        """A batch that is a whole step (validation)."""
        self.data_waited(waited)
        self.step_done()

    def data_waited(self, waited: float) -> None:
        self.data_time += waited

    def step_done(self) -> None:
        """One optimizer step, however many batches it accumulated."""
        self.steps += 1

    def read(self) -> tuple[float, float]:
        """(mean step time, mean data time) since the last read, after syncing the device."""
        devices.synchronize(self.device)
        now = time.perf_counter()
        steps = max(self.steps, 1)
        step_time, data_time = (now - self.last) / steps, self.data_time / steps
        self.last, self.data_time, self.steps = now, 0.0, 0
        return step_time, data_time


def train_line(epoch: int, step: int, steps: int, step_time: float, data_time: float,
               sums: dict[str, float], batch_images: int, lr: float) -> str:
    width = len(str(steps))
    images_per_second = batch_images / step_time if step_time > 0 else 0.0
    return (f"Epoch: [{epoch}][{step:>{width}}/{steps}]  Time {step_time:.3f}  Data {data_time:.3f}  "
            f"Loss {sums['loss']:.4f}  Acc@1 {sums['acc1']:7.3f}  Acc@5 {sums['acc5']:7.3f}  "
            f"img/s {images_per_second:.1f}  lr {lr:.5f}")


def epoch_line(epoch: int, totals: dict[str, float], replaced: int, skipped_steps: int, seconds: float) -> str:
    """The epoch summary; like every ``Epoch:`` line it has one ``Loss <value>`` (ModelZoo's parser)."""
    return (f"Epoch: [{epoch}] summary  Loss {totals['loss']:.4f}  Acc@1 {totals['acc1']:.3f}  "
            f"Acc@5 {totals['acc5']:.3f}  images {totals['count']}  replaced {replaced}  "
            f"skipped_steps {skipped_steps}  time {seconds:.1f}s")


def eval_line(step: int, steps: int, step_time: float, sums: dict[str, float]) -> str:
    width = len(str(steps))
    return (f"Test: [{step:>{width}}/{steps}]  Time {step_time:.3f}  Loss {sums['loss']:.4f}  "
            f"Acc@1 {sums['acc1']:7.3f}  Acc@5 {sums['acc5']:7.3f}")


# A validation loss this many times that of a uniform guess (ln of the class count) is no
# ordinary overfitting: the eval-mode outputs are huge (see explain_validation_loss).
UNSETTLED_LOSS_RATIO = 10.0


def explain_validation_loss(val_loss: float, train_loss: float, num_classes: int) -> None:
    """Say why a validation loss is far above any ordinary one, when it is (finite ones; a
    non-finite loss gets its own warning before the checkpoint is written)."""
    uniform = math.log(max(num_classes, 2))
    if math.isfinite(val_loss) and val_loss > UNSETTLED_LOSS_RATIO * uniform:
        log.info("note: validation loss %.4g is over %g times a uniform guess's (%.3g) while training's is %.4g: "
                 "in eval mode BatchNorm normalises with its running statistics, an average over the last steps, "
                 "which lag behind weights that still change fast (early epochs, few steps, a high learning rate), "
                 "so the outputs come out huge; this settles as training goes on and the learning rate decays",
                 val_loss, UNSETTLED_LOSS_RATIO, uniform, train_loss)


def accuracy_summary(acc1: float, acc5: float, weights: str = "") -> str:
    """ModelZoo's accuracy line: `grep '* Acc@1'` then the field after the last "Acc@1".

    The averaged weights' line (``weights="EMA"``) reads `` * EMA Acc@1 ...``, which that grep
    leaves out: the ModelZoo parsers keep reporting the raw model.
    """
    return f" * {weights + ' ' if weights else ''}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}"


def fps_summary(device: torch.device, fps: float) -> str:
    """ModelZoo's FPS line, ``[npu id: 0 ] * FPS@all <n>`` with the device really used:
    the value is field 7 and the last field (the ModelZoo scripts read it with both)."""
    return f"[{device.type} id: {device.index if device.index is not None else 0} ] * FPS@all {fps:.3f}"


# Where a record sits (its TensorBoard step), not a value to plot.
_POSITION_KEYS = ("epoch", "epochs", "step", "steps", "global_step")


class MetricsWriter:
    """Rank 0's ``metrics.jsonl`` and, when tensorboard is installed, its scalars.

    A ``metrics.jsonl`` that cannot be written stops the run (``WriteError``, one line); the
    TensorBoard copy of the same figures is dropped with a warning instead.
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._board = _open_tensorboard(output_dir) if enabled and tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                if stream.tell() and not self._ends_with_newline():
                    stream.write("\n")  # a line a full disk cut short stays a line of its own
                stream.write(json.dumps(record, sort_keys=False) + "\n")
        except OSError as error:
            raise WriteError(describe_os_error(self.path, error)) from None
        if self._board is not None:
            try:
                self._add_scalars(record)
            except OSError as error:
                self._drop_board(error)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as stream:
            stream.seek(-1, 2)
            return stream.read(1) == b"\n"

    def _add_scalars(self, record: dict[str, Any]) -> None:
        step = int(record.get("global_step", record.get("epoch", 0)))
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _POSITION_KEYS:
                self._board.add_scalar(f"{record.get('mode', 'train')}/{key}", value, step)
        self._board.flush()

    def _drop_board(self, error: OSError) -> None:
        log.warning("warning: the TensorBoard scalars are no longer written: %s",
                    describe_os_error(self.path.parent, error))
        board, self._board = self._board, None
        with contextlib.suppress(OSError):
            board.close()

    def records(self) -> list[dict[str, Any]]:
        """Everything in ``metrics.jsonl`` so far (a resumed run's earlier records too)."""
        return read_metrics(self.path) if self.enabled and self.path.is_file() else []

    def close(self) -> None:
        if self._board is not None:
            with contextlib.suppress(OSError):
                self._board.close()


def _quiet_board_thread_errors(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """tensorboard writes from a thread of its own, which would print a traceback when the disk
    is full: its OS errors become one warning line (the next flush drops the board)."""
    def hook(failure: Any) -> None:
        if isinstance(failure.exc_value, OSError) and type(failure.thread).__module__.startswith("tensorboard"):
            log.warning("warning: TensorBoard cannot write: %s", failure.exc_value.strerror or failure.exc_value)
        else:
            previous(failure)
    return hook


def _open_tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    if not getattr(threading.excepthook, "quiets_board_errors", False):
        threading.excepthook = _quiet_board_thread_errors(threading.excepthook)
        threading.excepthook.quiets_board_errors = True
    try:
        return SummaryWriter(log_dir=str(output_dir))
    except OSError as error:
        raise WriteError(describe_os_error(output_dir, error, "cannot write TensorBoard files into")) from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order; a line that is not one (a write cut
    short by a full disk) is skipped with a warning naming it."""
    records = []
    with Path(path).open(encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("warning: %s line %d is not a JSON record (a write cut short?): skipped", path, number)
    return records


class _RankFormatter(logging.Formatter):
    """Warnings and errors name their rank in a distributed job; progress lines (rank 0's
    INFO) stay bare, so that the ModelZoo parsers find their fields where they expect them."""

    def __init__(self, rank: int, distributed: bool):
        super().__init__("%(message)s")
        self.prefix = f"[rank {rank}] " if distributed else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return self.prefix + text if record.levelno >= logging.WARNING else text


def setup_logging(rank: int, world_size: int) -> None:
    """Rank 0 logs INFO, other ranks WARNING and above, all to stdout; every module logs
    through ``logging.getLogger(__name__)``."""
    handler = ConsoleHandler(sys.stdout)
    handler.setFormatter(_RankFormatter(rank, world_size > 1))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
