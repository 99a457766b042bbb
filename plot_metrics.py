"""Draw the training curves of one or more runs on one figure, to compare them.

    python plot_metrics.py output/metrics.jsonl                      # -> curves.png
    python plot_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl -o compare.png

Each run is named after its folder. Panels: loss, Acc@1 (raw and averaged weights), learning
rate and throughput, per epoch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.curves import plot_runs
from training.metrics import read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", metavar="METRICS_JSONL", help="metrics.jsonl files of the runs")
    parser.add_argument("-o", "--output", default="curves.png", metavar="PNG", help="picture to write")
    args = parser.parse_args(argv)
    runs = {}
    for text in args.metrics:
        path = Path(text)
        if not path.is_file():
            print(f"error: no such metrics file: {path}", file=sys.stderr)
            return 1
        runs[path.parent.name or str(path)] = read_metrics(path)
    print(f"wrote {plot_runs(runs, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
