"""Building a run from its options: the public building steps.

``training.run.Run``, the benchmarks and the tests all build through these functions:
``decide`` (what the device makes of the options, once), ``agree_on_seed``,
``build_data``, ``build_model``, ``choose_precision``, ``build_optimization``,
``prepare_for_precision`` and ``wrap_for_training``; ``build_run`` chains them for main.py
and ``log_start`` says what was built.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import models
from models.errors import UserError
from models.pretrained import published_weights_file
from models.registry import ModelSpec
from training import distributed
from training.data import AugmentSettings, DataSettings, DatasetError, DeviceTransfer, Loaders, build_loaders
from training.device import Capabilities, compile_backend, pin_memory_options
from training.distributed import Topology
from training.averaging import ModelEma, NoAverage
from training.checkpoint import Checkpoint
from training.data.mixing import build_mixer
from training.optim import OptimizerSettings, build_optimizer
from training.config import resolve_options
from training.device import describe
from training.engine import LoopSettings, StepParts
from training.options import PUBLISHED, CommandLine
from training.precision import Precision, build_precision
from training.recipes import REFERENCE_WORLD_SIZE, Recipe, linear_scaling_hint
from training.schedule import LrSchedule
from training.state import RunIdentity, TrainingState
from training.seeding import draw_run_seed

log = logging.getLogger(__name__)


class SetupError(UserError):
    """Options this device or data set cannot honour."""


@dataclass(frozen=True)
class Decisions:
    """What the device's capabilities make of the options; decided once, logged once."""

    channels_last: bool
    compile_backend: str | None
    pin_memory: dict[str, Any]
    side_stream_prefetch: bool
    vendor_fused_sgd: bool
    notes: tuple[str, ...] = ()


def decide(args: argparse.Namespace, caps: Capabilities, topology: Topology) -> Decisions:
    """Check the options against ``caps``; where the device forces a change, say so."""
    notes = []
    if args.channels_last and not caps.channels_last:
        notes.append(f"channels_last is off on {caps.device_type}: its tensors accept the contiguous "
                     f"memory format only")
    backend, refusal = compile_backend(caps) if args.compile else (None, "")
    if args.compile and backend is None:
        raise SetupError(f"--compile on {caps.device_type}: {refusal}")
    if args.sync_bn and topology.distributed and not caps.sync_batchnorm:
        raise SetupError(f"--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm has no {caps.device_type} "
                         f"implementation; leave --sync-bn out to normalise each device's batch on its own")
    if args.npu_fused_sgd and not caps.vendor_fused_sgd:
        raise SetupError(f"--npu-fused-sgd needs an NPU (torch_npu's NpuFusedSGD); this run is on {caps.device_type}")
    return Decisions(channels_last=args.channels_last and caps.channels_last,
                     compile_backend=backend,
                     pin_memory=pin_memory_options(caps), side_stream_prefetch=caps.side_stream_prefetch,
                     vendor_fused_sgd=args.npu_fused_sgd, notes=tuple(notes))


def agree_on_seed(seed: int | None) -> int:
    """``seed``, or one drawn by rank 0 for every rank; torch is seeded with it (model init)."""
    if seed is None:
        seed = distributed.broadcast_object(draw_run_seed())
    torch.manual_seed(seed)
    return seed


# -- data -------------------------------------------------------------------------------

def data_settings(args: argparse.Namespace, spec: ModelSpec) -> DataSettings:
    """What the input pipeline needs from the options."""
    return DataSettings(root=args.data, image_size=args.image_size or spec.preprocess.input_size,
                        batch_size=args.batch_size, dummy_dir=args.dummy_dir, synthetic=args.synthetic,
                        accum_steps=args.accum_steps, workers=args.workers, max_steps=args.max_steps,
                        num_classes=args.num_classes, strict=args.strict_data, augment=augment_settings(args))


def build_data(args: argparse.Namespace, spec: ModelSpec, topology: Topology, device: torch.device,
               decisions: Decisions, seed: int, train: bool = True) -> Loaders:
    """The training (unless ``train`` is False) and validation batches of this rank, on ``device``."""
    transfer = DeviceTransfer(device, channels_last=decisions.channels_last, pin_memory=decisions.pin_memory,
                              side_stream=decisions.side_stream_prefetch)
    return build_loaders(data_settings(args, spec), spec.preprocess, topology, transfer, seed, train=train)


