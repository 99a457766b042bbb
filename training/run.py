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

from models.errors import UserError
from models.loading import EMA_KEY
from models.weights import load_weights
from training import checkpoint as checkpoints
from training import device as devices
from training import distributed, progress
from training.config import divide_per_node
from training.distributed import DistributedError, NodeLayout, Topology
from training.engine import EpochPosition, TrainingLoss, check_weights_before_saving, evaluate, train_one_epoch
from training.curves import CurvesWriter
from training.metrics import MetricsWriter, RunningSums, explain_validation_loss, setup_logging
from training.options import CommandLine, parse_command_line, warn_ignored_options
from training.preemption import PREEMPTED_EXIT_CODE, Preempted, RunControl, StopSignals
from training.setup import Loaders, RunParts, build_run, log_start, wrap_for_training
from training.state import TrainingState

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
    progress.configure(command.args.progress, topology.is_main)
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
    """One process's run: build it, then evaluate, or train epoch by epoch."""

    def __init__(self, command: CommandLine, topology: Topology, device: torch.device,
                 caps: devices.Capabilities, signals: StopSignals | None = None):
        self.command, self.topology, self.device, self.caps = command, topology, device, caps
        self.signals = signals or StopSignals()
        self.output_dir = Path(command.args.output_dir)

    def execute(self) -> None:
        resumed, saved = checkpoint_to_resume(self.command.args.resume, self.output_dir, self.topology)
        parts = build_run(self.command, self.topology, self.device, self.caps, saved)
        self.args = parts.args
        log_start(parts, self.topology, self.device)
        if saved:
            explicit_start = parts.args.start_epoch if "start_epoch" in self.command.explicit else None
            parts.state.restore(saved, resumed, training=not parts.args.evaluate, start_epoch=explicit_start)
        writer = MetricsWriter(self.output_dir, enabled=self.topology.is_main)
        self.curves = CurvesWriter(self.output_dir, enabled=self.topology.is_main)
        try:
            if parts.args.evaluate:
                averaged = use_averaged_weights(parts.state.model, saved, parts.args.eval_ema)
                metrics = evaluate(parts.state.model, parts.loaders.val, nn.CrossEntropyLoss(),
                                   parts.state.precision, parts.settings, averaged=averaged)
                writer.write({"mode": "evaluate", "epoch": parts.state.epoch, "arch": parts.args.arch,
                              "weights": "ema" if averaged else "model", **metrics})
            else:
                write_args(parts.args, self.output_dir, self.topology)
                self._train(parts, writer)
        finally:
            writer.close()

    def _train(self, parts: RunParts, writer: MetricsWriter) -> None:
        args, state, loaders, optimization = parts.args, parts.state, parts.loaders, parts.optimization
        trained = wrap_for_training(optimization.model, self.topology, self.device, parts.decisions.compile_backend)
        step_parts = parts.step_parts(trained)
        loss_fn = TrainingLoss(args.label_smoothing, args.aux_loss_weight)
        control = RunControl(self.signals, lambda *at: self._save_mid_epoch(state, *at), args.save_every,
                             args.save_every_steps, self.topology.is_main)
        for epoch in range(state.epoch, args.epochs):
            position = EpochPosition(epoch, loaders.steps_per_epoch, state.step if epoch == state.epoch else 0)
            loaders.train.set_epoch(epoch)
            loaders.train.skip(position.start_step * loaders.samples_per_step)
            sums = RunningSums(self.device)
            if state.epoch_sums and self.topology.is_main:
                sums.load_state_dict(state.epoch_sums)  # the job's sums of the steps done before the resume
            record = train_one_epoch(trained.module, loaders.train, loss_fn, optimization.optimizer,
                                     optimization.schedule, state.precision, position, parts.settings, sums, control,
                                     writer.write, step_parts)
            if record.pop("interrupted"):
                raise Preempted()
            record.update(validate(state, loaders, parts.settings))
            explain_validation_loss(record["val_loss"], record["train_loss"], state.identity.num_classes)
            check_weights_before_saving(state.model, record["val_loss"], epoch)
            state.finish_epoch(epoch + 1, *best_of(record))
            self._save(state, best=state.is_best)
            if state.is_best:
                log.info("best Acc@1 %.3f so far, of the %s weights: %s", state.best_acc1,
                         "averaged (EMA)" if state.best_weights == "ema" else "raw", checkpoints.BEST_NAME)
            writer.write(epoch_record(args, self.topology, state, loaders, record))
            self.curves.update(writer.records())
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



