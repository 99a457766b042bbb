"""The correctness half of ``bench/acceptance.py``: short real trainings through main.py,
a kill and resume, evaluation on 1 and 2 processes, and the ONNX export.

Every check drives the entry points users run (``main.py`` and ``torchrun main.py`` as
subprocesses, ``pthtar2onnx.py``) on a generated JPEG ImageFolder, each run in its own
output folder, and judges them by their files (``metrics.jsonl``, checkpoints read with
``training.checkpoint.load_checkpoint``), never by their internals.

Numbers compared between runs, and why they may differ at all:

* the loss of the first step (same initial weights, same batch): only the arithmetic
  differs. Xception at 48-75 px measured within 4e-4 (fp16), 5e-3 (bf16) and 5e-7 (NCHW)
  of fp32 on a CPU; the tolerances leave room for GPU/NPU kernels (TF32 in the fp32
  reference, other convolution algorithms). Later steps are not compared: a few SGD steps
  on tiny batches amplify rounding, and a dynamic fp16 scale skips its first overflowing
  steps by design. A broken precision path shows as a non-finite loss (main.py stops), a
  missing or moved loss scale in the checkpoint, or a first loss far off.
* weights after a kill and resume: bit-identical wherever uninterrupted runs are (CPUs).
  On devices whose kernels are not deterministic (cuDNN autotuning, atomics in backward)
  more uninterrupted runs measure that spread, and the resumed run must stay within it.
* evaluations of the same weights in different processes: the same image count, the loss
  within ``SAME_WEIGHTS_LOSS_RTOL`` (the kernels chosen depend on the batch), the accuracies
  exactly (within one image where the losses differ at all).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.acceptance_runs import REPO, Outcome, Run, execute, execute_all, failure_line
from training import checkpoint as checkpoints
from training.metrics import read_metrics

FIRST_LOSS_RTOL = {"fp16": 2e-2, "bf16": 4e-2, "layout": 1e-2, "compile": 1e-2, "same": 1e-2}
SAME_WEIGHTS_LOSS_RTOL = 5e-3
# A resumed run may be at most this many times further from the uninterrupted run than
# another uninterrupted run is (asked only where the resumed weights are not bit-identical).
NONDETERMINISM_FACTOR = 10.0
# Uninterrupted runs tried before calling the device deterministic: cuDNN's autotuning may
# pick the same kernels in two processes by chance and different ones in a third.
MAX_AGAIN = 2
STATIC_LOSS_SCALE = 1024  # ModelZoo's default fixed scale
LEARNING_RATE = 0.01  # small enough that a few steps on tiny batches stay finite
AGAIN = "uninterrupted_again"  # the kill/resume check's further uninterrupted runs (_1, _2), when it needs them

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

# Training runs: main.py's precisions and options, name -> flags.
TRAINING_FLAGS = {
    "fp32": (),
    "fp16_static": ("--amp", "--amp-dtype", "float16", "--loss-scale", str(STATIC_LOSS_SCALE)),
    "fp16_dynamic": ("--amp", "--amp-dtype", "float16", "--loss-scale", "dynamic"),
    "bf16": ("--amp", "--amp-dtype", "bfloat16"),
    "nchw": ("--no-channels-last",),
    "compile": ("--compile",),
    "model_ema": ("--model-ema",),
}
# check -> its own runs (the fp32 run, or the kill/resume check's uninterrupted run, is shared).
OWN_RUNS = {"fp32": ("fp32",), "fp16_static": ("fp16_static",), "fp16_dynamic": ("fp16_dynamic",), "bf16": ("bf16",),
            "channels_last": ("nchw",), "compile": ("compile",), "model_ema": ("model_ema", "ema_eval"),
            "kill_resume": ("killed", "resumed", *(f"{AGAIN}_{n}" for n in range(1, MAX_AGAIN + 1))),
            "eval_processes": ("eval_1", "eval_2"),
            "onnx_export": ("onnx",)}
CHECKS = tuple(OWN_RUNS)


@dataclass(frozen=True)
class CheckSettings:
    """What the correctness runs train, on which device, and what the device allows."""

    device_type: str
    arch: str
    image_size: int
    batch_size: int
    steps: int  # one epoch of this many steps
    val_images: int  # the generated validation set's size (odd: 2 processes get unequal shards)
    workers: int | None  # main.py -j (None: main.py's default)
    save_every_steps: int  # the killed run's mid-epoch checkpoints
    run_timeout: float  # seconds before a run counts as hung
    fp16_unsupported: str | None  # why fp16 autocast with loss scaling cannot run here, or None
    bf16_supported: bool
    channels_last_allowed: bool
    two_processes: str | None  # why evaluation cannot run on 2 processes here, or None
    compile_skipped: str | None  # why --compile is not tried (the quick mode), or None
    main_flags: tuple[str, ...] = ()  # the user's extra main.py options for every training run
    threads: int | None = None  # OMP_NUM_THREADS of each run (CPU runs sharing the cores); None: as set


class CheckFailed(Exception):
    """A check's verdict: one line saying what was wrong."""


