"""What ``python main.py`` runs: the launcher, one worker process, and the epoch loop.

``main()`` runs one worker in this process (plain or under torchrun), or, for ModelZoo's
``--multiprocessing-distributed``, one per device of the node. ``worker()`` binds the
device and joins the process group; ``Run`` builds the run (``training.setup``) and loops
over epochs. Exit status: 0 done, 1 a user error (one line, no traceback), 2 bad options,
75 (``PREEMPTED_EXIT_CODE``) stopped on SIGTERM/SIGUSR1 after writing a checkpoint; a bug
keeps its traceback.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from models.errors import UserError
from training import checkpoint as checkpoints
from training import device as devices
from training import distributed
from training.config import divide_per_node, resolve_options
from training.distributed import DistributedError, NodeLayout, Topology
from training.engine import EpochPosition, LoopSettings, TrainingLoss, evaluate, train_one_epoch
from training.metrics import MetricsWriter, RunningSums, setup_logging
from training.options import CommandLine, parse_command_line, warn_ignored_options
from training.preemption import PREEMPTED_EXIT_CODE, Preempted, RunControl, StopSignals
from training.recipes import REFERENCE_WORLD_SIZE, linear_scaling_hint
from training.setup import (Loaders, Optimization, agree_on_seed, build_loaders, build_model, build_optimization,
                            decide, num_classes_of, wrap_for_training)
from training.state import RunIdentity, TrainingState

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    command = parse_command_line(argv)
    if command.args.multiprocessing_distributed:
        return launch_node(command)
    return worker(command)


def launch_node(command: CommandLine) -> int:
    """``--multiprocessing-distributed``: one process per device of this node (or, with
    ``--gpu N``, only device N's process: ModelZoo's one-command-per-device loop)."""
    setup_logging(0, 1)
    args = command.args
    try:
        ids = args.device_list or devices.visible_device_ids(devices.select_device(args.device).type)
        note = divide_per_node(args, len(ids))
        host, port = distributed.rendezvous_address(args.dist_url, args.addr, args.port)
        layout = NodeLayout(tuple(ids), max(args.nodes, 1), max(args.node_rank, 0), host, port)
        if args.device_id is not None and args.device_id not in ids:
            raise DistributedError(f"--gpu {args.device_id} is not in the device list {ids}")
    except UserError as error:
        log.error("error: %s", error)
        return EXIT_USER_ERROR
    if note:
        log.info("%s", note)
    if args.device_id is not None:
        distributed.set_process_environment(layout, ids.index(args.device_id))
        return worker(command, device_index=args.device_id)
    return _spawn(layout, command)


def _spawn(layout: NodeLayout, command: CommandLine) -> int:
    try:
        distributed.spawn(worker, layout, command)
    except torch.multiprocessing.ProcessExitedException as error:
        return error.exit_code if error.exit_code and error.exit_code > 0 else EXIT_USER_ERROR
    except torch.multiprocessing.ProcessRaisedException as error:
        log.error("error: a training process failed: %s", str(error).strip().splitlines()[-1])
        return EXIT_USER_ERROR
    return 0


def worker(command: CommandLine, device_index: int | None = None) -> int:
    """One process of the job: bind the device, join the process group, run; the exit status."""
    topology = distributed.from_environment()
    setup_logging(topology.process_rank, topology.process_count)
    if topology.is_main:
        warn_ignored_options(command.args)
    signals = StopSignals()
    with signals.installed():
        try:
            _run_on_device(command, topology, signals, device_index)
        except Preempted:
            return PREEMPTED_EXIT_CODE
        except UserError as error:
            log.error("error: %s", error)
            return EXIT_USER_ERROR
    return 0


def _run_on_device(command: CommandLine, topology: Topology, signals: StopSignals, device_index: int | None) -> None:
    args = command.args
    index = device_index if device_index is not None else (None if topology.distributed else args.device_id)
    plan = devices.select_device(args.device, index, local_rank=topology.local_rank)
    device = devices.bind(plan, args.npu_binary_kernels)
    caps = devices.capabilities(plan.type)
    backend = args.dist_backend or caps.dist_backend
    if topology.distributed and backend in ("hccl", "nccl") and backend != caps.dist_backend:
        raise DistributedError(f"--dist-backend {backend} does not run on {plan.type}; use {caps.dist_backend}")
    distributed.init_process_group(topology, backend, device, args.dist_timeout, caps.collective_dtypes)
    try:
        Run(command, topology, device, caps, signals).execute()
    finally:
        distributed.destroy_process_group()


class Run:
    """One process's run: resolve the options, build, then evaluate or train epoch by epoch."""

    def __init__(self, command: CommandLine, topology: Topology, device: torch.device,
                 caps: devices.Capabilities, signals: StopSignals | None = None):
        self.command, self.topology, self.device, self.caps = command, topology, device, caps
        self.signals = signals or StopSignals()
        self.output_dir = Path(command.args.output_dir)

    def execute(self) -> None:
        resumed, saved = self._checkpoint_to_resume()
        resolution = resolve_options(self.command.args, self.command.explicit, self.topology.process_count,
                                     saved.get("args") if saved else None)
        args = self.args = resolution.args
        args.seed = agree_on_seed(args.seed)
        decisions = decide(args, self.caps, self.topology)
        spec = models.model_spec(args.arch)
        loaders = build_loaders(args, spec, self.topology, self.device, decisions, args.seed)
        num_classes = num_classes_of(args, loaders.class_names)
        built = build_model(args, spec, num_classes, self.device, decisions, self.topology,
                            saved.get("model_options", {}) if saved else None)
        optimization = build_optimization(args, built.model, self.caps, decisions)
        identity = RunIdentity(spec.name, num_classes, loaders.class_names,
                               args.image_size or spec.preprocess.input_size, built.options)
        state = TrainingState(built.model, optimization.optimizer, optimization.precision, optimization.sgd,
                              identity, args.seed, loaders.steps_per_epoch,
                              {"world_size": self.topology.process_count, "batch_size": args.batch_size},
                              epoch=args.start_epoch)
        _log_start(args, self.topology, self.device, loaders, optimization, [*decisions.notes, *resolution.notes])
        if saved:
            explicit_start = args.start_epoch if "start_epoch" in self.command.explicit else None
            state.restore(saved, resumed, training=not args.evaluate, start_epoch=explicit_start)
        settings = LoopSettings(device=self.device, seed=args.seed, rank=self.topology.process_rank,
                                print_freq=args.print_freq, fps_warmup_steps=args.fps_warmup_steps,
                                clip_grad=args.clip_grad, zero_grad_to_none=not decisions.vendor_fused_sgd,
                                progress=args.progress, show_progress=self.topology.is_main)
        writer = MetricsWriter(self.output_dir, enabled=self.topology.is_main)
        try:
            if args.evaluate:
                metrics = evaluate(state.model, loaders.val, nn.CrossEntropyLoss(), state.precision, settings)
                writer.write({"mode": "evaluate", "epoch": state.epoch, "arch": args.arch, **metrics})
                return
            self._write_args()
            trained = wrap_for_training(optimization.model, self.topology, self.device, decisions.compile_backend)
            self._train(state, trained, loaders, optimization, settings, writer)
        finally:
            writer.close()

    def _train(self, state: TrainingState, trained: nn.Module, loaders: Loaders, optimization: Optimization,
               settings: LoopSettings, writer: MetricsWriter) -> None:
        args = self.args
        loss_fn = TrainingLoss(args.label_smoothing, args.aux_loss_weight)
        control = RunControl(self.signals, lambda *at: self._save_mid_epoch(state, *at), args.save_every,
                             args.save_every_steps, self.topology.is_main)
        for epoch in range(state.epoch, args.epochs):
            position = EpochPosition(epoch, loaders.steps_per_epoch, state.step if epoch == state.epoch else 0)
            loaders.train.set_epoch(epoch)
            loaders.train.skip(position.start_step * args.batch_size)
            sums = RunningSums(self.device)
            if state.epoch_sums and self.topology.is_main:
                sums.load_state_dict(state.epoch_sums)  # the job's sums of the steps done before the resume
            record = train_one_epoch(trained, loaders.train, loss_fn, optimization.optimizer, optimization.schedule,
                                     state.precision, position, settings, sums, control, writer.write)
            if record.pop("interrupted"):
                raise Preempted()
            distributed.broadcast_buffers(state.model)  # validate (and save) rank 0's BatchNorm statistics
            record.update(evaluate(state.model, loaders.val, nn.CrossEntropyLoss(), state.precision, settings))
            state.finish_epoch(epoch + 1, record["val_acc1"])
            self._save(state, best=state.is_best)
            writer.write(self._epoch_record(state, record))
            control.epoch_saved()
            if control.stop_requested():
                raise Preempted()

    def _save_mid_epoch(self, state: TrainingState, position: EpochPosition, steps_done: int,
                        sums: RunningSums) -> None:
        state.epoch, state.step, state.epoch_sums = position.epoch, steps_done, sums.job_state_dict()
        self._save(state, best=False)
        log.info("saved %s at epoch %d step %d of %d", self.output_dir / checkpoints.LAST_NAME, position.epoch,
                 steps_done, position.steps)

    def _save(self, state: TrainingState, best: bool) -> None:
        if not self.topology.is_main:
            return
        payload = state.state_dict(_plain(vars(self.args)))
        checkpoints.save_checkpoint(payload, self.output_dir / checkpoints.LAST_NAME)
        if best:
            checkpoints.save_checkpoint(payload, self.output_dir / checkpoints.BEST_NAME)

    def _epoch_record(self, state: TrainingState, record: dict[str, Any]) -> dict[str, Any]:
        args, count = self.args, self.topology.process_count
        return {"mode": "train", "epoch": state.epoch, "epochs": args.epochs, "arch": args.arch,
                "world_size": count, "batch_size": args.batch_size, "global_batch_size": args.batch_size * count,
                **record, "best_acc1": state.best_acc1, "is_best": state.is_best}

    def _write_args(self) -> None:
        if self.topology.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.json").write_text(json.dumps(_plain(vars(self.args)), indent=2) + "\n")

    def _checkpoint_to_resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        args = self.command.args
        if not args.resume:
            return None, None
        path = Path(args.resume) if args.resume != "auto" else self._find_auto_resume()
        return (path, checkpoints.load_checkpoint(path)) if path is not None else (None, None)

    def _find_auto_resume(self) -> Path | None:
        found = checkpoints.find_resume_checkpoint(self.output_dir) if self.topology.is_main else None
        found = distributed.broadcast_object(found)
        log.info("--resume auto: %s", f"resuming from {found}" if found else "no checkpoint yet, starting fresh")
        return found


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values (paths and the like as strings)."""
    return json.loads(json.dumps(options, default=str))


def _log_start(args: Any, topology: Topology, device: torch.device, loaders: Loaders, optimization: Optimization,
               notes: list[str]) -> None:
    count = topology.process_count
    log.info("network: %s, %d classes, %d training images, image size %s, device %s, %d process(es)",
             args.arch, len(loaders.class_names) if args.num_classes is None else args.num_classes,
             loaders.train_images, args.image_size or "model default", devices.describe(device), count)
    log.info("batch size %d per device x %d = %d global; lr %g (the %s recipe's unless set)", args.batch_size,
             count, args.batch_size * count, args.lr, "1-device" if count == 1 else f"{REFERENCE_WORLD_SIZE}-device")
    if count not in (1, REFERENCE_WORLD_SIZE):
        log.info("note: the linear scaling rule from the 1-device recipe suggests --lr %.4g for this global batch; "
                 "it is not applied automatically", linear_scaling_hint(args.arch, count, args.batch_size))
    log.info("precision: %s; seed %d", optimization.precision.description, args.seed)
    for note in notes:
        log.info("note: %s", note)