def augment_settings(args: argparse.Namespace) -> AugmentSettings:
    return AugmentSettings(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                           interpolation=args.interpolation, crop_pct=args.crop_pct, auto_augment=args.auto_augment,
                           random_erase=args.random_erase)


def check_evaluated_classes(saved: Checkpoint | None, class_names: list[str], data: str | None) -> None:
    """``-e`` on a checkpoint: its classes must be the validation set's, in the same order (else
    every image would be scored against another class's output)."""
    expected, here = list((saved.class_names if saved else None) or []), list(class_names)
    if not expected or expected == here:
        return
    position = next(i for i in range(max(len(expected), len(here)))
                    if i >= len(expected) or i >= len(here) or expected[i] != here[i])
    theirs = expected[position] if position < len(expected) else None
    ours = here[position] if position < len(here) else None
    raise DatasetError(f"the checkpoint's classes are not those of the validation set in {data or 'the --dummy data'}"
                       f": class {position} is {theirs!r} in the checkpoint, {ours!r} in the data "
                       f"({len(expected)} and {len(here)} classes)")


def num_classes_of(args: argparse.Namespace, class_names: list[str]) -> int:
    if args.num_classes is not None and args.num_classes < len(class_names):
        raise DatasetError(f"--num-classes {args.num_classes} is smaller than the {len(class_names)} class "
                           f"folders in the data set")
    return args.num_classes or len(class_names)


# -- model --------------------------------------------------------------------------------

@dataclass
class BuiltModel:
    model: nn.Module
    options: dict[str, Any] = field(default_factory=dict)  # saved with checkpoints


def _initial_weights(args: argparse.Namespace, spec: ModelSpec, resuming: bool) -> tuple[Any, dict[str, Any]]:
    """(weights file or None, the model options those weights need)."""
    if resuming or args.pretrained is None:
        return None, {}
    if args.pretrained == PUBLISHED:
        return published_weights_file(spec.published), dict(spec.published.model_options)
    return args.pretrained, {}


def build_model(args: argparse.Namespace, spec: ModelSpec, num_classes: int, device: torch.device,
                decisions: Decisions, topology: Topology, saved_options: dict[str, Any] | None = None) -> BuiltModel:
    """The model on ``device``: initial weights (``--pretrained``) unless resuming, aux head per
    ``--aux-loss-weight``, SyncBatchNorm and memory format as decided."""
    weights, options = _initial_weights(args, spec, resuming=saved_options is not None)
    options.update(saved_options or {})
    if spec.aux_head:
        options["aux_logits"] = args.aux_loss_weight > 0
    if args.drop_rate is not None:
        options["dropout"] = args.drop_rate
    model = models.create_model(spec.name, num_classes=num_classes, weights=weights, **options)
    if args.sync_bn and topology.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if decisions.channels_last:
        model.to(memory_format=torch.channels_last)
    # What inference needs to rebuild the model (the aux head and dropout only matter in training).
    saved = {key: value for key, value in options.items() if key not in _TRAINING_ONLY_OPTIONS}
    return BuiltModel(model, saved)


_TRAINING_ONLY_OPTIONS = ("aux_logits", "dropout")


def build_average(args: argparse.Namespace, model: nn.Module) -> ModelEma | NoAverage:
    """The weight average of ``--model-ema`` (on ``model``'s device and memory format), or none."""
    return ModelEma(model, args.model_ema_decay, args.model_ema_warmup) if args.model_ema else NoAverage()


# -- optimisation -----------------------------------------------------------------------------

def choose_precision(args: argparse.Namespace, caps: Capabilities) -> Precision:
    """The precision mode of the options on this device: autocast and loss scaling, decided once."""
    return build_precision(caps.device_type, amp=args.amp, amp_dtype=args.amp_dtype, opt_level=args.opt_level,
                           loss_scale=args.loss_scale, use_apex=args.apex)


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer | None  # None when built for evaluation
    schedule: LrSchedule | None
    settings: OptimizerSettings
    model: nn.Module  # the model the optimizer updates (the precision may have wrapped both)