class CheckSkipped(Exception):
    """A check the device or the installation cannot run (not a failure)."""


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str
    seconds: float = 0.0  # of its own runs
    figures: dict[str, Any] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)


# -- what this device runs ------------------------------------------------------------------

def resume_precision(settings: CheckSettings) -> str:
    """The precision the kill/resume check resumes: the most stateful this device runs, a
    dynamic fp16 loss scale (its scale and growth tracker must come back too), else bf16, else fp32."""
    if settings.fp16_unsupported is None:
        return "fp16_dynamic"
    return "bf16" if settings.bf16_supported else "fp32"


def skip_reasons(settings: CheckSettings) -> dict[str, str]:
    """Checks this device cannot run, and why."""
    reasons = {}
    if settings.fp16_unsupported is not None:
        reasons["fp16_static"] = reasons["fp16_dynamic"] = f"no fp16 autocast here: {settings.fp16_unsupported}"
    if not settings.bf16_supported:
        reasons["bf16"] = f"{settings.device_type} reports no bf16 support"
    if not settings.channels_last_allowed:
        reasons["channels_last"] = (f"the {settings.device_type} capability row keeps NCHW (main.py turns "
                                    f"channels-last off there)")
    if settings.compile_skipped is not None:
        reasons["compile"] = settings.compile_skipped
    if settings.two_processes is not None:
        reasons["eval_processes"] = settings.two_processes
    return reasons


def reference_runs(check: str, settings: CheckSettings) -> tuple[str, ...]:
    """The runs ``check`` compares its own with."""
    if check == "fp32":
        return ()
    return (resume_precision(settings),) if check == "kill_resume" else ("fp32",)


# -- the runs ------------------------------------------------------------------------------

class Layout:
    """Where each check writes: ``<root>/<check>/`` (console logs), main.py's output in ``run/``."""

    def __init__(self, root: Path):
        self.root = root

    def folder(self, check: str) -> Path:
        return self.root / check

    def output(self, check: str) -> Path:
        return self.root / check / "run"

    def log(self, check: str, stem: str = "console") -> Path:
        return self.root / check / f"{stem}.log"


def main_py() -> list[str]:
    return [sys.executable, str(REPO / "main.py")]


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(REPO / "main.py")]


def common_options(settings: CheckSettings, data: Path, output_dir: Path) -> list[str]:
    workers = [] if settings.workers is None else ["-j", str(settings.workers)]
    return ["-a", settings.arch, "--data", str(data), "--image-size", str(settings.image_size),
            "-b", str(settings.batch_size), "--device", settings.device_type, "--progress", "lines",
            "--output_dir", str(output_dir), *workers]


def training_options(settings: CheckSettings, data: Path, output_dir: Path, flags: tuple[str, ...]) -> list[str]:
    """One epoch of ``steps`` steps, every step printed (metrics.jsonl gets each step's loss)."""
    return [*common_options(settings, data, output_dir), "--epochs", "1", "--max-steps", str(settings.steps),
            "--seed", "0", "--lr", str(LEARNING_RATE), "--warm_up_epochs", "0", "--print-freq", "1",
            *settings.main_flags, *flags]


