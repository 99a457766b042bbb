"""Input-pipeline benchmark: decode + augment on an ImageNet-like JPEG folder.

The folder is generated once (cached) with ``training.data.embedded.make_imagefolder``:
sizes jittered +-25% around 500x375, JPEG quality 90, like ImageNet's typical photo.

Two measurements, each comparing

* ``baseline``: torchvision's ``ImageFolder`` (PIL open + ``convert("RGB")``) with the
  classic transform (``RandomResizedCrop``, flip, ``ToTensor``, ``Normalize``: float out),
  ``default_collate``, a plain ``DataLoader(shuffle=True, pin_memory=...)``;
* ``ours``: what main.py builds (``build_datasets`` -> ``TrainTransform``: reduced-size
  JPEG decode, one box resize, uint8 out; ``collate_batch``; ``build_loader`` with its
  seeded ``TrainSampler``) plus the ``DeviceLoader`` normalisation, which on a CPU-only
  machine costs CPU time as well;

1. per process: one process, one thread (what a DataLoader worker gets), no DataLoader:
   images/s for decode + augment + collate (+ normalise for ours), baseline and ours
   alternating over ``--rounds``, same images, same RNG seed;
2. loader: ``DataLoader`` throughput with N workers (``--workers 0,1,2``), batches handed
   to the device, after the workers have started.

3. formats: the same images as an ImageFolder and as the sharded format (``shard_dataset.py``,
   converted once next to the folder): images/s per worker (one thread), the loader at N
   workers, the time to the first batch, and the resume latency (a fresh loader skipping to an
   early and to a late step of the epoch, until its first batch).

    python bench/input_pipeline.py --data-dir /tmp/bench-data --image-size 299
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402

import models  # noqa: E402
from bench import common  # noqa: E402
from bench.reference_transforms import classic_train_transform  # noqa: E402
from training import device as devices  # noqa: E402
from training.data.imagefolder import build_datasets, build_loader, build_transforms, collate_batch  # noqa: E402
from training.data import shards  # noqa: E402
from training.data.sampling import SampleKey, TrainSampler  # noqa: E402
from training.data.transforms import AugmentSettings  # noqa: E402
from training.data.mixing import build_mixer  # noqa: E402
from training.data.embedded import default_cache_dir, make_imagefolder  # noqa: E402
from training.data.device_loader import DeviceLoader  # noqa: E402

SEED = 0
FOLDER_VERSION = "v1"  # bump when the generated folder's recipe changes


# --- the data set --------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def ensure_jpeg_folder(parent: str | os.PathLike, classes: int, train_per_class: int, val_per_class: int,
                       size: tuple[int, int], jitter: float = 0.25, quality: int = 90) -> Path:
    """An ImageNet-like JPEG ImageFolder under ``parent``, generated once and reused.

    The folder name records every generation parameter, so a change makes a new folder;
    it is built in a temporary sibling and renamed into place (complete or absent).
    """
    parent = Path(parent)
    name = (f"jpeg-{FOLDER_VERSION}-{classes}c-{train_per_class}t-{val_per_class}v-{size[0]}x{size[1]}"
            f"-j{jitter:g}-q{quality}")
    target = parent / name
    if (target / "done.json").is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        started = time.perf_counter()
        make_imagefolder(staging, classes, train_per_class, val_per_class, image_size=size, seed=SEED,
                         quality=quality, sizes_jitter=jitter)
        (staging / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
        if target.exists():  # a stale, incomplete folder from an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "done.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def folder_stats(root: Path) -> dict[str, Any]:
    from PIL import Image

    files = sorted((root / "train").rglob("*.jpg"))
    sizes = []
    for path in files[:200]:
        with Image.open(path) as img:
            sizes.append(img.size)
    total = sum(path.stat().st_size for path in files)
    return {"train_images": len(files), "mean_width": sum(s[0] for s in sizes) / len(sizes),
            "mean_height": sum(s[1] for s in sizes) / len(sizes), "mean_kib": total / len(files) / 1024}


# --- pipelines ---------------------------------------------------------------------------

class Pipelines:
    """The baseline and our datasets over the same training folder."""

    def __init__(self, root: Path, arch: str, image_size: int):
        from torchvision.datasets import ImageFolder

        self.preprocess = models.preprocess_config(arch)
        p = self.preprocess
        self.baseline = ImageFolder(str(root / "train"),
                                    transform=classic_train_transform(image_size, p.mean, p.std, p.interpolation))
        self.ours, _ = build_datasets(root, image_size, p)
        if [path for path, _ in self.baseline.samples] != [path for path, _ in self.ours.samples]:
            raise RuntimeError("the two datasets list different images")

    def device_loader(self, batches: Iterable, device: torch.device) -> DeviceLoader:
        normalizer = models.Normalizer(self.preprocess.mean, self.preprocess.std, device)
        return DeviceLoader(batches, device, normalizer, channels_last=True)


def _batched(dataset, indices: list[int], batch_size: int, collate: Callable) -> Iterator:
    for start in range(0, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start:start + batch_size]])


def per_process_runs(pipes: Pipelines, indices: list[int], batch_size: int, device: torch.device
                     ) -> dict[str, Callable[[], None]]:
    def baseline() -> None:
        for images, _ in _batched(pipes.baseline, indices, batch_size, default_collate):
            images.to(device, non_blocking=True)

    def ours() -> None:
        batches = _batched(pipes.ours, indices, batch_size, collate_batch)
        for _ in pipes.device_loader(batches, device):
            pass

    def decode_only() -> None:
        # The floor for any PIL pipeline: a full decode of each file, nothing else.
        from PIL import Image

        for i in indices:
            with Image.open(pipes.ours.samples[i][0]) as img:
                img.convert("RGB")

    return {"baseline": baseline, "ours": ours, "decode_only": decode_only}


def measure_per_process(pipes: Pipelines, images: int, batch_size: int, rounds: int, device: torch.device
                        ) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(pipes.ours), generator=generator).tolist()
    indices = list(itertools.islice(itertools.cycle(order), images))
    runs = per_process_runs(pipes, indices, batch_size, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up: file cache, lazy imports
            torch.manual_seed(SEED)
            run()
        for round_index in range(rounds):
            names = list(runs)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                torch.manual_seed(SEED + round_index)  # the same crops for every pipeline
                timings[name].append(common.timed(runs[name], device))
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {}
    for name, seconds in timings.items():
        result[name] = {"images_per_second": common.median([images / s for s in seconds]),
                        "images_per_second_rounds": [images / s for s in seconds],
                        "ms_per_image": 1000 * common.median(seconds) / images}
    result["ratio"] = result["ours"]["images_per_second"] / result["baseline"]["images_per_second"]
    return result


# What each augmentation option adds to a worker's work (and MixUp/CutMix to the device's).
AUGMENTATIONS = {
    "default": AugmentSettings(),
    "--auto-augment ra": AugmentSettings(auto_augment="ra"),
    "--auto-augment ta_wide": AugmentSettings(auto_augment="ta_wide"),
    "--auto-augment augmix": AugmentSettings(auto_augment="augmix"),
    "--auto-augment imagenet": AugmentSettings(auto_augment="imagenet"),
    "--random-erase 0.25": AugmentSettings(random_erase=0.25),
}


def measure_augmentations(root: Path, arch: str, image_size: int, images: int, batch_size: int, rounds: int,
                          device: torch.device) -> dict[str, Any]:
    """Per process (1 thread, as a worker): images/s of our training pipeline with each
    augmentation option, against the default, alternating; then MixUp/CutMix per device batch."""
    preprocess = models.preprocess_config(arch)
    datasets = {name: build_datasets(root, image_size, preprocess, augment=settings)[0]
                for name, settings in AUGMENTATIONS.items()}
    keys = [SampleKey(index % len(datasets["default"]), SEED + index) for index in range(images)]

    def run(dataset) -> Callable[[], None]:
        return lambda: [collate_batch([dataset[key] for key in keys[start:start + batch_size]])
                        for start in range(0, len(keys), batch_size)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings: dict[str, list[float]] = {name: [] for name in datasets}
        for dataset in datasets.values():
            run(dataset)()  # warm-up
        for round_index in range(rounds):
            names = list(datasets)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                timings[name].append(common.timed(run(datasets[name]), device))
    finally:
        torch.set_num_threads(threads)
    base = common.median([images / s for s in timings["default"]])
    result: dict[str, Any] = {name: {"images_per_second": common.median([images / s for s in seconds]),
                                     "vs_default": common.median([images / s for s in seconds]) / base}
                              for name, seconds in timings.items()}
    batch = torch.rand(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(10, (batch_size,), device=device)
    for name, mix in (("--mixup 0.2 (device)", build_mixer(10, 0.2, 0.0)),
                      ("--cutmix 1.0 (device)", build_mixer(10, 0.0, 1.0))):
        seconds = common.median([common.timed(lambda: mix(batch, labels), device) for _ in range(max(rounds, 5))])
        result[name] = {"ms_per_batch": 1000 * seconds}
    return result


def _forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def _drain(batches: Iterator, count: int, device: torch.device) -> int:
    images = 0
    for _ in range(count):
        batch = next(batches)
        images += batch[0].shape[0]
    devices.synchronize(device)
    return images


def measure_loader(pipes: Pipelines, workers: int, batch_size: int, batches: int, warmup_batches: int,
                   rounds: int, device: torch.device) -> dict[str, Any]:
    pin_options = devices.pin_memory_options(devices.capabilities(device.type))
    pin = pin_options["pin_memory"]
    persistent = {"persistent_workers": True} if workers > 0 else {}
    generator = torch.Generator().manual_seed(SEED)
    reference = DataLoader(pipes.baseline, batch_size=batch_size, shuffle=True, num_workers=workers,
                           pin_memory=pin, drop_last=True, generator=generator, **persistent)

    def baseline_batches() -> Iterator:
        for images, target in _forever(reference):
            yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)

    sampler = TrainSampler(len(pipes.ours), SEED)
    ours_loader = pipes.device_loader(build_loader(pipes.ours, batch_size, sampler, train=True, workers=workers,
                                                   pin_memory=pin_options), device)
    streams = {"baseline": baseline_batches(), "ours": _forever(ours_loader)}
    result: dict[str, Any] = {}
    with common.MemorySampler(tree=True, interval_s=0.2) as memory:
        for stream in streams.values():
            _drain(stream, warmup_batches, device)  # starts the workers, fills their queues
        timings: dict[str, list[float]] = {name: [] for name in streams}
        for round_index in range(rounds):
            names = list(streams)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                count = _drain(streams[name], batches, device)
                timings[name].append(count / (time.perf_counter() - started))
    for name, speeds in timings.items():
        result[name] = {"images_per_second": common.median(speeds), "images_per_second_rounds": speeds}
    result["ratio"] = result["ours"]["images_per_second"] / result["baseline"]["images_per_second"]
    result["peak_tree_pss_bytes"] = memory.peak  # both loaders' workers alive together
    for stream in streams.values():
        stream.close()
    return result


# --- formats: ImageFolder against shards -------------------------------------------------------

def ensure_shards(root: Path) -> Path:
    """The sharded copy of the JPEG folder, converted once (next to it)."""
    target = root.parent / f"{root.name}-shards"
    if not shards.is_shard_dataset(target):
        shards.convert_imagefolder(root, str(target), seed=SEED, overwrite=True)
    return target


def _time_to_first_batch(make: Callable[[], Iterable]) -> float:
    started = time.perf_counter()
    batches = iter(make())
    next(batches)
    elapsed = time.perf_counter() - started
    del batches  # ends the workers
    return elapsed


def measure_formats(root: Path, shard_root: Path, arch: str, image_size: int, images: int, batch_size: int,
                    rounds: int, workers_list: list[int], loader_batches: int, device: torch.device) -> dict[str, Any]:
    """Per worker images/s, loader images/s, time to first batch and resume latency, per format."""
    preprocess = models.preprocess_config(arch)
    transforms = build_transforms(image_size, preprocess)
    datasets = {"imagefolder": build_datasets(root, image_size, preprocess)[0],
                "shards": shards.build_shard_datasets(str(shard_root), transforms)[0]}
    count = len(datasets["imagefolder"])
    keys = [SampleKey(index % count, SEED + index) for index in range(images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_worker: dict[str, list[float]] = {name: [] for name in datasets}
        for dataset in datasets.values():
            dataset[keys[0]]  # warm-up: the file cache, the chunk reader
        for round_index in range(rounds):
            for name in (list(datasets) if round_index % 2 == 0 else list(datasets)[::-1]):
                dataset = datasets[name]
                seconds = common.timed(lambda: [collate_batch([dataset[key] for key in keys[start:start + batch_size]])
                                                for start in range(0, len(keys), batch_size)], device)
                per_worker[name].append(images / seconds)
    finally:
        torch.set_num_threads(threads)
    steps = count // batch_size
    result: dict[str, Any] = {name: {"images_per_second_per_worker": common.median(speeds), "loader": []}
                              for name, speeds in per_worker.items()}
    for workers in workers_list:
        for name, dataset in datasets.items():
            def loader(skip_steps: int = 0) -> DataLoader:
                sampler = TrainSampler(count, SEED)
                sampler.skip(skip_steps * batch_size)
                return build_loader(dataset, batch_size, sampler, train=True, workers=workers)

            first = common.median([_time_to_first_batch(loader) for _ in range(rounds)])
            early = common.median([_time_to_first_batch(lambda: loader(1)) for _ in range(rounds)])
            late = common.median([_time_to_first_batch(lambda: loader(steps - 1)) for _ in range(rounds)])
            stream = _forever(loader())
            next(stream)  # the workers started
            started = time.perf_counter()
            drawn = sum(next(stream)[0].shape[0] for _ in range(loader_batches))
            speed = drawn / (time.perf_counter() - started)
            result[name]["loader"].append({"workers": workers, "images_per_second": speed,
                                           "first_batch_s": first, "resume_step_1_s": early,
                                           f"resume_step_{steps - 1}_s": late})
    result["steps_per_epoch"] = steps
    return result


# --- command line ------------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_cache_dir() / "bench"),
                        help="where the generated JPEG folder is cached")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--source-size", type=parse_size, default=(500, 375), metavar="WxH",
                        help="mean size of the generated JPEGs (each side jittered +-25%%)")
    parser.add_argument("--arch", default="inception_v3", choices=models.list_models(),
                        help="whose preprocessing (mean/std, interpolation)")
    parser.add_argument("--image-size", type=int, default=299, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=200, help="images per timed per-process round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--loader-batches", type=int, default=12, help="batches per timed loader round")
    parser.add_argument("--loader-warmup", type=int, default=3, help="batches drawn before timing a loader")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES)
    common.add_common_options(parser)
    args = parser.parse_args(argv)
    try:
        args.workers = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = common.resolve_device(args.device)
    started = time.perf_counter()
    root = ensure_jpeg_folder(args.data_dir, args.classes, args.train_per_class, args.val_per_class,
                              args.source_size)
    print(f"data {root} ({time.perf_counter() - started:.1f}s to find or make)")
    load = common.wait_for_quiet(args.max_load, args.max_wait)
    env = common.environment(device)
    stats = folder_stats(root)
    print(f"device {env.get('device')}  cpu {env['host_cpu']} ({env['cpus']} cpus)  torch {torch.__version__}  "
          f"load {load}\nimages: {stats['train_images']} train JPEGs, mean {stats['mean_width']:.0f}x"
          f"{stats['mean_height']:.0f}, {stats['mean_kib']:.0f} KiB; crop {args.image_size}")
    pipes = Pipelines(root, args.arch, args.image_size)

    per_process = measure_per_process(pipes, args.images, args.batch_size, args.rounds, device)
    common.print_table(
        f"per process (1 thread, no DataLoader): {args.images} images x {args.rounds} rounds, batch {args.batch_size}",
        ["pipeline", "img/s", "range", "ms/img", "vs base"],
        [[name, f"{r['images_per_second']:.1f}",
          f"{min(r['images_per_second_rounds']):.1f}-{max(r['images_per_second_rounds']):.1f}",
          f"{r['ms_per_image']:.2f}", f"{r['images_per_second'] / per_process['baseline']['images_per_second']:.2f}x"]
         for name, r in per_process.items() if isinstance(r, dict)])

    augmentations = measure_augmentations(root, args.arch, args.image_size, args.images, args.batch_size,
                                          args.rounds, device)
    common.print_table(
        f"augmentation cost per worker (1 thread, {args.images} images x {args.rounds} rounds, "
        f"batch {args.batch_size})",
        ["option", "img/s", "vs default", "device ms/batch"],
        [[name, f"{r['images_per_second']:.1f}" if "images_per_second" in r else "-",
          f"{r['vs_default']:.2f}x" if "vs_default" in r else "-",
          f"{r['ms_per_batch']:.2f}" if "ms_per_batch" in r else "-"] for name, r in augmentations.items()])

    loaders = []
    for workers in args.workers:
        result = measure_loader(pipes, workers, args.batch_size, args.loader_batches, args.loader_warmup,
                                args.rounds, device)
        loaders.append({"workers": workers, **result})
    common.print_table(
        f"DataLoader to {device}: {args.loader_batches} batches of {args.batch_size} x {args.rounds} rounds "
        f"(after {args.loader_warmup} warm-up batches)",
        ["workers", "baseline img/s", "ours img/s", "ours/base", "peak PSS MiB (both)"],
        [[str(r["workers"]), f"{r['baseline']['images_per_second']:.1f}", f"{r['ours']['images_per_second']:.1f}",
          f"{r['ratio']:.2f}x", f"{r['peak_tree_pss_bytes'] / common.MIB:.0f}"] for r in loaders])

    shard_root = ensure_shards(root)
    formats = measure_formats(root, shard_root, args.arch, args.image_size, args.images, args.batch_size, args.rounds,
                              args.workers, args.loader_batches, device)
    steps = formats["steps_per_epoch"]
    common.print_table(
        f"ImageFolder against shards ({shard_root.name}): per worker (1 thread) and DataLoader, "
        f"{steps} steps per epoch",
        ["format", "workers", "img/s per worker", "loader img/s", "first batch s", "resume step 1 s",
         f"resume step {steps - 1} s"],
        [[name, str(row["workers"]), f"{formats[name]['images_per_second_per_worker']:.1f}",
          f"{row['images_per_second']:.1f}", f"{row['first_batch_s']:.3f}", f"{row['resume_step_1_s']:.3f}",
          f"{row[f'resume_step_{steps - 1}_s']:.3f}"]
         for name in ("imagefolder", "shards") for row in formats[name]["loader"]])

    env["load_average_at_end"] = common.load_average()
    payload = {"benchmark": "input_pipeline", "env": env, "data": {"root": str(root), **stats},
               "settings": {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
                            "images": args.images, "rounds": args.rounds, "workers": args.workers,
                            "loader_batches": args.loader_batches, "loader_warmup": args.loader_warmup},
               "per_process": per_process, "augmentations": augmentations, "loader": loaders, "formats": formats,
               "process_peak_rss_bytes": common.process_peak_rss(), "seconds": time.perf_counter() - started}
    return common.finish(args.json, payload, env["load_average_at_end"])


if __name__ == "__main__":
    sys.exit(main())