def optimizer_settings(args: argparse.Namespace) -> OptimizerSettings:
    return OptimizerSettings(args.opt, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                             nesterov=args.nesterov, decay_norm_and_bias=not args.no_bn_weight_decay, eps=args.opt_eps)


def build_optimization(args: argparse.Namespace, model: nn.Module, caps: Capabilities,
                       decisions: Decisions) -> Optimization:
    """Optimizer and learning-rate schedule."""
    settings = optimizer_settings(args)
    optimizer = build_optimizer(model, caps, settings, vendor_fused=decisions.vendor_fused_sgd)
    schedule = LrSchedule(args.lr, args.epochs, args.warm_up_epochs, args.lr_schedule, args.lr_step_epochs,
                          args.lr_gamma)
    return Optimization(optimizer, schedule, settings, model)


def prepare_for_precision(optimization: Optimization, precision: Precision) -> Optimization:
    """The model and optimizer as the precision wants them (apex wraps both; others keep them)."""
    model, optimizer = precision.prepare(optimization.model, optimization.optimizer)
    return replace(optimization, model=model, optimizer=optimizer)


def _no_buffer_sync_per_forward() -> dict[str, bool]:
    # torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (both still sync at init).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@dataclass
class TrainedModel:
    """What the training loop calls, and the context in which a backward skips DDP's gradient
    all-reduce (for every accumulated batch of a step but the last)."""

    module: nn.Module
    no_sync: Callable[[], ContextManager[Any]] = contextlib.nullcontext


def wrap_for_training(model: nn.Module, topology: Topology, device: torch.device,
                      compile_backend: str | None) -> TrainedModel:
    """DistributedDataParallel across processes, then ``torch.compile`` when decided.

    Buffers are not broadcast before every forward (``broadcast_buffers=False``, as ModelZoo):
    rank 0's BatchNorm statistics are the same either way, and are given to every rank before
    each validation (``distributed.broadcast_buffers``).
    """
    trained = TrainedModel(model)
    if topology.distributed:
        ids = [device.index] if device.index is not None else None
        ddp = DistributedDataParallel(model, device_ids=ids, **_no_buffer_sync_per_forward())
        trained = TrainedModel(ddp, ddp.no_sync)
    if compile_backend is not None:
        started = time.perf_counter()
        trained = TrainedModel(torch.compile(trained.module, backend=compile_backend), trained.no_sync)
        log.info("torch.compile (%s) wrapped the model in %.1fs; compilation itself happens in the first "
                 "steps, which the throughput figure leaves out (--fps-warmup-steps)", compile_backend,
                 time.perf_counter() - started)
    return trained


# -- the whole run --------------------------------------------------------------------------

@dataclass
class RunParts:
    """Everything one process of ``main.py`` builds from its options."""

    args: argparse.Namespace  # resolved: what the run really uses
    decisions: Decisions
    loaders: Loaders
    optimization: Optimization
    state: TrainingState
    settings: LoopSettings
    notes: list[str]

    def step_parts(self, trained: TrainedModel) -> StepParts:
        """Accumulation, batch mixing and weight averaging for the training loop."""
        args = self.args
        return StepParts(accum_steps=args.accum_steps, no_sync=trained.no_sync,
                         mix=build_mixer(self.state.identity.num_classes, args.mixup, args.cutmix),
                         average=self.state.average, averaged_model=self.state.model)


def loop_settings(args: argparse.Namespace, topology: Topology, device: torch.device,
                  decisions: Decisions) -> LoopSettings:
    return LoopSettings(device=device, seed=args.seed, rank=topology.process_rank, print_freq=args.print_freq,
                        fps_warmup_steps=args.fps_warmup_steps, clip_grad=args.clip_grad,
                        zero_grad_to_none=not decisions.vendor_fused_sgd, progress=args.progress,
                        show_progress=topology.is_main)