def evaluation_command(command: list[str], settings: CheckSettings, data: Path, output_dir: Path,
                       checkpoint: Path) -> list[str]:
    return [*command, *common_options(settings, data, output_dir), "-e", "--resume", str(checkpoint)]


def plan_runs(checks: list[str], settings: CheckSettings, data: Path, layout: Layout) -> list[Run]:
    """Every process the chosen checks need, with what each waits for."""
    names = {name for check in checks for name in (*reference_runs(check, settings), *OWN_RUNS[check])}
    owner = {run: check for check, owned in OWN_RUNS.items() for run in owned}  # whose folder a run writes in
    runs = [Run(name, [*main_py(), *training_options(settings, data, layout.output(owner[name]), TRAINING_FLAGS[name])],
                layout.log(owner[name]), layout.output(owner[name])) for name in TRAINING_FLAGS if name in names]
    last = checkpoints.LAST_NAME
    fp32_checkpoint = layout.output("fp32") / last
    if "killed" in names:
        folder = layout.output("kill_resume")
        options = training_options(settings, data, folder, (*TRAINING_FLAGS[resume_precision(settings)],
                                                            "--save-every-steps", str(settings.save_every_steps)))
        # The first checkpoint to appear is the mid-epoch one of step save_every_steps: kill then.
        runs.append(Run("killed", [*main_py(), *options], layout.log("kill_resume", "killed"), folder,
                        kill_when=(folder / last).exists, inspect=lambda: saved_position(folder / last)))
        runs.append(Run("resumed", [*main_py(), *options, "--resume", "auto"], layout.log("kill_resume", "resumed"),
                        folder, after=("killed",)))
    for processes, command in ((1, main_py()), (2, torchrun(2))):
        if f"eval_{processes}" in names:
            output = layout.output("eval_processes") / f"{processes}-process"
            runs.append(Run(f"eval_{processes}", evaluation_command(command, settings, data, output, fp32_checkpoint),
                            layout.log("eval_processes", f"{processes}-process"), output, after=("fp32",)))
    if "ema_eval" in names:
        output = layout.folder("model_ema") / "evaluate"
        runs.append(Run("ema_eval", evaluation_command(main_py(), settings, data, output,
                                                       layout.output("model_ema") / last),
                        layout.log("model_ema", "evaluate"), output, after=("model_ema",)))
    if "onnx" in names:
        output = layout.folder("onnx_export")
        runs.append(Run("onnx", [sys.executable, str(REPO / "pthtar2onnx.py"), str(fp32_checkpoint),
                                 "--output", str(output / f"{settings.arch}.onnx")],
                        layout.log("onnx_export"), output, after=("fp32",)))
    return runs


# -- what the runs wrote -------------------------------------------------------------------

def checkpoint_dict(path: Path) -> dict[str, Any]:
    """A checkpoint's contents as a dict, read the way main.py reads it."""
    loaded = checkpoints.load_checkpoint(path)
    return loaded.to_dict() if hasattr(loaded, "to_dict") else loaded


