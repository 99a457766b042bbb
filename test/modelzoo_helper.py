"""Python side of the ModelZoo launch scripts (test/common.sh): plan a run, summarise it.

``plan`` checks main.py's options with main.py's own parser, counts the devices and prints
``key=value`` lines (arch, batch size, processes, device type) that name the run before it
starts. ``summary`` reads the run's ``metrics.jsonl`` and writes the ModelZoo files
(``<CaseName>.log``, ``train_<CaseName>_loss.txt``) and the final console lines.
Not meant to be run by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LOCAL_PROCESSES = 8  # the "8p" scripts: one process per device, at most 8 per node


def detect_devices() -> tuple[str, int]:
    """The accelerator main.py's ``--device auto`` would pick, and how many this node has."""
    sys.path.insert(0, str(REPO))
    from training import device as devices

    for kind in ("npu", "cuda"):
        count = devices.device_count(kind)
        if count:
            return kind, count
    return ("mps", 1) if devices.is_available("mps") else ("cpu", 0)


def plan(options: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from training.options import parse_args, resolve_recipe

    args = parse_args(options.main_args)  # main.py's parser: exits 2 with its message when wrong
    device_type, count = detect_devices()
    if args.device != "auto":
        device_type, count = args.device, (count if args.device == device_type else 0)
    if options.launcher == "python":
        nproc = 1
    elif options.nproc:
        nproc = options.nproc
    else:  # no accelerator: still the scripts' 8 processes unless RANK_SIZE/--nproc says otherwise
        nproc = min(count, MAX_LOCAL_PROCESSES) if count else MAX_LOCAL_PROCESSES
    world_size = nproc * options.nnodes
    args = resolve_recipe(args, world_size)
    for key, value in (("arch", args.arch), ("batch_size", args.batch_size), ("nproc", nproc),
                       ("world_size", world_size), ("device_type", device_type), ("device_count", count)):
        print(f"{key}={value}")
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary(options: argparse.Namespace) -> int:
    path = Path(options.metrics)
    if not path.is_file():
        print(f"error: {path} was not written; the run produced no metrics", file=sys.stderr)
        return 1
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    mode = "evaluate" if options.kind == "eval" else "train"
    records = [r for r in records if r.get("mode") == mode]
    if not records:
        print(f"error: {path} holds no '{mode}' record", file=sys.stderr)
        return 1
    last = records[-1]
    world_size = int(last.get("world_size", options.rank_size))
    batch_size = int(last.get("batch_size", options.batch_size))
    global_batch = int(last.get("global_batch_size", batch_size * world_size))
    if mode == "train":
        fps = _mean([float(r["fps"]) for r in records if r.get("fps")])
        loss = float(last["train_loss"])
        accuracy = float(last.get("val_acc1", last["train_acc1"]))
        losses = [float(r["train_loss"]) for r in records]
    else:
        images = float(last.get("val_images", 0))
        seconds = float(last.get("val_time") or options.e2e)  # end to end: a lower bound on speed
        fps = float(last.get("val_fps") or (images / seconds if seconds > 0 else math.nan))
        loss = float(last["val_loss"])
        accuracy = float(last["val_acc1"])
        losses = [loss]
    step_ms = global_batch * 1000.0 / fps if fps > 0 else math.nan

    lines = {
        "Network": last.get("arch", options.arch),
        "RankSize": world_size,
        "BatchSize": batch_size,
        "DeviceType": options.device_type,
        "CaseName": options.case_name,
        "ActualFPS": f"{fps:.3f}",
        "TrainingTime": f"{step_ms:.2f}",
        "TrainAccuracy": f"{accuracy:.3f}",
        "ActualLoss": f"{loss:.4f}",
        "E2ETrainingTime": f"{options.e2e:.1f}",
    }
    Path(options.case_log).write_text("".join(f"{k} = {v}\n" for k, v in lines.items()), encoding="utf-8")
    Path(options.loss_file).write_text("".join(f"{value:.4f}\n" for value in losses), encoding="utf-8")
    # "Train Accuracy" is the ModelZoo label for the reported Acc@1 (validation's when it ran,
    # and the evaluated one for train_eval_8p.sh); log parsers look for it.
    print(f"Final Performance images/sec : {fps:.3f}")
    print(f"Final Train Accuracy : {accuracy:.3f}")
    print(f"E2E Training Duration sec : {options.e2e:.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    planner = commands.add_parser("plan")
    planner.add_argument("--launcher", choices=("python", "torchrun"), required=True)
    planner.add_argument("--nproc", type=int, default=0, help="processes per node; 0: from the devices")
    planner.add_argument("--nnodes", type=int, default=1)
    planner.add_argument("main_args", nargs=argparse.REMAINDER, help="main.py's options, after --")

    summariser = commands.add_parser("summary")
    summariser.add_argument("--metrics", required=True)
    summariser.add_argument("--kind", choices=("perf", "acc", "eval"), required=True)
    summariser.add_argument("--case-name", required=True)
    summariser.add_argument("--case-log", required=True)
    summariser.add_argument("--loss-file", required=True)
    summariser.add_argument("--arch", required=True)
    summariser.add_argument("--batch-size", type=int, required=True)
    summariser.add_argument("--rank-size", type=int, required=True)
    summariser.add_argument("--device-type", required=True)
    summariser.add_argument("--e2e", type=float, required=True, help="seconds the launch took")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.command == "plan":
        if options.main_args[:1] == ["--"]:
            options.main_args = options.main_args[1:]
        return plan(options)
    return summary(options)


if __name__ == "__main__":
    sys.exit(main())
