"""Turn parsed options into a run: device, data, model, optimizer, precision, then epochs.

``main()`` is what ``python main.py`` calls. It runs one worker in this process (plain or
under torchrun), or spawns one per device for ``--multiprocessing-distributed``.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import models
from models.weights import WeightsError, extract_state_dict, load_weights
from training import checkpoint as checkpoints
from training import device as devices
from training import distributed
from training.data import (DatasetError, DeviceLoader, EvalShardSampler, build_datasets, build_loader,
                           default_workers)
from training.dummy_data import ensure_dummy_imagefolder
from training.engine import LoopSettings, NonFiniteLossError, TrainingLoss, evaluate, train_one_epoch
from training.metrics import MetricsWriter, setup_logging
from training.optim import build_optimizer
from training.options import parse_args, resolve_recipe
from training.precision import Precision, build_precision, initialize_apex
from training.recipes import REFERENCE_WORLD_SIZE, linear_scaling_hint
from training.schedule import LrCurve, build_scheduler, restore_position
from training.synthetic import SYNTHETIC_NUM_CLASSES, SYNTHETIC_STEPS, SYNTHETIC_VAL_STEPS, SyntheticBatches

log = logging.getLogger("training")

USER_ERRORS = (DatasetError, checkpoints.CheckpointError, WeightsError, devices.DeviceError,
               NonFiniteLossError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.multiprocessing_distributed:
        try:
            distributed.spawn(worker, args.device_list, args.world_size, args.rank, args.addr, args.port,
                              args.dist_url, args)
        except Exception as error:  # a worker failed; it has logged why
            print(f"error: a training process failed: {str(error).strip().splitlines()[0]}", file=sys.stderr)
            return 1
        return 0
    try:
        worker(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def worker(args: argparse.Namespace, device_index: int | None = None) -> None:
    """One process of the job: set up the device and process group, run, clean up."""
    info = distributed.from_environment()
    setup_logging(info.rank, info.world_size)
    try:
        index = device_index if device_index is not None else (args.device_id if not info.enabled else None)
        plan = devices.select_device(args.device, index, local_rank=info.local_rank)
        device = devices.bind(plan, args.npu_binary_kernels)
        distributed.init_process_group(info, args.dist_backend or devices.dist_backend(plan.type), device,
                                       args.dist_timeout, init_method=None)
        try:
            Run(args, info, device).execute()
        finally:
            distributed.destroy_process_group()
    except USER_ERRORS as error:
        logging.getLogger("training").error("error: %s", error)
        raise SystemExit(1) from None


@dataclass
class Loaders:
    train: DeviceLoader | SyntheticBatches
    val: DeviceLoader | SyntheticBatches
    class_names: list[str]
    train_images: int


class Run:
    """Everything one process builds from the options, and the epoch loop over it."""

    def __init__(self, args: argparse.Namespace, info: distributed.DistInfo, device: torch.device):
        self.args = resolve_recipe(args, info.world_size)
        self.info = info
        self.device = device
        self.output_dir = Path(args.output_dir)
        self.seed = self._agree_on_seed(args.seed)

    # -- set-up ---------------------------------------------------------------------------

    def _agree_on_seed(self, seed: int | None) -> int:
        if seed is None:
            seed = distributed.broadcast_object(random.SystemRandom().randrange(2**31))
        torch.manual_seed(seed)  # identical model initialisation on every rank
        random.seed(seed + self.info.rank)
        return seed

    def _seed_epoch(self, epoch: int) -> None:
        """Per-epoch RNG state (dropout, in-process augmentation), so that a resumed run
        replays the epochs an uninterrupted one would have run."""
        torch.manual_seed(self.seed + 7919 * (epoch + 1) + self.info.rank)

    def _data_root(self) -> Path:
        if self.args.data is not None:
            return Path(self.args.data)
        if self.info.is_main:
            root = ensure_dummy_imagefolder(self.args.dummy_dir)
        distributed.barrier()
        if not self.info.is_main:
            root = ensure_dummy_imagefolder(self.args.dummy_dir)
        return root

    def _synthetic_loaders(self, image_size: int) -> Loaders:
        args = self.args
        num_classes = args.num_classes or SYNTHETIC_NUM_CLASSES
        steps = min(SYNTHETIC_STEPS, args.max_steps or SYNTHETIC_STEPS)
        make = dict(batch_size=args.batch_size, image_size=image_size, num_classes=num_classes,
                    device=self.device, channels_last=args.channels_last, seed=self.seed)
        train = SyntheticBatches(steps=steps, **make)
        names = [f"class_{index}" for index in range(num_classes)]
        return Loaders(train, SyntheticBatches(steps=SYNTHETIC_VAL_STEPS, **make), names, train.num_images)

    def _loaders(self, preprocess: models.PreprocessConfig) -> Loaders:
        args, info = self.args, self.info
        image_size = args.image_size or preprocess.input_size
        if args.synthetic:
            return self._synthetic_loaders(image_size)
        train_set, val_set = build_datasets(self._data_root(), image_size, preprocess, strict=args.strict_data)
        global_batch = args.batch_size * info.world_size
        if len(train_set) < global_batch:
            raise DatasetError(f"the training set has {len(train_set)} images, fewer than one batch "
                               f"({args.batch_size} per device x {info.world_size} devices)")
        workers = args.workers if args.workers is not None else default_workers(info.local_world_size)
        pin = devices.supports_pinned_memory(self.device.type)
        train_sampler = (torch.utils.data.DistributedSampler(train_set, info.world_size, info.rank, shuffle=True,
                                                             seed=self.seed, drop_last=True)
                         if info.enabled else None)
        val_sampler = EvalShardSampler(len(val_set), info.rank, info.world_size) if info.enabled else None
        loader_seed = self.seed + 1000 * info.rank  # different augmentation stream per rank
        train = build_loader(train_set, args.batch_size, train=True, workers=workers, sampler=train_sampler,
                             seed=loader_seed, pin_memory=pin)
        val = build_loader(val_set, args.batch_size, train=False, workers=workers, sampler=val_sampler,
                           seed=loader_seed, pin_memory=pin)
        wrap = dict(device=self.device, mean=preprocess.mean, std=preprocess.std,
                    channels_last=args.channels_last)
        return Loaders(DeviceLoader(train, **wrap), DeviceLoader(val, **wrap), list(train_set.classes),
                       len(train_set))

    def _model(self, num_classes: int) -> nn.Module:
        args = self.args
        has_aux_head = "aux_logits" in models.model_options(args.arch)
        options = {"aux_logits": args.aux_loss_weight > 0} if has_aux_head else {}
        weights = args.pretrained if not args.resume else None
        model = models.create_model(args.arch, num_classes=num_classes, weights=weights, **options)
        if args.sync_bn and self.info.enabled:
            distributed.check_sync_bn(self.device.type)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _num_classes(self, class_names: list[str]) -> int:
        requested = self.args.num_classes
        if requested is not None and requested < len(class_names):
            raise DatasetError(f"--num-classes {requested} is smaller than the {len(class_names)} class "
                               f"folders in the data set")
        return requested or len(class_names)

    def _log_setup(self, precision: Precision, num_classes: int, num_images: int) -> None:
        args, info = self.args, self.info
        log.info("arch %s, %d classes, %d training images, image size %s, device %s, %d process(es)",
                 args.arch, num_classes, num_images, args.image_size or "model default",
                 devices.describe(self.device), info.world_size)
        log.info("batch size %d per device x %d = %d global; lr %g (the %s recipe's unless set)",
                 args.batch_size, info.world_size, args.batch_size * info.world_size, args.lr,
                 "1-device" if info.world_size == 1 else f"{REFERENCE_WORLD_SIZE}-device")
        if info.world_size not in (1, REFERENCE_WORLD_SIZE):
            log.info("note: the linear scaling rule from the 1-device recipe suggests --lr %.4g for this "
                     "global batch; it is not applied automatically",
                     linear_scaling_hint(args.arch, info.world_size, args.batch_size))
        log.info("precision: %s; seed %d", precision.description, self.seed)

    # -- the run --------------------------------------------------------------------------

    def execute(self) -> None:
        args, info = self.args, self.info
        preprocess = models.preprocess_config(args.arch)
        loaders = self._loaders(preprocess)
        num_classes = self._num_classes(loaders.class_names)
        model = self._model(num_classes)
        optimizer = build_optimizer(model, self.device.type, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, nesterov=args.nesterov,
                                    decay_norm_and_bias=not args.no_bn_weight_decay)
        precision = build_precision(self.device.type, amp=args.amp, amp_dtype=args.amp_dtype,
                                    opt_level=args.opt_level, loss_scale=args.loss_scale, use_apex=args.apex)
        model, optimizer = initialize_apex(precision, model, optimizer, args.opt_level, args.loss_scale)
        steps_per_epoch = min(len(loaders.train), args.max_steps or len(loaders.train))
        scheduler = build_scheduler(optimizer, LrCurve(steps_per_epoch, args.epochs, args.warm_up_epochs,
                                                       args.lr_schedule, args.lr_step_epochs, args.lr_gamma))
        self._log_setup(precision, num_classes, loaders.train_images)
        state = State(args.start_epoch)
        self._restore(state, model, optimizer, scheduler, precision, num_classes, steps_per_epoch)
        settings = LoopSettings(device=self.device, print_freq=args.print_freq,
                                fps_warmup_steps=args.fps_warmup_steps, max_steps=args.max_steps,
                                clip_grad=args.clip_grad, progress=args.progress, show_progress=info.is_main)
        writer = MetricsWriter(self.output_dir, enabled=info.is_main)
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        try:
            if args.evaluate:
                metrics = evaluate(model, loaders.val, criterion, precision, settings)
                writer.write({"mode": "evaluate", "epoch": state.epoch, "arch": args.arch, **metrics})
                return
            self._write_args()
            trained = self._wrap_for_training(model)
            loss_fn = TrainingLoss(args.label_smoothing, args.aux_loss_weight)
            for epoch in range(state.epoch, args.epochs):
                self._seed_epoch(epoch)
                loaders.train.set_epoch(epoch)
                record = train_one_epoch(trained, loaders.train, loss_fn, optimizer, scheduler, precision,
                                         epoch, settings)
                distributed.broadcast_buffers(model)  # validate (and save) rank 0's BatchNorm statistics
                record.update(evaluate(model, loaders.val, criterion, precision, settings))
                state.finish_epoch(epoch + 1, record["val_acc1"])
                self._save(state, model, optimizer, scheduler, precision, num_classes, loaders.class_names)
                writer.write(self._epoch_record(state, record))
        finally:
            writer.close()

    def _wrap_for_training(self, model: nn.Module) -> nn.Module:
        trained = model
        if self.info.enabled:
            ids = [self.device.index] if self.device.index is not None else None
            trained = DistributedDataParallel(model, device_ids=ids)
        if self.args.compile:
            started = time.perf_counter()
            trained = torch.compile(trained)
            log.info("torch.compile wrapped the model in %.1fs; compilation itself happens in the first "
                     "steps, which the FPS figure leaves out (--fps-warmup-steps)", time.perf_counter() - started)
        return trained

    def _epoch_record(self, state: "State", record: dict[str, Any]) -> dict[str, Any]:
        args, info = self.args, self.info
        return {"mode": "train", "epoch": state.epoch, "epochs": args.epochs, "arch": args.arch,
                "world_size": info.world_size, "batch_size": args.batch_size,
                "global_batch_size": args.batch_size * info.world_size, **record,
                "best_acc1": state.best_acc1, "is_best": state.is_best}

    def _write_args(self) -> None:
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.json").write_text(json.dumps(vars(self.args), indent=2, default=str) + "\n")

    # -- checkpoints ----------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        if not self.args.resume:
            return None
        if self.args.resume != "auto":
            return Path(self.args.resume)
        found = checkpoints.find_resume_checkpoint(self.output_dir) if self.info.is_main else None
        found = distributed.broadcast_object(found)
        log.info("--resume auto: %s", f"resuming from {found}" if found else "no checkpoint yet, starting fresh")
        return found

    def _restore(self, state: "State", model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, precision: Precision, num_classes: int, steps_per_epoch: int) -> None:
        path = self._resume_path()
        if path is None:
            if state.epoch:
                scheduler.last_epoch = state.epoch * steps_per_epoch - 1
                scheduler.step()
            return
        saved = checkpoints.load_checkpoint(path)
        checkpoints.check_compatible(saved, path, self.args.arch, num_classes)
        load_weights(model, extract_state_dict(saved), strict_head=True)
        state.epoch, state.best_acc1 = int(saved.get("epoch", 0)), float(saved.get("best_acc1", 0.0))
        if not self.args.evaluate:
            self._restore_training_state(saved, path, optimizer, scheduler, precision)
        log.info("loaded %s (epoch %d, best Acc@1 %.3f)", path, state.epoch, state.best_acc1)

    @staticmethod
    def _restore_training_state(saved: dict[str, Any], path: Path, optimizer: torch.optim.Optimizer,
                                scheduler: Any, precision: Precision) -> None:
        missing = [key for key in ("optimizer", "scheduler") if saved.get(key) is None]
        if missing:
            raise checkpoints.CheckpointError(f"{path} has no {' or '.join(missing)} state to resume "
                                              f"training from; use it with --pretrained instead")
        optimizer.load_state_dict(saved["optimizer"])
        restore_position(scheduler, saved["scheduler"])
        precision.load_state_dict(saved.get("scaler"))

    def _save(self, state: "State", model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              precision: Precision, num_classes: int, class_names: list[str]) -> None:
        if not self.info.is_main:
            return
        payload = {"format_version": checkpoints.FORMAT_VERSION, "arch": self.args.arch, "epoch": state.epoch,
                   "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                   "best_acc1": state.best_acc1, "num_classes": num_classes, "class_names": class_names,
                   "image_size": self.args.image_size or model.preprocess.input_size,
                   "args": json.loads(json.dumps(vars(self.args), default=str))}
        checkpoints.save_checkpoint(payload, self.output_dir / checkpoints.LAST_NAME)
        if state.is_best:
            checkpoints.save_checkpoint(payload, self.output_dir / checkpoints.BEST_NAME)


@dataclass
class State:
    """Where the run stands: completed epochs and the best validation accuracy."""

    epoch: int = 0
    best_acc1: float = 0.0
    is_best: bool = False

    def finish_epoch(self, epoch: int, acc1: float) -> None:
        self.epoch = epoch
        self.is_best = acc1 > self.best_acc1 or epoch == 1
        self.best_acc1 = max(acc1, self.best_acc1)