def saved_position(path: Path) -> tuple[int, int]:
    """(epoch, step) of a checkpoint; (-1, -1) when there is none."""
    if not path.is_file():
        return -1, -1
    saved = checkpoint_dict(path)
    return int(saved.get("epoch", -1)), int(saved.get("step", -1))


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def weight_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every floating tensor; an integer buffer that differs counts 1 (0.0: identical)."""
    if a.keys() != b.keys():
        raise CheckFailed(f"the checkpoints hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    difference = norm = 0.0
    for name, tensor in b.items():
        if tensor.is_floating_point():
            difference += float((a[name].double() - tensor.double()).pow(2).sum())
            norm += float(tensor.double().pow(2).sum())
        elif not torch.equal(a[name], tensor):
            difference += 1.0
    return math.sqrt(difference) / max(math.sqrt(norm), 1e-30)


def records(output_dir: Path, mode: str) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"no {path}")
    return [record for record in read_metrics(path) if record.get("mode") == mode]


def only_record(output_dir: Path, mode: str) -> dict[str, Any]:
    """The run's one ``train`` (epoch) or ``evaluate`` record."""
    found = records(output_dir, mode)
    if len(found) != 1:
        raise CheckFailed(f"{output_dir / 'metrics.jsonl'} holds {len(found)} '{mode}' records, not 1")
    return found[0]


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def within_spread(distance: float, spread: float) -> None:
    """The resumed run ``distance`` from the uninterrupted one, where other uninterrupted runs
    landed ``spread`` from it (0.0: bit-identical each time)."""
    if distance == 0.0:
        return
    if spread == 0.0:
        raise CheckFailed(f"the resumed weights are {distance:.2e} from the uninterrupted run's, although "
                          f"{MAX_AGAIN + 1} uninterrupted runs are bit-identical here")
    if distance > NONDETERMINISM_FACTOR * spread:
        raise CheckFailed(f"the resumed weights are {distance:.2e} from the uninterrupted run's, more than "
                          f"{NONDETERMINISM_FACTOR:g}x the {spread:.2e} between two uninterrupted runs")


def same_evaluation(what: str, record: dict[str, Any], reference: dict[str, Any], reference_name: str) -> None:
    """Two evaluations of the same weights: the same image count; the loss within
    ``SAME_WEIGHTS_LOSS_RTOL``; the accuracies exactly when the losses are bit-identical, else
    within one image (different kernels can tip a near tie between two logits)."""
    if record.get("val_images") != reference.get("val_images"):
        raise CheckFailed(f"{what}: {record.get('val_images')} images, {reference_name} {reference.get('val_images')}")
    one_image = 0.0 if record["val_loss"] == reference["val_loss"] else 100.0 / max(record["val_images"], 1)
    for key in ("val_acc1", "val_acc5"):
        if not abs(record[key] - reference[key]) <= one_image * (1 + 1e-9):
            raise CheckFailed(f"{what}: {key} {record[key]} differs from {reference_name}'s {reference[key]}")
    difference = relative_difference(record["val_loss"], reference["val_loss"])
    if not difference <= SAME_WEIGHTS_LOSS_RTOL:
        raise CheckFailed(f"{what}: val_loss {record['val_loss']:.6g} differs from {reference_name}'s "
                          f"{reference['val_loss']:.6g} by {difference:.2e} (> {SAME_WEIGHTS_LOSS_RTOL:g})")


# -- verdicts ------------------------------------------------------------------------------

