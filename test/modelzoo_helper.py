"""Python side of the ModelZoo launch scripts (test/common.sh): plan a run, summarise it.

``plan`` checks main.py's options with main.py's own parser, counts the devices, turns the
script's ``--batch_size``/``--workers`` (per device for 1p, per node otherwise, as in the
ModelZoo scripts) into main.py's per-device values, and prints ``key=value`` lines that name
the run before it starts. ``summary`` reads the run's ``metrics.jsonl`` and writes the
ModelZoo files (``<CaseName>.log``, ``train_<CaseName>_loss.txt``) and the final console
block. Not meant to be run by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LOCAL_PROCESSES = 8  # the "8p" scripts: one process per device, at most 8 per node
# The ModelZoo directory each architecture comes from: the Network field and CaseName prefix.
NETWORKS = {"inception_v3": "InceptionV3_ID1596_for_PyTorch", "xception": "Xception_ID1777_for_PyTorch"}


def detect_devices() -> tuple[str, int]:
    """The accelerator main.py's ``--device auto`` would pick, and how many this node has."""
    sys.path.insert(0, str(REPO))
    from training import device as devices

    kind = devices.select_device("auto").type
    return kind, 0 if kind == "cpu" else devices.device_count(kind)


def processes_per_node(options: argparse.Namespace, device_type: str, count: int) -> int:
    if options.launcher == "python":
        return 1
    if options.nproc:
        return options.nproc
    # No accelerator: still the scripts' 8 processes unless RANK_SIZE/--nproc says otherwise.
    return min(count, MAX_LOCAL_PROCESSES) if count else MAX_LOCAL_PROCESSES


def plan(options: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from training.config import resolve_options
    from training.options import parse_command_line

    command = parse_command_line(options.main_args)  # main.py's parser: exits 2 with its message when wrong
    args = command.args
    device_type, count = detect_devices()
    if args.device != "auto":
        device_type, count = args.device, (count if args.device == device_type else 0)
    nproc = processes_per_node(options, device_type, count)
    world_size = nproc * options.nnodes
    recipe_batch = resolve_options(args, command.explicit, world_size).args.batch_size
    if options.batch_size:
        if options.batch_size % nproc:
            print(f"error: --batch_size={options.batch_size} is the batch of a node here; it does not split "
                  f"evenly between its {nproc} processes", file=sys.stderr)
            return 2
        per_device, script_batch = options.batch_size // nproc, options.batch_size
    else:
        per_device, script_batch = recipe_batch, recipe_batch * nproc
    workers = -(-options.workers // nproc) if options.workers is not None else None
    for key, value in (("arch", args.arch), ("network", NETWORKS[args.arch]), ("batch_size", script_batch),
                       ("device_batch_size", per_device), ("workers", "" if workers is None else workers),
                       ("nproc", nproc), ("world_size", world_size), ("device_type", device_type),
                       ("device_count", count)):
        print(f"{key}={value}")
    return 0


def _read(path: Path, mode: str) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [record for record in records if record.get("mode") == mode]


def summary(options: argparse.Namespace) -> int:
    path = Path(options.metrics)
    if not path.is_file():
        print(f"error: {path} was not written; the run produced no metrics", file=sys.stderr)
        return 1
    mode = "evaluate" if options.kind == "eval" else "train"
    records = _read(path, mode)
    if not records:
        print(f"error: {path} holds no '{mode}' record", file=sys.stderr)
        return 1
    last = records[-1]
    lines = {"Network": options.network, "RankSize": options.rank_size, "BatchSize": options.batch_size,
             "DeviceType": options.device_type, "CaseName": options.case_name}
    if mode == "train":
        steps = _read(path, "step")
        losses = [float(record["loss"]) for record in steps] or [float(last["train_loss"])]
        fps = float(last.get("fps") or math.nan)
        global_batch = int(last.get("global_batch_size", options.batch_size))
        lines.update({"ActualFPS": f"{fps:.3f}",
                      "TrainingTime": f"{global_batch * 1000.0 / fps:.2f}" if fps > 0 else "nan",
                      "TrainAccuracy": f"{float(last.get('val_acc1', last['train_acc1'])):.3f}"})
    else:
        losses = [float(last["val_loss"])]
        lines["TrainAccuracy"] = f"{float(last['val_acc1']):.3f}"
    lines.update({"ActualLoss": f"{losses[-1]:.4f}", "E2ETrainingTime": f"{options.e2e:.0f}"})
    Path(options.case_log).write_text("".join(f"{k} = {v}\n" for k, v in lines.items()), encoding="utf-8")
    Path(options.loss_file).write_text("".join(f"{value:.4f}\n" for value in losses), encoding="utf-8")
    # ModelZoo's console block ("Train Accuracy" is its label for the reported Acc@1).
    print("------------------ Final result ------------------")
    if mode == "train":
        print(f"Final Performance images/sec : {lines['ActualFPS']}")
    print(f"Final Train Accuracy : {lines['TrainAccuracy']}")
    print(f"E2E Training Duration sec : {options.e2e:.0f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    planner = commands.add_parser("plan")
    planner.add_argument("--launcher", choices=("python", "torchrun"), required=True)
    planner.add_argument("--nproc", type=int, default=0, help="processes per node; 0: from the devices")
    planner.add_argument("--nnodes", type=int, default=1)
    planner.add_argument("--batch-size", type=int, default=0, help="the script's --batch_size (0: not given)")
    planner.add_argument("--workers", type=int, default=None, help="the script's --workers")
    planner.add_argument("main_args", nargs=argparse.REMAINDER, help="main.py's options, after --")

    summariser = commands.add_parser("summary")
    summariser.add_argument("--metrics", required=True)
    summariser.add_argument("--kind", choices=("perf", "acc", "eval"), required=True)
    summariser.add_argument("--network", required=True)
    summariser.add_argument("--case-name", required=True)
    summariser.add_argument("--case-log", required=True)
    summariser.add_argument("--loss-file", required=True)
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
