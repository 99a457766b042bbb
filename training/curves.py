"""Training curves as a picture: loss, accuracy (raw and averaged weights), learning rate and
throughput of one or more runs, from their ``metrics.jsonl`` records.

main.py rewrites ``curves.png`` in its output folder after every epoch; ``plot_metrics.py``
draws several runs on one figure to compare them. Needs matplotlib (requirements.txt);
without it main.py says so once and goes on.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from training.atomic import WriteError, replacing

log = logging.getLogger(__name__)

PANELS = (("loss", "loss (log scale)"), ("accuracy", "Acc@1 (%)"), ("learning rate", "lr"),
          ("throughput", "images/s"))
# Within one run, a series is told apart by its line and marker; across runs, by its colour.
SERIES_STYLES = {"train": dict(linestyle="-", marker="o"), "val": dict(linestyle="--", marker="s"),
                 "val, EMA": dict(linestyle=":", marker="^")}


def _series(records: list[dict[str, Any]], mode: str, key: str, x: str = "epoch",
            positive: bool = False) -> tuple[list, list]:
    """The (x, value) points of ``key`` in the ``mode`` records, finite ones only (a NaN loss has no
    place on an axis), and above 0 with ``positive`` (a log axis)."""
    points = [(record[x], record[key]) for record in records
              if record.get("mode") == mode and isinstance(record.get(key), (int, float))
              and math.isfinite(record[key]) and (record[key] > 0 or not positive)]
    return [p[0] for p in points], [p[1] for p in points]


def _draw_run(axes: Any, name: str, records: list[dict[str, Any]], colour: str) -> None:
    prefix = f"{name}: " if name else ""
    steps = [r for r in records if r.get("mode") == "step"]
    per_epoch = max((r["steps"] for r in steps), default=1)
    for panel, keys, log_axis in ((axes[0], ("train_loss", "val_loss", "ema_val_loss"), True),
                                  (axes[1], ("train_acc1", "val_acc1", "ema_val_acc1"), False)):
        for key, label in zip(keys, SERIES_STYLES):
            xs, ys = _series(records, "train", key, positive=log_axis)
            if xs:
                panel.plot(xs, ys, color=colour, label=prefix + label, **SERIES_STYLES[label])
    xs, ys = _series(records, "step", "lr", x="global_step")
    if xs:
        axes[2].plot([x / per_epoch for x in xs], ys, color=colour, marker=".", label=prefix + "lr")
    xs, ys = _series(records, "train", "fps")
    if xs:
        axes[3].plot(xs, ys, color=colour, marker="o", label=prefix + "job")


def draw_runs(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """The figure of ``{name: records}`` (one name may be empty): four panels, one colour per run."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import LogFormatter, MaxNLocator

    figure = Figure(figsize=(12, 7.5))
    axes = figure.subplots(2, 2).ravel()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, records) in enumerate(runs.items()):
        _draw_run(axes, name, records, colours[index % len(colours)])
    # One spike (an early validation loss of 2e4) must not flatten every other loss.
    axes[0].set_yscale("log")
    # Plain-text tick labels: the default ones are mathtext, whose parser caches exceptions, and
    # with them every frame of the call stack (the training loop's, loaders included), for good.
    axes[0].yaxis.set_major_formatter(LogFormatter())
    axes[0].yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    for axis, (title, unit) in zip(axes, PANELS):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3, which="both" if axis is axes[0] else "major")
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Draw ``{name: records}`` into the PNG ``path``, atomically."""
    path = Path(path)
    figure = draw_runs(runs)
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=90, format="png")
    return path


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