@dataclass
class Judge:
    """Reads what the runs wrote and decides each check (``check_<name>``: its figures, or
    CheckFailed / CheckSkipped)."""

    settings: CheckSettings
    layout: Layout
    runs: dict[str, Run]
    outcomes: dict[str, Outcome]
    _trained: dict[str, dict[str, Any]] = field(default_factory=dict)

    def finished(self, name: str) -> Outcome:
        outcome = self.outcomes[name]
        if outcome.code != 0:
            raise CheckFailed(f"{name} run: {failure_line(outcome, self.settings.run_timeout)} "
                              f"(log: {self.runs[name].log})")
        return outcome

    def trained(self, name: str) -> dict[str, Any]:
        """A training run that went through its epoch with finite numbers: its figures."""
        if name not in self._trained:
            self._trained[name] = self._read_training(name)
        return dict(self._trained[name])

    def _read_training(self, name: str) -> dict[str, Any]:
        self.finished(name)
        output, settings = self.runs[name].output_dir, self.settings
        steps, epoch = records(output, "step"), only_record(output, "train")
        if not steps or epoch.get("train_steps") != settings.steps:
            raise CheckFailed(f"{name} run trained {epoch.get('train_steps')} steps ({len(steps)} step records), "
                              f"not {settings.steps}")
        for key in ("train_loss", "val_loss"):
            if not math.isfinite(epoch[key]):
                raise CheckFailed(f"{name} run: {key} is {epoch[key]}")
        if epoch.get("val_images") != settings.val_images:
            raise CheckFailed(f"{name} run validated {epoch.get('val_images')} images, not {settings.val_images}")
        skipped = int(epoch.get("skipped_steps") or 0)
        if skipped >= settings.steps:
            raise CheckFailed(f"{name} run skipped all {skipped} steps (overflowing fp16 gradients)")
        saved = checkpoint_dict(output / checkpoints.LAST_NAME)
        bad = first_nonfinite(saved["state_dict"])
        if bad is not None:
            raise CheckFailed(f"{name} run saved a non-finite weight: {bad}")
        return {"first_step_loss": steps[0]["loss"], "train_loss": epoch["train_loss"], "val_loss": epoch["val_loss"],
                "val_acc1": epoch["val_acc1"], "skipped_steps": skipped, "images_per_second": epoch.get("fps"),
                "scaler": saved.get("scaler")}

    def against_fp32(self, name: str, tolerance: str) -> dict[str, Any]:
        """A training run whose first step's loss matches the fp32 run's within ``FIRST_LOSS_RTOL[tolerance]``."""
        reference, figures = self.trained("fp32"), self.trained(name)
        difference = relative_difference(figures["first_step_loss"], reference["first_step_loss"])
        allowed = FIRST_LOSS_RTOL[tolerance]
        figures.update(first_step_loss_fp32=reference["first_step_loss"], first_step_relative_difference=difference)
        if not difference <= allowed:
            raise CheckFailed(f"first step's loss {figures['first_step_loss']:.6g} differs from fp32's "
                              f"{reference['first_step_loss']:.6g} by {difference:.2e} (> {allowed:g})")
        return figures

    def check_fp32(self) -> dict[str, Any]:
        figures = self.trained("fp32")
        if figures["scaler"]:
            raise CheckFailed(f"an fp32 run saved a loss-scaler state: {figures['scaler']}")
        return figures

    def _fp16(self, name: str, expected_scale: float | None) -> dict[str, Any]:
        figures = self.against_fp32(name, "fp16")
        scale = (figures["scaler"] or {}).get("scale")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise CheckFailed(f"{name} run saved no loss scale (scaler state {figures['scaler']})")
        if expected_scale is not None and scale != expected_scale:
            raise CheckFailed(f"the static loss scale moved: {scale:g}, not {expected_scale:g}")
        return {**figures, "loss_scale": scale}

    def check_fp16_static(self) -> dict[str, Any]:
        return self._fp16("fp16_static", float(STATIC_LOSS_SCALE))

    def check_fp16_dynamic(self) -> dict[str, Any]:
        return self._fp16("fp16_dynamic", None)

    def check_bf16(self) -> dict[str, Any]:
        return self.against_fp32("bf16", "bf16")

    def check_channels_last(self) -> dict[str, Any]:
        return self.against_fp32("nchw", "layout")

    def check_compile(self) -> dict[str, Any]:
        outcome = self.outcomes["compile"]
        # main.py's own decision (the capability row completed with what is installed).
        refusal = re.search(r"^error: (--compile on .*)$", outcome.output, flags=re.MULTILINE)
        if outcome.code != 0 and refusal:
            raise CheckSkipped(f"main.py refuses it: {refusal.group(1)}")
        return self.against_fp32("compile", "compile")

    def check_model_ema(self) -> dict[str, Any]:
        """Averaging leaves training alone, its weights are validated and saved, and -e evaluates the
        weights the checkpoint names: the averaged ones unless the raw ones scored better."""
        figures = self.against_fp32("model_ema", "same")
        epoch = only_record(self.runs["model_ema"].output_dir, "train")
        if not math.isfinite(epoch.get("ema_val_loss", math.nan)):
            raise CheckFailed(f"no finite validation of the averaged weights (ema_val_loss "
                              f"{epoch.get('ema_val_loss')})")
        self.finished("ema_eval")
        evaluation = only_record(self.runs["ema_eval"].output_dir, "evaluate")
        expected = "ema" if epoch["ema_val_acc1"] > epoch["val_acc1"] else "model"
        if evaluation.get("weights") != expected:
            raise CheckFailed(f"main.py -e evaluated the {evaluation.get('weights')} weights; the checkpoint's "
                              f"better ones are the {expected} weights (Acc@1 raw {epoch['val_acc1']}, "
                              f"averaged {epoch['ema_val_acc1']})")
        prefix = "ema_" if expected == "ema" else ""
        same_evaluation(f"main.py -e of the saved {'averaged' if prefix else 'raw'} weights", evaluation,
                        {"val_acc1": epoch[f"{prefix}val_acc1"], "val_acc5": epoch[f"{prefix}val_acc5"],
                         "val_loss": epoch[f"{prefix}val_loss"], "val_images": epoch["val_images"]},
                        "the training run's validation of them")
        return {**figures, "ema_val_acc1": epoch["ema_val_acc1"], "ema_val_loss": epoch["ema_val_loss"],
                "evaluated_weights": expected}

    def check_kill_resume(self) -> dict[str, Any]:
        straight = resume_precision(self.settings)
        self.trained(straight)
        killed = self.outcomes["killed"]
        if not killed.killed:
            raise CheckFailed(f"the run ended ({failure_line(killed, self.settings.run_timeout)}) before its first "
                              f"mid-epoch checkpoint, so it could not be killed")
        epoch, step = killed.inspected
        if not (epoch == 0 and 0 < step < self.settings.steps):
            raise CheckFailed(f"the kill left a checkpoint at epoch {epoch} step {step}, not inside epoch 0")
        self.trained("resumed")
        folder = self.runs["resumed"].output_dir
        images = only_record(folder, "train").get("train_images")
        if images != self.settings.steps * self.settings.batch_size:
            raise CheckFailed(f"the resumed epoch counts {images} images, not {self.settings.steps} x "
                              f"{self.settings.batch_size}: the steps before the kill are missing from its sums")
        reference = checkpoint_dict(self.runs[straight].output_dir / checkpoints.LAST_NAME)["state_dict"]
        distance = weight_distance(checkpoint_dict(folder / checkpoints.LAST_NAME)["state_dict"], reference)
        figures = {"straight_run": straight, "killed_at_step": step, "steps": self.settings.steps,
                   "killed_after_seconds": killed.seconds, "weight_distance": distance}
        if distance == 0.0:
            return figures
        spread = 0.0
        for attempt in range(1, MAX_AGAIN + 1):
            spread = weight_distance(self.uninterrupted_again(straight, attempt), reference)
            if spread > 0.0:
                break
        figures["uninterrupted_runs_distance"] = spread
        within_spread(distance, spread)
        return figures

    def uninterrupted_again(self, name: str, attempt: int) -> dict[str, torch.Tensor]:
        """The uninterrupted run once more: how far apart two runs land on this device."""
        original, again = self.runs[name], f"{AGAIN}_{attempt}"
        output = self.layout.folder("kill_resume") / f"uninterrupted-{attempt}"
        command = [str(output) if part == str(original.output_dir) else part for part in original.command]
        self.runs[again] = Run(again, command, self.layout.log("kill_resume", f"uninterrupted-{attempt}"), output)
        self.outcomes[again] = execute(self.runs[again], self.settings.run_timeout, self.settings.threads)
        self.trained(again)
        return checkpoint_dict(output / checkpoints.LAST_NAME)["state_dict"]

    def check_eval_processes(self) -> dict[str, Any]:
        """-e on 1 and on 2 processes, and the training run's own validation: the same weights, the same figures."""
        self.trained("fp32")
        evaluations = {}
        for name in ("eval_1", "eval_2"):
            self.finished(name)
            evaluations[name] = only_record(self.runs[name].output_dir, "evaluate")
        validation = only_record(self.runs["fp32"].output_dir, "train")
        same_evaluation("1 process", evaluations["eval_1"], validation, "the training run's validation")
        same_evaluation("2 processes", evaluations["eval_2"], evaluations["eval_1"], "1 process")
        return {"val_images": evaluations["eval_1"]["val_images"], "val_acc1": evaluations["eval_1"]["val_acc1"],
                "val_loss_1_process": evaluations["eval_1"]["val_loss"],
                "val_loss_2_processes": evaluations["eval_2"]["val_loss"]}

    def check_onnx_export(self) -> dict[str, Any]:
        """pthtar2onnx.py checks parity itself (onnxruntime against PyTorch) and exits 1 beyond its tolerance."""
        self.trained("fp32")
        outcome = self.finished("onnx")
        written = self.runs["onnx"].output_dir / f"{self.settings.arch}.onnx"
        if not written.is_file():
            raise CheckFailed(f"pthtar2onnx.py exited 0 but wrote no {written}")
        found = re.search(r"max abs difference ([0-9.eE+-]+)", outcome.output)
        return {"max_abs_difference": float(found.group(1)) if found else None, "onnx_bytes": written.stat().st_size}