def epoch_record(args: Any, topology: Topology, state: TrainingState, loaders: Loaders,
                 record: dict[str, Any]) -> dict[str, Any]:
    """The epoch's ``metrics.jsonl`` record."""
    return {"mode": "train", "epoch": state.epoch, "epochs": args.epochs, "arch": args.arch,
            "world_size": topology.process_count, "batch_size": loaders.batch_size,
            "global_batch_size": loaders.global_batch_size, "accum_steps": loaders.accum_steps, **record,
            "best_acc1": state.best_acc1, "best_weights": state.best_weights, "is_best": state.is_best}


def validate(state: TrainingState, loaders: Loaders, settings: Any) -> dict[str, Any]:
    """The job's validation metrics of the model, and of its average (``ema_`` keys) when kept.

    Every rank first takes rank 0's BatchNorm statistics (and rank 0's averaged ones), so the
    figures are those of the weights rank 0 saves.
    """
    criterion = nn.CrossEntropyLoss()
    distributed.broadcast_buffers(state.model)
    record = evaluate(state.model, loaders.val, criterion, state.precision, settings)
    if state.average.module is not None:
        distributed.broadcast_buffers(state.average.module)
        averaged = evaluate(state.average.module, loaders.val, criterion, state.precision, settings, averaged=True)
        record.update({f"ema_{key}": value for key, value in averaged.items()})
    return record


def best_of(record: dict[str, Any]) -> tuple[float, str]:
    """The better validation Acc@1 of the epoch, and whose it is ("model" or "ema")."""
    if "ema_val_acc1" in record and record["ema_val_acc1"] > record["val_acc1"]:
        return record["ema_val_acc1"], "ema"
    return record["val_acc1"], "model"


def use_averaged_weights(model: nn.Module, saved: dict[str, Any] | None, wanted: bool) -> bool:
    """``-e``: put the checkpoint's averaged (EMA) weights into ``model`` when it has them and they
    are wanted (not ``--no-ema``); whether it did."""
    if not (wanted and saved and saved.get(EMA_KEY) is not None):
        return False
    load_weights(model, saved[EMA_KEY], strict_head=True)
    log.info("evaluating the checkpoint's averaged (EMA) weights; --no-ema evaluates the raw ones")
    return True


def write_args(args: Any, output_dir: Path, topology: Topology) -> None:
    """``args.json``: the options the run really uses (after the checkpoint's and the recipe's)."""
    if topology.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(_plain(vars(args)), indent=2) + "\n")


def checkpoint_to_resume(resume: str | None, output_dir: Path,
                         topology: Topology) -> tuple[Path | None, dict[str, Any] | None]:
    """``--resume``'s checkpoint (rank 0 picks ``auto``'s for everyone) and its contents."""
    if not resume:
        return None, None
    if resume == "auto":
        found = checkpoints.find_resume_checkpoint(output_dir) if topology.is_main else None
        path = distributed.broadcast_object(found)
        log.info("--resume auto: %s", f"resuming from {path}" if path else "no checkpoint yet, starting fresh")
    else:
        path = Path(resume)
    return (path, checkpoints.load_checkpoint(path)) if path is not None else (None, None)


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values (paths and the like as strings)."""
    return json.loads(json.dumps(options, default=str))
