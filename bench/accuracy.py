"""Accuracy benchmark on real images that need no download: scikit-learn's handwritten digits.

The 1,797 8x8 digit scans (10 classes) are written once as an RGB PNG ImageFolder, upscaled
to ``--source-size`` pixels, every fifth image to ``val/``. Each network is trained from
scratch on the CPU, with equal hyper-parameters and an equal budget (epochs, batch, learning
rate, schedule, weight decay, crop), by

* ``reference``: a plain loop written here: torchvision's ``inception_v3`` or timm's
  ``legacy_xception``, torchvision's ``ImageFolder`` + ``RandomResizedCrop`` / ``Resize`` +
  ``CenterCrop``, ``CrossEntropyLoss``, textbook SGD with momentum and a per-step cosine
  learning rate. torchvision's auxiliary head cannot take inputs below about 299 px, so at
  these sizes Inception v3 trains without it on both sides (``--aux-loss-weight 0``);
* ``ours``: ``main.py`` with the same values (the ModelZoo recipe's mechanics);
* ``ours-ema``, ``ours-augment`` (RandAugment, random erasing, MixUp/CutMix) and
  ``ours-paper`` (``--recipe paper`` with the budget's epochs and batch): what each adds.

Every configuration runs with ``--seeds`` seeds; the table gives the mean and the spread of
the final validation Acc@1. Flips are off everywhere: a mirrored digit is another glyph.

    python bench/accuracy.py --arch xception --epochs 8 --seeds 0,1,2 --json accuracy_xception.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from bench import common  # noqa: E402
from training.data.embedded import default_cache_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FOLDER_VERSION = "v1"
VAL_EVERY = 5  # every fifth image is a validation image
CONFIGS = ("reference", "ours", "ours-ema", "ours-augment", "ours-paper")
OUR_FLAGS = {
    "ours": [],
    "ours-ema": ["--model-ema", "--model-ema-warmup"],
    "ours-augment": ["--auto-augment", "ra", "--random-erase", "0.25", "--mixup", "0.2", "--cutmix", "1.0"],
    "ours-paper": ["--recipe", "paper"],
}


# -- the data ---------------------------------------------------------------------------

def ensure_digits_folder(parent: Path, size: int) -> Path:
    """The digits as ``train/<digit>/*.png`` and ``val/<digit>/*.png`` at ``size`` pixels, made once."""
    target = parent / f"digits-{FOLDER_VERSION}-{size}px"
    if (target / "done.json").is_file():
        return target
    from sklearn.datasets import load_digits

    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        digits = load_digits()
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if index % VAL_EVERY == 0 else "train"
            folder = staging / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray(np.uint8(pixels / 16.0 * 255.0)).resize((size, size), Image.Resampling.BICUBIC)
            gray.convert("RGB").save(folder / f"{index:04d}.png")
        (staging / "done.json").write_text(json.dumps({"images": len(digits.target)}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- the reference loop -----------------------------------------------------------------

def reference_model(arch: str, num_classes: int) -> torch.nn.Module:
    if arch == "inception_v3":
        from torchvision.models import inception_v3

        # Its auxiliary head fails below ~299 px; both sides train without it here.
        return inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    import timm

    return timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes)


def reference_loaders(data: Path, arch: str, args: argparse.Namespace, seed: int):
    from torchvision import datasets, transforms

    preprocess = models.preprocess_config(arch)
    normalize = transforms.Normalize(preprocess.mean, preprocess.std)
    size = args.image_size
    train = datasets.ImageFolder(str(data / "train"), transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(args.min_scale, 1.0)), transforms.ToTensor(), normalize]))
    val = datasets.ImageFolder(str(data / "val"), transforms.Compose([
        transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]))
    generator = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                        generator=generator, num_workers=args.workers),
            torch.utils.data.DataLoader(val, batch_size=args.batch_size, num_workers=args.workers))


def run_reference(data: Path, arch: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The textbook loop: SGD with momentum, cosine per step, cross-entropy (+ aux), fp32."""
    torch.manual_seed(seed)
    train, val = reference_loaders(data, arch, args, seed)
    model = reference_model(arch, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    total = args.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    criterion = torch.nn.CrossEntropyLoss()
    history = []
    for _ in range(args.epochs):
        model.train()
        for images, labels in train:
            output = model(images)
            loss = criterion(output, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        history.append(reference_accuracy(model, val))
    return {"val_acc1": history[-1], "best_val_acc1": max(history), "history": history}


@torch.no_grad()
def reference_accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / total


# -- ours -------------------------------------------------------------------------------

def our_argv(data: Path, arch: str, args: argparse.Namespace, seed: int, config: str, output: Path) -> list[str]:
    common_values = ["-a", arch, "--data", str(data), "--output_dir", str(output), "--device", "cpu",
                     "--seed", str(seed), "--epochs", str(args.epochs), "-b", str(args.batch_size),
                     "--image-size", str(args.image_size), "--workers", str(args.workers), "--hflip", "0",
                     "--scale", str(args.min_scale), "1.0", "--crop-pct", "0.875", "--progress", "lines",
                     "--print-freq", "1000", "--opt-level", "O0", "--save-every", "0"]
    if config == "ours-paper":  # the papers' recipe on the budget's epochs and batch
        return [*common_values, *OUR_FLAGS[config]]
    equal = ["--lr", str(args.lr), "--wd", str(args.weight_decay), "--momentum", "0.9", "--label-smoothing", "0",
             "--warm_up_epochs", "0", "--lr-schedule", "cosine", "--recipe", "modelzoo", "--opt", "sgd"]
    if arch == "inception_v3":
        equal += ["--aux-loss-weight", "0"]  # as the reference, whose aux head cannot take small inputs
    return [*common_values, *equal, *OUR_FLAGS[config]]


def run_ours(data: Path, arch: str, args: argparse.Namespace, seed: int, config: str, runs: Path) -> dict[str, Any]:
    output = runs / f"{arch}-{config}-{seed}"
    shutil.rmtree(output, ignore_errors=True)
    argv = our_argv(data, arch, args, seed, config, output)
    log = output.parent / f"{output.name}.log"
    output.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        code = subprocess.run([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, stdout=stream,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"main.py failed ({code}); see {log}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [record for record in records if record["mode"] == "train"]
    history = [record["val_acc1"] for record in epochs]
    result = {"val_acc1": history[-1], "best_val_acc1": max(history), "history": history, "argv": argv}
    if "ema_val_acc1" in epochs[-1]:
        ema = [record["ema_val_acc1"] for record in epochs]
        result.update(ema_val_acc1=ema[-1], best_ema_val_acc1=max(ema), ema_history=ema)
    return result


# -- the comparison ----------------------------------------------------------------------------

def summarise(results: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [result[key] for result in results if key in result]
    if not values:
        return {}
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": spread, "min": min(values), "max": max(values), "n": len(values)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="xception", choices=models.list_models())
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for a spread)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--image-size", type=int, default=None, help="training crop (default: 32, 75 for inception_v3)")
    parser.add_argument("--source-size", type=int, default=None,
                        help="size the digits are stored at (default: crop / 0.875)")
    parser.add_argument("--min-scale", type=float, default=0.6, help="RandomResizedCrop's smallest area")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--data-dir", default=str(default_cache_dir() / "bench"))
    parser.add_argument("--runs-dir", default=None, help="where main.py's runs go (default: a temporary folder)")
    common.add_common_options(parser)
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (75 if args.arch == "inception_v3" else 32)
    args.source_size = args.source_size or round(args.image_size / 0.875)
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(max(1, common.usable_cpus()))
    data = ensure_digits_folder(Path(args.data_dir), args.source_size)
    runs = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="accuracy-runs-"))
    load = common.wait_for_quiet(args.max_load, args.max_wait)
    env = common.environment(torch.device("cpu"))
    print(f"digits {data} (10 classes, {sum(1 for _ in (data / 'train').rglob('*.png'))} train / "
          f"{sum(1 for _ in (data / 'val').rglob('*.png'))} val images)  cpu {env['host_cpu']}  load {load}")
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for seed in args.seeds:
        for name in args.configs:
            begun = time.perf_counter()
            outcome = (run_reference(data, args.arch, args, seed) if name == "reference"
                       else run_ours(data, args.arch, args, seed, name, runs))
            outcome.update(seed=seed, seconds=time.perf_counter() - begun)
            results[name].append(outcome)
            print(f"  {name:13s} seed {seed}: val Acc@1 {outcome['val_acc1']:.2f} "
                  f"(EMA {outcome.get('ema_val_acc1', float('nan')):.2f}) in {outcome['seconds']:.0f}s", flush=True)
    summary = {name: {"val_acc1": summarise(rows, "val_acc1"), "ema_val_acc1": summarise(rows, "ema_val_acc1")}
               for name, rows in results.items()}
    common.print_table(
        f"{args.arch}: final validation Acc@1 over seeds {args.seeds} ({args.epochs} epochs, batch {args.batch_size}, "
        f"{args.image_size} px)", ["config", "mean", "std", "min", "max", "EMA mean", "EMA std"],
        [[name, *(f"{s['val_acc1'].get(k, float('nan')):.2f}" for k in ("mean", "std", "min", "max")),
          *(f"{s['ema_val_acc1'].get(k, float('nan')):.2f}" for k in ("mean", "std"))]
         for name, s in summary.items()])
    env["load_average_at_end"] = common.load_average()
    payload = {"benchmark": "accuracy", "env": env, "data": {"root": str(data), "val_every": VAL_EVERY},
               "settings": {key: value for key, value in vars(args).items() if key not in ("json",)},
               "results": results, "summary": summary, "process_peak_rss_bytes": common.process_peak_rss(),
               "seconds": time.perf_counter() - started}
    return common.finish(args.json, payload, env["load_average_at_end"])


if __name__ == "__main__":
    sys.exit(main())
