"""End-to-end benchmark: ``main.py`` on a JPEG ImageFolder versus on synthetic batches.

Both runs are ordinary ``main.py --epochs 1 --max-steps N`` processes with the same
model, batch and flags; one reads the generated ImageNet-like JPEG folder
(``bench/input_pipeline.py`` makes and caches it), the other ``--synthetic`` batches that
are already on the device. Each run's ``fps`` comes from its ``metrics.jsonl`` (measured
after ``--fps-warmup-steps``); ``jpeg / synthetic`` is the share of the training speed
the input pipeline leaves, and ``1 - ratio`` what it costs. Peak memory per run: the
summed PSS of main.py and its DataLoader workers (sampled), main.py's own peak RSS, and
the device's peak allocation.

    python bench/end_to_end.py --arch inception_v3 --image-size 299 --batch-size 8 --steps 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.input_pipeline import ensure_jpeg_folder, parse_size  # noqa: E402
from training import device as devices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("synthetic", "jpeg")


def child(report: str, main_argv: list[str]) -> int:
    """Run main.py's ``main(main_argv)`` in this process, then record its peak memory."""
    from training.options import parse_args
    from training.run import main

    code = main(main_argv)
    device = devices.select_device(parse_args(main_argv).device).torch_device()
    Path(report).write_text(json.dumps({"code": code, "peak_rss_bytes": common.process_peak_rss(),
                                        "peak_device_bytes": devices.peak_memory_bytes(device)}) + "\n")
    return code


def run_main(main_argv: list[str], output: Path, timeout_s: float) -> dict[str, Any]:
    """One main.py process (through :func:`child`); its metrics and memory."""
    output.mkdir(parents=True, exist_ok=True)
    report = output / "bench_memory.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child-report", str(report), "--", *main_argv]
    started = time.perf_counter()
    log = (output / "main.log").open("w", encoding="utf-8")
    try:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        with common.MemorySampler(pid=process.pid, tree=True, interval_s=0.5) as memory:
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
    finally:
        log.close()
    wall = time.perf_counter() - started
    text = (output / "main.log").read_text(encoding="utf-8", errors="replace")
    if code != 0:
        raise RuntimeError(f"main.py failed (exit {code}): {' '.join(main_argv)}\n{text[-3000:]}")
    from training.metrics import read_metrics

    record = next(r for r in read_metrics(output / "metrics.jsonl") if r.get("mode") == "train")
    child_report = json.loads(report.read_text(encoding="utf-8"))
    return {"fps": record["fps"], "train_steps": record["train_steps"], "train_images": record["train_images"],
            "epoch_time": record["epoch_time"], "wall_seconds": wall,
            "peak_tree_pss_bytes": memory.peak, "peak_main_rss_bytes": child_report["peak_rss_bytes"],
            "peak_device_bytes": child_report["peak_device_bytes"], "argv": main_argv}