def describe(check: str, figures: dict[str, Any]) -> str:
    """The one line a passed check reports."""
    if check == "kill_resume":
        same = ("bit-identical weights" if figures["weight_distance"] == 0.0 else
                f"weights {figures['weight_distance']:.1e} apart, within {NONDETERMINISM_FACTOR:g}x the "
                f"{figures['uninterrupted_runs_distance']:.1e} between two uninterrupted runs")
        return (f"{figures['straight_run']} killed at step {figures['killed_at_step']} of {figures['steps']}, "
                f"resumed: {same}")
    if check == "eval_processes":
        return f"same {figures['val_images']} images, Acc@1 {figures['val_acc1']:.3f} on 1 and 2 processes"
    if check == "onnx_export":
        difference = figures["max_abs_difference"]
        return "onnxruntime matches PyTorch" + (f" (max abs difference {difference:.1e})" if difference is not None
                                                else "")
    if check == "model_ema":
        return (f"training as fp32's (first step's loss within {figures['first_step_relative_difference']:.1e}); "
                f"averaged weights validated at Acc@1 {figures['ema_val_acc1']:.3f}; main.py -e took the "
                f"{'averaged' if figures['evaluated_weights'] == 'ema' else 'raw'} ones, the better, as trained")
    if "first_step_relative_difference" in figures:
        text = f"first step's loss within {figures['first_step_relative_difference']:.1e} of fp32's"
    else:
        text = f"trained, loss {figures['train_loss']:.4f}"
    if figures.get("loss_scale"):
        text += f"; loss scale {figures['loss_scale']:g}"
    if figures.get("skipped_steps"):
        text += f"; {figures['skipped_steps']} overflowing step(s) skipped"
    return text


