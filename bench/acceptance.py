"""Hardware acceptance: one command that proves a new machine (GPU, NPU or CPU).

    python bench/acceptance.py --output DIR            # ~8 minutes on one H100-class GPU
    python bench/acceptance.py --output DIR --quick    # tiny sizes: a few minutes on 2 CPU cores

Correctness (``bench/acceptance_checks.py``): short real trainings of main.py on generated
JPEGs in every precision the device runs (fp32; fp16 with a static and with a dynamic
loss scale; bf16), channels-last against NCHW where the capability row allows it,
``--compile``, ``--model-ema``; a run killed mid-epoch and resumed against an
uninterrupted one; evaluation on 1 and 2 processes; the ONNX export's parity.

Speed (``bench/acceptance_speed.py``): the training step of both architectures at 299 px
at the fastest of a few batch sizes (images/s, MFU against the measured matmul peak, peak
device memory), evaluation images/s, main.py end to end on JPEGs against synthetic data,
and loader images/s against the worker count.

``DIR/report.json`` and ``DIR/report.md`` hold the results with the hardware, driver and
versions; every run's files stay in ``DIR/checks/<check>/`` and ``DIR/speed/``. The exit
status is 1 when a correctness check fails or a speed figure could not be measured, 0 otherwise.

What runs where is decided from the device: ``training.device``'s capability row
(channels-last, the process-group backend, the AMP dtype), what the device reports (bf16
support, the device count), a probe of fp16 autocast with loss scaling, and main.py's own
answer to ``--compile``.

Time budget, one H100-class GPU with 16 host cores (``FULL.budget``; estimates from the
parts' sizes, not yet measured there; report.md shows planned against spent):

==============  ===  =======================================================================
part             s   what takes the time
==============  ===  =======================================================================
data             45  the ImageNet-like JPEG folder, ~3,200 images of ~500x375 at ~13 ms each
                     on one core (first run only: cached in --data-dir)
correctness     210  ~13 main.py processes of ~10 s (start-up, CUDA context, cuDNN autotuning,
                     8 steps of Xception at 128 px, validation) and ~60-90 s of inductor
                     compilation for --compile
matmul_peak       5  an 8192^3 matmul, fp32 (TF32) and fp16, a few repeats
train_step       80  2 architectures x 3 batch sizes x ~35 steps, cuDNN autotuning per shape,
                     one FLOP count each
evaluation       15  2 architectures x 22 validation batches
end_to_end       45  2 main.py runs of 24 steps at batch 128 (JPEG and synthetic), validation
loader           30  5 worker counts x 2 pipelines x 23 batches of 64 JPEGs
==============  ===  =======================================================================

Total 430 s, 50 s under the 8 minutes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import acceptance_report, common  # noqa: E402
from bench.acceptance_checks import CHECKS, FAILED, CheckSettings, run_checks  # noqa: E402
from bench.acceptance_speed import JpegFolder, SpeedSettings, run_speed  # noqa: E402
from bench.input_pipeline import ensure_jpeg_folder  # noqa: E402
from training import device as devices  # noqa: E402
from training.data.embedded import default_cache_dir, make_imagefolder  # noqa: E402

SPEED = "speed"
REPORT_FILES = ("report.json", "report.md")
OUTPUT_FOLDERS = ("checks", "speed", "data")


@dataclass(frozen=True)
class Plan:
    """The sizes of one mode; ``budget``: planned seconds per part."""

    mode: str
    # correctness: Xception, whose first-step loss is well conditioned at small sizes (at
    # 75 px Inception's last feature maps are 1x1, and BatchNorm over a few samples there
    # makes reduced-precision losses differ from fp32's by several percent).
    check_arch: str
    check_image_size: int
    check_batch_size: int
    check_steps: int
    check_classes: int
    check_train_per_class: int
    check_val_per_class: int
    check_source_size: tuple[int, int]
    check_workers: int | None
    run_timeout: float
    compile_skipped: str | None
    # speed
    image_size: int
    batch_sizes: tuple[int, ...]
    warmup_steps: int
    steps: int
    rounds: int
    matmul_size: int | None  # None: bench/train_step.py's default for the device
    eval_steps: int
    e2e_batch_size: int
    e2e_steps: int
    e2e_fps_warmup_steps: int
    folder: JpegFolder
    loader_batch_size: int
    loader_batches: int
    loader_warmup_batches: int
    loader_rounds: int
    loader_workers: tuple[int, ...] | None  # None: 1, 2, 4... up to the usable cores
    budget: dict[str, float] = field(default_factory=dict)
    budget_for: str = ""  # the machine the budget is for


FULL = Plan(
    mode="full", check_arch="xception", check_image_size=128, check_batch_size=16, check_steps=8, check_classes=5,
    check_train_per_class=32, check_val_per_class=3, check_source_size=(160, 120), check_workers=None,
    run_timeout=900.0, compile_skipped=None,
    image_size=299, batch_sizes=(64, 128, 256), warmup_steps=5, steps=10, rounds=3, matmul_size=None, eval_steps=20,
    e2e_batch_size=128, e2e_steps=24, e2e_fps_warmup_steps=8, folder=JpegFolder(10, 320, 2, (500, 375)),
    loader_batch_size=64, loader_batches=10, loader_warmup_batches=3, loader_rounds=2, loader_workers=None,
    budget={"data": 45, "correctness": 210, "matmul_peak": 5, "train_step": 80, "evaluation": 15, "end_to_end": 45,
            "loader": 30}, budget_for="one H100-class GPU, 16 host cores (estimated)")

# The full mode on a machine without an accelerator: the same checks and figures with
# batches a CPU gets through (299 px at batch 256 would take hours); no time budget.
FULL_CPU = replace(
    FULL, check_image_size=96, check_batch_size=8, batch_sizes=(8, 16, 32), warmup_steps=1, steps=2, rounds=2,
    eval_steps=4, e2e_batch_size=16, e2e_steps=8, e2e_fps_warmup_steps=2, loader_batch_size=16, budget={},
    budget_for="")

QUICK = Plan(
    mode="quick", check_arch="xception", check_image_size=48, check_batch_size=4, check_steps=4, check_classes=5,
    check_train_per_class=4, check_val_per_class=3, check_source_size=(88, 80), check_workers=0,
    run_timeout=300.0, compile_skipped="quick mode: torch.compile's first step takes minutes on a CPU",
    image_size=75, batch_sizes=(2, 4), warmup_steps=1, steps=1, rounds=1, matmul_size=256, eval_steps=2,
    e2e_batch_size=2, e2e_steps=3, e2e_fps_warmup_steps=1, folder=JpegFolder(2, 4, 1, (96, 80)),
    loader_batch_size=2, loader_batches=2, loader_warmup_batches=1, loader_rounds=1, loader_workers=(0, 1),
    budget={"data": 1, "correctness": 60, "matmul_peak": 1, "train_step": 8, "evaluation": 2, "end_to_end": 12,
            "loader": 2}, budget_for="2 CPU cores, --jobs 2, estimated")


class OutputError(ValueError):
    pass


# -- what the device runs -------------------------------------------------------------------

def fp16_unsupported(device: torch.device) -> str | None:
    """None when fp16 autocast with a loss-scaled step runs on ``device``; else what it said."""
    try:
        layer = torch.nn.Conv2d(3, 4, 3).to(device)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        scaler = devices.grad_scaler(device.type)
        with torch.autocast(device_type=device.type, dtype=torch.float16):
            loss = layer(torch.randn(2, 3, 8, 8, device=device)).float().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    except Exception as error:  # whatever the device answers, it is the reason for skipping
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"
    return None


def two_processes_refusal(device_type: str) -> str | None:
    """Why evaluation cannot run on 2 processes here, or None. NCCL and HCCL need a device per
    process; gloo (CPU) lets processes share one."""
    count = devices.device_count(device_type)
    if count >= 2 or devices.capabilities(device_type).dist_backend == "gloo":
        return None
    return f"needs 2 {device_type} devices, this machine has {count}"


def threads_per_run(device_type: str, jobs: int) -> int | None:
    """CPU runs side by side share the cores; more OpenMP threads than cores make every
    operator wait (docs/PERFORMANCE.md). An OMP_NUM_THREADS already set wins."""
    if device_type != "cpu" or jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, common.usable_cpus() // jobs)


def check_settings(plan: Plan, device: torch.device, main_flags: list[str], jobs: int) -> CheckSettings:
    caps = devices.capabilities(device.type)
    return CheckSettings(
        device_type=device.type, arch=plan.check_arch, image_size=plan.check_image_size,
        batch_size=plan.check_batch_size, steps=plan.check_steps,
        val_images=plan.check_classes * plan.check_val_per_class, workers=plan.check_workers,
        save_every_steps=max(1, plan.check_steps // 4), run_timeout=plan.run_timeout,
        fp16_unsupported=fp16_unsupported(device), bf16_supported=devices.supports_bf16(device.type),
        channels_last_allowed=caps.channels_last, two_processes=two_processes_refusal(device.type),
        compile_skipped=plan.compile_skipped, main_flags=tuple(main_flags), threads=threads_per_run(device.type, jobs))


def measured_flags(device_type: str) -> tuple[str, ...]:
    """What the speed part measures: main.py ``--amp`` (the ModelZoo scripts' setting) where the
    device's AMP dtype has fast kernels, else fp32 (a CPU without bf16 instructions)."""
    caps = devices.capabilities(device_type)
    fast = caps.default_amp_dtype != torch.bfloat16 or devices.has_fast_bf16(device_type)
    return ("--amp",) if fast else ()


MAX_LOADER_WORKERS = 32  # per device; beyond this the count is not what limits a loader


def worker_counts(plan: Plan) -> tuple[int, ...]:
    """The plan's worker counts, else 1, 2, 4... up to the usable cores."""
    if plan.loader_workers is not None:
        return plan.loader_workers
    cores = min(common.usable_cpus(), MAX_LOADER_WORKERS)
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return tuple(counts)


def speed_settings(plan: Plan, device: torch.device) -> SpeedSettings:
    return SpeedSettings(
        device=device, flags=measured_flags(device.type), archs=("inception_v3", "xception"),
        image_size=plan.image_size, batch_sizes=plan.batch_sizes, warmup_steps=plan.warmup_steps, steps=plan.steps,
        rounds=plan.rounds, matmul_size=plan.matmul_size or (2048 if device.type == "cpu" else 8192),
        eval_steps=plan.eval_steps, e2e_arch="inception_v3", e2e_batch_size=plan.e2e_batch_size,
        e2e_steps=plan.e2e_steps, e2e_fps_warmup_steps=plan.e2e_fps_warmup_steps, folder=plan.folder,
        loader_batch_size=plan.loader_batch_size, loader_batches=plan.loader_batches,
        loader_warmup_batches=plan.loader_warmup_batches, loader_rounds=plan.loader_rounds,
        loader_workers=worker_counts(plan), run_timeout=plan.run_timeout)


# -- the command line -----------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, metavar="DIR", help="where the report and every run's files go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what CI runs on a CPU)")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES)
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help=f"comma-separated: any of the checks ({', '.join(CHECKS)}) and '{SPEED}' "
                             f"(default: everything)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="correctness runs at once (they share the device; the speed part runs alone)")
    parser.add_argument("--main-flags", default="", metavar="FLAGS",
                        help="extra main.py options for every correctness training run, e.g. "
                             "--main-flags=--npu-fused-sgd (with '=': the value starts with a dash)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="where the speed part's JPEG folder is cached (default: as bench/input_pipeline.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report and run folders a previous acceptance left in --output")
    args = parser.parse_args(argv)
    names = [name.strip() for name in (args.only or ",".join([*CHECKS, SPEED])).split(",") if name.strip()]
    unknown = sorted(set(names) - {*CHECKS, SPEED})
    if unknown or not names:
        parser.error(f"--only: {'unknown ' + ', '.join(unknown) if unknown else 'nothing chosen'}; choose from "
                     f"{', '.join(CHECKS)}, {SPEED}")
    args.checks = [check for check in CHECKS if check in names]
    args.speed = SPEED in names
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        prepare_output(Path(args.output), args.overwrite)
    except OutputError as error:
        parser.error(str(error))
    return args


def prepare_output(output: Path, overwrite: bool) -> None:
    """An empty (or new) folder; ``overwrite`` removes what an earlier acceptance wrote, and only that."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file")
    left = [path for path in (*[output / n for n in OUTPUT_FOLDERS], *[output / n for n in REPORT_FILES])
            if path.exists()]
    if left and not overwrite:
        raise OutputError(f"--output {output} holds an earlier acceptance ({left[0].name}); give a new folder "
                          f"or --overwrite")
    for path in left:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)


# -- running --------------------------------------------------------------------------------

def say(line: str) -> None:
    print(line, flush=True)


def check_data(plan: Plan, output: Path) -> Path:
    """A small JPEG ImageFolder for the correctness runs (an odd number of validation images)."""
    return make_imagefolder(output / "data" / "checks", plan.check_classes, plan.check_train_per_class,
                            plan.check_val_per_class, image_size=plan.check_source_size, seed=0)


def correctness(args: argparse.Namespace, plan: Plan, device: torch.device, output: Path,
                budget: dict[str, float]) -> dict[str, Any]:
    if not args.checks:
        return {"skipped": "not chosen (--only)", "passed": True}
    started = time.perf_counter()
    data = check_data(plan, output)
    budget["data"] = budget.get("data", 0.0) + time.perf_counter() - started
    settings = check_settings(plan, device, shlex.split(args.main_flags), args.jobs)
    say(f"correctness: {len(args.checks)} checks, main.py -a {settings.arch} --image-size {settings.image_size} "
        f"-b {settings.batch_size}, {settings.steps} steps, {args.jobs} run(s) at a time")
    started = time.perf_counter()
    results = run_checks(args.checks, settings, data, output / "checks", args.jobs, say)
    budget["correctness"] = time.perf_counter() - started
    checks = [vars(result) for result in results]
    return {"passed": all(check["status"] != FAILED for check in checks), "settings": vars(settings),
            "checks": checks}


def speed(args: argparse.Namespace, plan: Plan, device: torch.device, output: Path,
          budget: dict[str, float]) -> dict[str, Any]:
    if not args.speed:
        return {"skipped": "not chosen (--only)", "passed": True}
    settings = speed_settings(plan, device)
    started = time.perf_counter()
    folder = plan.folder
    data = ensure_jpeg_folder(Path(args.data_dir) if args.data_dir else default_cache_dir() / "bench", folder.classes,
                              folder.train_per_class, folder.val_per_class, folder.source_size)
    budget["data"] = budget.get("data", 0.0) + time.perf_counter() - started
    say(f"speed: main.py {' '.join(settings.flags) or '(fp32)'} at {settings.image_size} px on {device}; "
        f"JPEG folder {data}")
    parts = run_speed(settings, data, output / "speed", say)
    for part, value in parts.items():
        budget[part] = value["seconds"]
    return {"passed": not any("error" in value for value in parts.values()), "image_size": settings.image_size,
            "flags": list(settings.flags), "data": str(data), "parts": parts}


def budget_table(plan: Plan, spent: dict[str, float]) -> dict[str, dict[str, float | None]]:
    parts = list(plan.budget) + [part for part in spent if part not in plan.budget]
    return {part: {"planned_seconds": plan.budget.get(part), "seconds": spent.get(part, 0.0)} for part in parts}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    output = Path(args.output)
    started, started_at = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    device = common.resolve_device(args.device)
    plan = QUICK if args.quick else FULL_CPU if device.type == "cpu" else FULL
    env = acceptance_report.machine(device)
    say(f"acceptance ({plan.mode}) on {env['device']}: {env['host_cpu']}, {env['cpus']} cores, torch "
        f"{torch.__version__}; output {output}")
    spent: dict[str, float] = {}
    checked = correctness(args, plan, device, output, spent)
    measured = speed(args, plan, device, output, spent)
    env["load_average_at_end"] = common.load_average()
    passed = checked["passed"] and measured["passed"]
    report = {"acceptance": {"mode": plan.mode, "passed": passed, "exit_status": 0 if passed else 1,
                             "budget_for": plan.budget_for,
                             "started_at": started_at.isoformat(timespec="seconds"),
                             "seconds": time.perf_counter() - started,
                             "command": shlex.join(["python", "bench/acceptance.py", *(argv or sys.argv[1:])])},
              "machine": env, "correctness": checked, "speed": measured, "budget": budget_table(plan, spent)}
    acceptance_report.write_json(output / "report.json", report)
    (output / "report.md").write_text(acceptance_report.markdown(report), encoding="utf-8")
    if args.speed:
        say("\n" + "\n".join(acceptance_report.speed_section(measured)).rstrip())
    say(f"\n{'PASSED' if passed else 'FAILED'} in {report['acceptance']['seconds']:.0f}s: "
        f"{output / 'report.md'}, {output / 'report.json'}")
    return report["acceptance"]["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
