"""Training curves as a picture: loss, accuracy (raw and averaged weights), learning rate and
throughput of one or more runs, from their ``metrics.jsonl`` records.

main.py rewrites ``curves.png`` in its output folder after every epoch; ``plot_metrics.py``
draws several runs on one figure to compare them. Needs matplotlib (requirements.txt);
without it main.py says so once and goes on.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from training.atomic import WriteError, replace_file

log = logging.getLogger(__name__)

PANELS = (("loss", "loss"), ("accuracy", "Acc@1 (%)"), ("learning rate", "lr"), ("throughput", "images/s"))


def _series(records: list[dict[str, Any]], mode: str, key: str, x: str = "epoch") -> tuple[list, list]:
    points = [(record[x], record[key]) for record in records if record.get("mode") == mode and key in record]
    return [p[0] for p in points], [p[1] for p in points]


def _draw_run(axes: Any, name: str, records: list[dict[str, Any]]) -> None:
    prefix = f"{name}: " if name else ""
    steps = [r for r in records if r.get("mode") == "step"]
    per_epoch = max((r["steps"] for r in steps), default=1)
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val, EMA")):
        xs, ys = _series(records, "train", key)
        if xs:
            axes[0].plot(xs, ys, marker="o", label=prefix + label)
    for key, label in (("train_acc1", "train"), ("val_acc1", "val"), ("ema_val_acc1", "val, EMA")):
        xs, ys = _series(records, "train", key)
        if xs:
            axes[1].plot(xs, ys, marker="o", label=prefix + label)
    xs, ys = _series(records, "step", "lr", x="global_step")
    axes[2].plot([x / per_epoch for x in xs], ys, label=prefix + "lr")
    xs, ys = _series(records, "train", "fps")
    axes[3].plot(xs, ys, marker="o", label=prefix + "job")


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Draw ``{name: records}`` (one name may be empty) into the PNG ``path``, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, grid = pyplot.subplots(2, 2, figsize=(12, 7.5))
    axes = grid.ravel()
    for name, records in runs.items():
        _draw_run(axes, name, records)
    for axis, (title, unit) in zip(axes, PANELS):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    try:
        return replace_file(path, lambda stream: figure.savefig(stream, format="png", dpi=90))
    finally:
        pyplot.close(figure)


class CurvesWriter:
    """Rewrites ``curves.png`` from ``metrics.jsonl`` after every epoch (rank 0)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.output_dir = output_dir
        self.enabled = enabled

    def update(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        try:
            plot_runs({"": records}, self.output_dir / "curves.png")
        except ImportError:
            log.warning("warning: curves.png is not drawn: matplotlib is not installed (pip install matplotlib)")
            self.enabled = False
        except WriteError as error:  # a picture is not worth stopping the run for; the checkpoints say the rest
            log.warning("warning: curves.png is not drawn: %s", error)