def judge(check: str, referee: Judge) -> CheckResult:
    """The check's verdict; its time is that of its own runs."""
    try:
        figures = getattr(referee, f"check_{check}")()
        status, detail = PASSED, describe(check, figures)
    except CheckSkipped as reason:
        status, detail, figures = SKIPPED, str(reason), {}
    except CheckFailed as reason:
        status, detail, figures = FAILED, str(reason), {}
    figures.pop("scaler", None)
    own = [name for name in OWN_RUNS[check] if name in referee.runs]
    return CheckResult(check, status, detail, sum(referee.outcomes[name].seconds for name in own), figures,
                       sorted({str(referee.runs[name].log.parent) for name in own}))


def run_checks(checks: list[str], settings: CheckSettings, data: Path, root: Path, jobs: int,
               progress: Callable[[str], None] = lambda line: None) -> list[CheckResult]:
    """Run the checks this device can run; a result for every check asked for."""
    reasons = skip_reasons(settings)
    layout = Layout(root)
    runs = plan_runs([check for check in checks if check not in reasons], settings, data, layout)

    def finished(run: Run, outcome: Outcome) -> None:
        state = "killed on purpose" if outcome.killed else f"exit status {outcome.code}"
        progress(f"  run {run.name}: {state} after {outcome.seconds:.1f}s")

    outcomes = execute_all(runs, jobs, settings.run_timeout, settings.threads, finished)
    referee = Judge(settings, layout, {run.name: run for run in runs}, outcomes)
    results = []
    for check in checks:
        result = CheckResult(check, SKIPPED, reasons[check]) if check in reasons else judge(check, referee)
        progress(f"{result.status:7s} {check}: {result.detail}")
        results.append(result)
    return results
