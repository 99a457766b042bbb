"""The speed half of ``bench/acceptance.py``: the training step of each architecture at the
fastest of a few batch sizes, evaluation images/s, main.py end to end on JPEGs against
synthetic data, and loader images/s against the worker count.

Each figure comes from the benchmark that owns it (``bench/train_step.py``,
``bench/end_to_end.py``, ``bench/input_pipeline.py``); evaluation runs main.py's own
validation loop (``training.engine.evaluate``) on a model built by main.py's building steps.
This module only chooses the settings and collects the results.
"""
from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import models
from bench import common, end_to_end, input_pipeline, train_step
from training import device as devices
from training.config import resolve_options
from training.data.synthetic import SYNTHETIC_NUM_CLASSES, SyntheticBatches
from training.distributed import Topology
from training.engine import LoopSettings, evaluate
from training.options import parse_command_line
from training.precision import build_precision
from training.setup import agree_on_seed, build_model, decide


@dataclass(frozen=True)
class JpegFolder:
    """The generated ImageNet-like folder (``input_pipeline.ensure_jpeg_folder``, cached)."""

    classes: int
    train_per_class: int
    val_per_class: int
    source_size: tuple[int, int]

    def options(self) -> list[str]:
        """The same folder, in the options of bench/end_to_end.py."""
        return ["--classes", str(self.classes), "--train-per-class", str(self.train_per_class),
                "--val-per-class", str(self.val_per_class), "--source-size", "x".join(map(str, self.source_size))]


@dataclass(frozen=True)
class SpeedSettings:
    device: torch.device
    flags: tuple[str, ...]  # main.py flags of every measured configuration: ("--amp",) or ()
    archs: tuple[str, ...]
    image_size: int
    batch_sizes: tuple[int, ...]  # tried in this order; the first that does not fit ends the list
    warmup_steps: int
    steps: int
    rounds: int
    matmul_size: int
    eval_steps: int
    e2e_arch: str
    e2e_batch_size: int
    e2e_steps: int
    e2e_fps_warmup_steps: int
    folder: JpegFolder
    loader_batch_size: int
    loader_batches: int
    loader_warmup_batches: int
    loader_rounds: int
    loader_workers: tuple[int, ...]
    run_timeout: float

    @property
    def config_name(self) -> str:
        """bench/train_step.py's name for main.py with these flags."""
        return "ours-amp" if "--amp" in self.flags else "ours"


def out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError on CUDA; a RuntimeError saying so on other devices (NPU)."""
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    empty_cache = getattr(devices.device_api(device.type), "empty_cache", None)
    if callable(empty_cache):
        empty_cache()


def matmul_peaks(settings: SpeedSettings) -> dict[str, float]:
    """The best dense matmul rate per dtype: fp32 and, with --amp, the device's autocast dtype."""
    dtypes = {torch.float32}
    if "--amp" in settings.flags:
        dtypes.add(devices.capabilities(settings.device.type).default_amp_dtype)
    measured = train_step.matmul_peaks(settings.device, dtypes, settings.matmul_size)
    return {train_step.dtype_name(dtype): rate for dtype, (rate, _) in measured.items()}