def main_argv(args: argparse.Namespace, source: str, data: Path, output: Path) -> list[str]:
    argv = ["-a", args.arch, "--epochs", "1", "--max-steps", str(args.steps), "-b", str(args.batch_size),
            "--image-size", str(args.image_size), "--seed", "0", "--print-freq", str(args.steps),
            "--fps-warmup-steps", str(args.fps_warmup_steps), "--device", args.device,
            "--output_dir", str(output), "--progress", "lines"]
    argv += ["--synthetic"] if source == "synthetic" else ["--data", str(data)]
    if args.workers is not None:
        argv += ["-j", str(args.workers)]
    return argv + args.main_flags


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="inception_v3")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="main.py --max-steps")
    parser.add_argument("--fps-warmup-steps", type=int, default=2, help="main.py --fps-warmup-steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating synthetic/jpeg runs; fps is the median per source")
    parser.add_argument("-j", "--workers", type=int, default=None, help="main.py -j (default: main.py's own)")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES)
    parser.add_argument("--main-flags", default="",
                        help="extra main.py flags for both runs, e.g. --main-flags=--amp (with '=': the value "
                             "starts with a dash)")
    parser.add_argument("--data-dir", default=None, help="where the JPEG folder is cached "
                        "(default: as bench/input_pipeline.py)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--source-size", type=parse_size, default=(500, 375), metavar="WxH")
    parser.add_argument("--output-dir", default=None, help="main.py outputs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per main.py run")
    common.add_common_options(parser)
    args = parser.parse_args(argv)
    args.main_flags = args.main_flags.split()
    if args.train_per_class * args.classes < args.batch_size * args.steps:
        parser.error(f"the JPEG folder has fewer than --steps x --batch-size = {args.batch_size * args.steps} "
                     f"images: raise --train-per-class")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-report"]:
        return child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    args = parse(argv)
    from training.data.embedded import default_cache_dir

    data = ensure_jpeg_folder(args.data_dir or default_cache_dir() / "bench", args.classes, args.train_per_class,
                              args.val_per_class, args.source_size)
    load = common.wait_for_quiet(args.max_load, args.max_wait)
    env = common.environment()
    print(f"data {data}\ncpu {env['host_cpu']} ({env['cpus']} cpus)  torch {env['versions']['torch']}  load {load}")
    scratch = None
    if args.output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-e2e-")
        out_root = Path(scratch.name)
    else:
        out_root = Path(args.output_dir)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {source: [] for source in SOURCES}
    try:
        for round_index in range(args.rounds):
            order = SOURCES if round_index % 2 == 0 else SOURCES[::-1]
            for source in order:
                output = out_root / f"{source}-{round_index}"
                runs[source].append(run_main(main_argv(args, source, data, output), output, args.timeout))
                r = runs[source][-1]
                print(f"  {source:9s} round {round_index}: {r['fps']:.2f} img/s  ({r['wall_seconds']:.0f}s wall)",
                      flush=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
    results: dict[str, Any] = {}
    for source, items in runs.items():
        results[source] = {"fps": common.median([r["fps"] for r in items]), "fps_rounds": [r["fps"] for r in items],
                           "peak_tree_pss_bytes": max(r["peak_tree_pss_bytes"] for r in items),
                           "peak_main_rss_bytes": max(r["peak_main_rss_bytes"] for r in items),
                           "peak_device_bytes": max((r["peak_device_bytes"] or 0) for r in items) or None,
                           "wall_seconds": common.median([r["wall_seconds"] for r in items]),
                           "argv": items[0]["argv"]}
    ratio = results["jpeg"]["fps"] / results["synthetic"]["fps"]
    common.print_table(
        f"main.py -a {args.arch} --image-size {args.image_size} -b {args.batch_size} --max-steps {args.steps} "
        f"{' '.join(args.main_flags)} (fps after {args.fps_warmup_steps} warm-up steps, {args.rounds} round(s))",
        ["data", "img/s", "vs synthetic", "tree PSS MiB", "main RSS MiB", "device MiB", "wall s"],
        [[source, f"{r['fps']:.2f}", f"{r['fps'] / results['synthetic']['fps']:.3f}",
          f"{r['peak_tree_pss_bytes'] / common.MIB:.0f}", f"{r['peak_main_rss_bytes'] / common.MIB:.0f}",
          f"{r['peak_device_bytes'] / common.MIB:.0f}" if r["peak_device_bytes"] else "-",
          f"{r['wall_seconds']:.0f}"] for source, r in results.items()])
    print(f"\ninput pipeline cost: {100 * (1 - ratio):.1f}% of synthetic-data throughput")
    env["load_average_at_end"] = common.load_average()
    payload = {"benchmark": "end_to_end", "env": env, "data": str(data),
               "settings": {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
                            "steps": args.steps, "fps_warmup_steps": args.fps_warmup_steps, "rounds": args.rounds,
                            "workers": args.workers, "main_flags": args.main_flags, "device": args.device},
               "runs": results, "ratio": ratio, "input_pipeline_cost": 1 - ratio,
               "seconds": time.perf_counter() - started}
    common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
