"""Draw the training curves of one or more runs on one figure, to compare them.

    python plot_metrics.py output/metrics.jsonl                      # -> curves.png
    python plot_metrics.py runs/a/metrics.jsonl runs/b -o compare.png   # a run folder works too

Each run is named after its folder and keeps one colour in every panel. Panels: loss (log
scale), Acc@1 (raw and averaged weights), learning rate and throughput, per epoch; every point
is marked, so a run of one epoch shows too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.curves import plot_runs
from training.metrics import read_metrics

METRICS_NAME = "metrics.jsonl"


def _metrics_file(text: str) -> Path:
    path = Path(text)
    return path / METRICS_NAME if path.is_dir() else path


def _run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, or more of its path where two runs' folders share a name."""
    names = [path.parent.name or str(path) for path in paths]
    if len(set(names)) < len(names):
        names = [str(path.parent) for path in paths]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_metrics.py", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", metavar="METRICS_JSONL",
                        help="metrics.jsonl files of the runs, or the runs' output folders")
    parser.add_argument("-o", "--output", default="curves.png", metavar="PNG", help="picture to write")
    args = parser.parse_args(argv)
    paths = [_metrics_file(text) for text in args.metrics]
    runs = {}
    for name, path in zip(_run_names(paths), paths):
        if not path.is_file():
            print(f"error: no such metrics file: {path}", file=sys.stderr)
            return 1
        # A line cut short (a full disk) is skipped with a warning; a file without one record is refused.
        records = [record for record in read_metrics(path) if isinstance(record, dict) and "mode" in record]
        if not records:
            print(f"error: {path} is not a metrics.jsonl file (no JSON object per line with a \"mode\" in it)",
                  file=sys.stderr)
            return 1
        runs[name] = records
    print(f"wrote {plot_runs(runs, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