def measure_train_step(arch: str, settings: SpeedSettings, peaks: dict[str, float]) -> dict[str, Any]:
    """bench/train_step.py's measurement of main.py's step at each batch size; the fastest wins."""
    name = settings.config_name
    dtype_peaks = {getattr(torch, dtype): rate for dtype, rate in peaks.items()}
    by_batch: dict[int, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    for batch_size in settings.batch_sizes:
        args = train_step.parse(["--arch", arch, "--image-size", str(settings.image_size),
                                 "--batch-size", str(batch_size), "--steps", str(settings.steps),
                                 "--warmup", str(settings.warmup_steps), "--rounds", str(settings.rounds),
                                 "--device", settings.device.type])
        try:
            result = train_step.benchmark_arch(arch, [name], args, settings.device, dtype_peaks)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            by_batch[batch_size] = {"out_of_memory": str(error).strip().splitlines()[0]}
            break  # a larger batch will not fit either
        finally:
            release_device_memory(settings.device)
        config = result["configs"][name]
        by_batch[batch_size] = {key: config[key] for key in (
            "images_per_second", "images_per_second_rounds", "step_seconds", "achieved_flops", "mfu",
            "mfu_own_dtype", "peak_device_bytes", "peak_host_rss_bytes", "compute_dtype")}
        result["description"] = config["description"]
    measured = {batch: figures for batch, figures in by_batch.items() if "images_per_second" in figures}
    if not measured:
        raise RuntimeError(f"{arch}: not even batch {settings.batch_sizes[0]} fits on {settings.device}")
    best = max(measured, key=lambda batch: measured[batch]["images_per_second"])
    return {"config": name, "description": result["description"], "flops_per_image": result["flops_per_image"],
            "batch_size": best, **measured[best], "batch_sizes": by_batch}


def validation_parts(arch: str, settings: SpeedSettings, batch_size: int) -> tuple[nn.Module, Any, bool, LoopSettings]:
    """What main.py validates with for these flags: the model (on the device, in its memory
    format), the precision (autocast), whether batches are channels-last, the loop settings."""
    device = settings.device
    command = parse_command_line(["-a", arch, "--synthetic", "-b", str(batch_size), "--image-size",
                                  str(settings.image_size), "--seed", "0", "--device", device.type, *settings.flags])
    args = resolve_options(command.args, command.explicit, process_count=1).args
    args.seed = agree_on_seed(args.seed)
    topology = Topology()
    decisions = decide(args, devices.capabilities(device.type), topology)
    built = build_model(args, models.model_spec(arch), SYNTHETIC_NUM_CLASSES, device, decisions, topology)
    precision = build_precision(device.type, amp=args.amp, amp_dtype=args.amp_dtype, opt_level=args.opt_level,
                                loss_scale=args.loss_scale, use_apex=args.apex)
    loop = LoopSettings(device=device, seed=args.seed, print_freq=10**9, fps_warmup_steps=0, progress="lines",
                        show_progress=False)
    return built.model, precision, decisions.channels_last, loop


def measure_evaluation(arch: str, batch_size: int, settings: SpeedSettings) -> dict[str, Any]:
    """Images/s of main.py's validation loop on synthetic batches already on the device."""
    device = settings.device
    model, precision, channels_last, loop = validation_parts(arch, settings, batch_size)

    def batches(steps: int) -> SyntheticBatches:
        return SyntheticBatches(batch_size, settings.image_size, SYNTHETIC_NUM_CLASSES, steps, device,
                                channels_last=channels_last, seed=0)

    criterion = nn.CrossEntropyLoss()
    try:
        evaluate(model, batches(min(2, settings.eval_steps)), criterion, precision, loop)  # autotuning, lazy init
        common.reset_device_peak(device)
        record = evaluate(model, batches(settings.eval_steps), criterion, precision, loop)
        peak = devices.peak_memory_bytes(device)
    finally:
        del model
        release_device_memory(device)
    return {"batch_size": batch_size, "images_per_second": record["val_images"] / record["val_time"],
            "images": record["val_images"], "seconds": record["val_time"], "peak_device_bytes": peak}


def measure_end_to_end(settings: SpeedSettings, data_dir: Path, output: Path) -> dict[str, Any]:
    """bench/end_to_end.py's two main.py runs, --synthetic and on the JPEG folder, and their ratio."""
    args = end_to_end.parse(["--arch", settings.e2e_arch, "--image-size", str(settings.image_size),
                             "--batch-size", str(settings.e2e_batch_size), "--steps", str(settings.e2e_steps),
                             "--fps-warmup-steps", str(settings.e2e_fps_warmup_steps),
                             "--device", settings.device.type, "--main-flags=" + " ".join(settings.flags),
                             *settings.folder.options()])
    runs = {}
    for source in end_to_end.SOURCES:
        folder = output / source
        run = end_to_end.run_main(end_to_end.main_argv(args, source, data_dir, folder), folder, settings.run_timeout)
        runs[source] = {key: run[key] for key in ("fps", "train_steps", "wall_seconds", "peak_tree_pss_bytes",
                                                  "peak_device_bytes", "argv")}
    return {"arch": settings.e2e_arch, "batch_size": settings.e2e_batch_size, "steps": settings.e2e_steps,
            "fps_warmup_steps": settings.e2e_fps_warmup_steps, "flags": list(settings.flags), **runs,
            "ratio": runs["jpeg"]["fps"] / runs["synthetic"]["fps"]}


def measure_loader(settings: SpeedSettings, data_dir: Path) -> list[dict[str, Any]]:
    """bench/input_pipeline.py's DataLoader throughput (batches handed to the device) per worker count."""
    pipes = input_pipeline.Pipelines(data_dir, settings.e2e_arch, settings.image_size)
    rows = []
    for workers in settings.loader_workers:
        result = input_pipeline.measure_loader(pipes, workers, settings.loader_batch_size, settings.loader_batches,
                                               settings.loader_warmup_batches, settings.loader_rounds, settings.device)
        rows.append({"workers": workers, "images_per_second": result["ours"]["images_per_second"],
                     "baseline_images_per_second": result["baseline"]["images_per_second"],
                     "peak_tree_pss_bytes": result["peak_tree_pss_bytes"]})
    return rows


def timed_part(name: str, measure: Callable[[], Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """``{"result": ..., "seconds": ...}``, or ``{"error": ...}`` with the traceback on stderr: one
    figure that cannot be measured does not cost the others."""
    started = time.perf_counter()
    progress(f"speed: {name} ...")
    try:
        return {"result": measure(), "seconds": time.perf_counter() - started}
    except Exception as error:  # reported, and the exit status says so
        traceback.print_exc(file=sys.stderr)
        first_line = (str(error).strip().splitlines() or [""])[0]
        return {"error": f"{type(error).__name__}: {first_line}", "seconds": time.perf_counter() - started}


def run_speed(settings: SpeedSettings, data_dir: Path, output: Path,
              progress: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, Any]]:
    """Every speed figure, part by part: {part: {"result" or "error", "seconds"}}."""
    parts: dict[str, dict[str, Any]] = {"matmul_peak": timed_part("matmul_peak", lambda: matmul_peaks(settings),
                                                                  progress)}
    peaks = parts["matmul_peak"].get("result") or {}
    parts["train_step"] = timed_part("train_step", lambda: {
        arch: measure_train_step(arch, settings, peaks) for arch in settings.archs}, progress)
    steps = parts["train_step"].get("result") or {}
    parts["evaluation"] = timed_part("evaluation", lambda: {
        arch: measure_evaluation(arch, steps[arch]["batch_size"] if arch in steps else settings.batch_sizes[0],
                                 settings) for arch in settings.archs}, progress)
    parts["end_to_end"] = timed_part("end_to_end",
                                     lambda: measure_end_to_end(settings, data_dir, output / "end_to_end"), progress)
    parts["loader"] = timed_part("loader", lambda: measure_loader(settings, data_dir), progress)
    return parts
