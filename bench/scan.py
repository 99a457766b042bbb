"""Scan time per job: every rank walking the ImageFolder (before) against one scan per job (after).

A generated ``train/`` of empty files (the scan never opens an image) is indexed by 1, 2 and 4
processes of a real gloo job:

* ``every rank scans``: each process walks the tree itself (what each rank did before);
* ``rank 0 scans``: ``index_for_job`` with an empty cache: rank 0 walks and broadcasts;
* ``cached index``: ``index_for_job`` with the index cached: rank 0 checks the folders' times;

the figure is the job's wall time from a barrier until every rank holds the sample list, and
the entries listed (files seen by all walks together) say what a shared file system serves.

    python bench/scan.py --files 200000 --classes 1000 --ranks 1,2,4 --json out/scan.json
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import distributed as dist  # noqa: E402

from bench.common import environment, print_table, write_json  # noqa: E402
from training import distributed  # noqa: E402
from training.data.scan import index_for_job, scan_imagefolder  # noqa: E402
from training.distributed import Topology  # noqa: E402

MODES = ("every rank scans", "rank 0 scans", "cached index")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_tree(root: Path, files: int, classes: int) -> Path:
    """``root/train/class_XXXX/NNNNNNN.jpg``: ``files`` empty files over ``classes`` folders (made once)."""
    split = root / "train"
    marker = root / f".complete-{files}-{classes}"
    if marker.exists():
        return split
    for label in range(classes):
        folder = split / f"class_{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(label, files, classes):
            (folder / f"{number:07d}.jpg").touch()
    marker.touch()
    return split


def _rank(rank: int, ranks: int, port: int, split: str, cache: str, results) -> None:
    """One process of the job: every mode in turn, each timed from a barrier to the last rank's end."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    topology = Topology(process_rank=rank, process_count=ranks, local_rank=rank, local_process_count=ranks)
    distributed.init_process_group(topology, "gloo", torch.device("cpu"), 600)
    for mode in MODES:
        distributed.barrier()
        started = time.perf_counter()
        if mode == MODES[0]:
            index = scan_imagefolder(split)
        else:
            index = index_for_job(split, cache, topology.is_main)
        distributed.barrier()
        results.put((mode, rank, time.perf_counter() - started, len(index.samples)))
    if dist.is_initialized():
        dist.destroy_process_group()


def measure(ranks: int, split: Path, cache: Path, port: int) -> dict[str, float]:
    """Seconds per mode: the slowest rank's."""
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, ranks, port, str(split), str(cache), results))
                 for rank in range(ranks)]
    for process in processes:
        process.start()
    outcome = [results.get(timeout=1800) for _ in range(len(processes) * len(MODES))]
    for process in processes:
        process.join()
    return {mode: max(seconds for name, _, seconds, _ in outcome if name == mode) for mode in MODES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--root", default=None, help="where the tree is generated (kept; default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.root or temporary)
        started = time.perf_counter()
        split = make_tree(root, args.files, args.classes)
        made = time.perf_counter() - started
        past = time.time() - 60  # a tree changed within seconds is never cached (training.data.scan)
        for folder in [split, *split.iterdir()]:
            os.utime(folder, (past, past))
        rows = []
        for ranks in [int(value) for value in args.ranks.split(",")]:
            cache = Path(temporary) / f"cache-{ranks}"
            timings = measure(ranks, split, cache, free_port())
            for mode, seconds in timings.items():
                listed = args.files * (ranks if mode == MODES[0] else 1 if mode == MODES[1] else 0)
                rows.append({"ranks": ranks, "mode": mode, "seconds": seconds, "files_listed": listed,
                             "folders_checked": args.classes + 1 if mode == MODES[2] else 0})
    headers = ["ranks", "mode", "seconds", "files_listed", "folders_checked"]
    print_table(f"scan time per job: {args.files} files in {args.classes} class folders (made in {made:.1f}s)",
                headers, [[f"{row[name]:.3f}" if name == "seconds" else row[name] for name in headers] for row in rows])
    if args.json:
        write_json(args.json, {"environment": environment(), "files": args.files, "classes": args.classes,
                               "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