def build_run(command: CommandLine, topology: Topology, device: torch.device, caps: Capabilities,
              saved: Checkpoint | None) -> RunParts:
    """Resolve the options (typed > the resumed checkpoint's > the recipe's) and build the run."""
    resolution = resolve_options(command.args, command.explicit, topology.process_count,
                                 saved.options if saved else None)
    args = resolution.args
    args.seed = agree_on_seed(args.seed)
    decisions = decide(args, caps, topology)
    spec = models.model_spec(args.arch)
    loaders = build_data(args, spec, topology, device, decisions, args.seed, train=not args.evaluate)
    if args.evaluate:
        check_evaluated_classes(saved, loaders.class_names, args.data)
    num_classes = num_classes_of(args, loaders.class_names)
    built = build_model(args, spec, num_classes, device, decisions, topology,
                        saved.model_options_for(spec.options) if saved else None)
    precision = choose_precision(args, caps)
    if args.evaluate:  # evaluation builds no optimizer and no weight average: only the precision (autocast)
        optimization = Optimization(None, None, optimizer_settings(args), built.model)
    else:
        optimization = prepare_for_precision(build_optimization(args, built.model, caps, decisions), precision)
    identity = RunIdentity(spec.name, num_classes, loaders.class_names,
                           args.image_size or spec.preprocess.input_size, built.options)
    state = TrainingState(built.model, optimization.optimizer, precision, optimization.settings,
                          identity, args.seed, loaders.steps_per_epoch,
                          {"world_size": topology.process_count, "batch_size": args.batch_size,
                           "accum_steps": args.accum_steps},
                          average=NoAverage() if args.evaluate else build_average(args, built.model),
                          epoch=args.start_epoch)
    return RunParts(args, decisions, loaders, optimization, state, loop_settings(args, topology, device, decisions),
                    [*decisions.notes, *resolution.notes])


def log_start(parts: RunParts, topology: Topology, device: torch.device) -> None:
    """What the run is: network, data, batch, learning rate, precision, seed, and choices made for the user;
    for an evaluation, only what it depends on: the weights, network, images, device and precision."""
    if parts.args.evaluate:
        _log_evaluation_start(parts, topology, device)
        return
    args, loaders, count = parts.args, parts.loaders, topology.process_count
    log.info("network: %s, %d classes, %d training images, image size %s, device %s, %d process(es)",
             args.arch, parts.state.identity.num_classes, loaders.train_images, args.image_size or "model default",
             describe(device), count)
    log.info("batch size %d per device x %d = %d global%s; lr %g (the %s recipe's unless set)", loaders.batch_size,
             count, loaders.global_batch_size,
             f" x {loaders.accum_steps} accumulated = {loaders.global_batch_size * loaders.accum_steps} per "
             f"optimizer step" if loaders.accum_steps > 1 else "", args.lr,
             "1-device" if count == 1 else f"{REFERENCE_WORLD_SIZE}-device")
    log.info("recipe %s: %s", args.recipe, ", ".join(f"{item.name} {getattr(args, item.name)}"
                                                     for item in fields(Recipe)))
    if count not in (1, REFERENCE_WORLD_SIZE):
        log.info("note: the linear scaling rule from the 1-device recipe suggests --lr %.4g for this global batch; "
                 "it is not applied automatically", linear_scaling_hint(args.arch, count, args.batch_size))
    log.info("precision: %s; seed %d", parts.state.precision.description, args.seed)
    for note in parts.notes:
        log.info("note: %s", note)


def _log_evaluation_start(parts: RunParts, topology: Topology, device: torch.device) -> None:
    args = parts.args
    weights = args.resume or ("the published ImageNet weights" if args.pretrained == PUBLISHED else args.pretrained)
    log.info("evaluating %s: %s, %d classes, image size %s, device %s, %d process(es)", weights, args.arch,
             parts.state.identity.num_classes, parts.state.identity.image_size, describe(device),
             topology.process_count)
    log.info("validation: %d batches of up to %d images per device; precision: %s", len(parts.loaders.val),
             parts.loaders.batch_size, parts.state.precision.description)
    for note in parts.decisions.notes:
        log.info("note: %s", note)
