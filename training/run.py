"""What ``python main.py`` runs: the launcher, one worker process, and the epoch loop.

``main()`` runs one worker in this process (plain or under torchrun), or, for ModelZoo's
``--multiprocessing-distributed``, one per device of the node. ``worker()`` binds the
device and joins the process group; ``Run`` holds the output folder (``training.rundir``),
builds the run (``training.setup``) and loops over epochs.

Exit status (docs/RESUME.md): 0 done, also for ``--resume`` of a finished run; 1 a user
error (one line, no traceback) or a bug (with its traceback); 2 bad options; 75
(``PREEMPTED_EXIT_CODE``) stopped by SIGTERM or SIGUSR1 after writing a checkpoint; 130
(``INTERRUPTED_EXIT_CODE``) stopped by Ctrl-C: after writing a checkpoint at the first, at
once at the second. Every rank of a job exits with the same status.
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
from models.weights import load_weights
from training import checkpoint as checkpoints
from training import device as devices
from training import distributed, progress
from training.atomic import WriteError, replace_file
from training.checkpoint import Checkpoint, first_nonfinite
from training.config import RESUMED_OPTIONS, divide_per_node, resolve_options
from training.curves import CurvesWriter
from training.distributed import DistributedError, NodeLayout, Topology
from training.engine import (EpochPosition, NonFiniteLossError, TrainingLoss, check_weights_before_saving, evaluate,
                             train_one_epoch)
from training.memory import NotEnoughMemory, StepShape, check_step_fits, checkpoint_bytes, out_of_memory_as_error
from training.metrics import MetricsWriter, RunningSums, explain_validation_loss, setup_logging
from training.options import CommandLine, build_parser, parse_command_line, warn_ignored_options
from training.preemption import RunControl, StopNow, Stopped, StopSignals, forwarded_stop_signals
from training.rundir import RunFolder, admit
from training.setup import Loaders, RunParts, build_run, log_start, wrap_for_training
from training.state import TrainingState

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 1


class ReportedElsewhere(Exception):
    """A failure another rank of the job reports; this rank exits with status 1 quietly."""


def fail_together(error: UserError | None, topology: Topology) -> None:
    """Raise on every rank when any rank has an ``error`` (a collective: all ranks call it).

    The failing ranks say why (rank 0 alone when it is among them); the others exit quietly.
    """
    failed, main_failed = distributed.agree([int(error is not None), int(topology.is_main and error is not None)])
    if not failed:
        return
    if error is not None and (topology.is_main or not main_failed):
        raise error
    raise ReportedElsewhere()


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
    """Run the node's processes; stop signals sent to this one reach them (docs/RESUME.md)."""
    processes = distributed.spawn(worker, layout, command)
    with forwarded_stop_signals([process.pid for process in processes.processes]):
        try:
            while not processes.join():
                pass
        except torch.multiprocessing.ProcessExitedException as error:
            return error.exit_code if error.exit_code and error.exit_code > 0 else EXIT_USER_ERROR
        except torch.multiprocessing.ProcessRaisedException as error:
            log.error("error: a training process failed: %s", str(error).strip().splitlines()[-1])
            return EXIT_USER_ERROR
    return 0


def worker(command: CommandLine, device_index: int | None = None) -> int:
    """One process of the job: bind the device, join the process group, run; the exit status."""
    try:
        topology = distributed.from_environment()
    except DistributedError as error:
        setup_logging(0, 1)
        log.error("error: %s", error)
        return EXIT_USER_ERROR
    setup_logging(topology.process_rank, topology.process_count)
    progress.configure(command.args.progress, topology.is_main)
    if topology.is_main:
        warn_ignored_options(command.args)
    signals = StopSignals()
    with signals.installed():
        try:
            _run_on_device(command, topology, signals, device_index)
        except (Stopped, StopNow) as stop:
            return stop.exit_code
        except ReportedElsewhere:
            return EXIT_USER_ERROR
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
        with signals.ended():
            distributed.destroy_process_group()


class Run:
    """One process's run: hold the output folder, build the run, then evaluate or train epoch by epoch."""

    def __init__(self, command: CommandLine, topology: Topology, device: torch.device,
                 caps: devices.Capabilities, signals: StopSignals | None = None):
        self.command, self.topology, self.device, self.caps = command, topology, device, caps
        self.signals = signals or StopSignals()
        self.output_dir = Path(command.args.output_dir)

    def execute(self) -> None:
        folder = self._hold_output_folder()
        try:
            self._execute(folder)
        finally:
            if folder is not None:
                with self.signals.ended():
                    folder.release()

    def _hold_output_folder(self) -> RunFolder | None:
        """Rank 0 holds the folder (lock, writability, stale temporary files); every rank learns
        whether it could."""
        folder, failure = None, None
        if self.topology.is_main:
            try:
                folder = RunFolder.claim(self.output_dir)
            except UserError as error:
                failure = error
        fail_together(failure, self.topology)
        return folder

    def _execute(self, folder: RunFolder | None) -> None:
        args = self.command.args
        resumed, saved = self._checkpoint_to_resume(folder)
        if saved is not None and not args.evaluate and self._finished(saved, resumed):
            return
        self.batch: tuple[int | None, int | None] = (args.batch_size, args.image_size)
        with out_of_memory_as_error(lambda: self.batch, self.device):
            parts = build_run(self.command, self.topology, self.device, self.caps, saved)
            self.args = parts.args
            self.batch = (parts.loaders.batch_size, parts.state.identity.image_size)
            log_start(parts, self.topology, self.device)
            if saved is not None:
                explicit_start = parts.args.start_epoch if "start_epoch" in self.command.explicit else None
                parts.state.restore(saved, resumed, training=not parts.args.evaluate, start_epoch=explicit_start)
            if not parts.args.evaluate:
                self._check_memory(parts)  # before any file is written: a refused run leaves none
                if folder is not None:
                    folder.warn_if_short_of_space(checkpoint_bytes(parts.state, parts.optimization.optimizer))
            writer = MetricsWriter(self.output_dir, enabled=self.topology.is_main)
            self.curves = CurvesWriter(self.output_dir, enabled=self.topology.is_main)
            try:
                if parts.args.evaluate:
                    self._evaluate(parts, saved, writer)
                else:
                    write_args(parts.args, self.output_dir, self.topology)
                    self._train(parts, writer)
            finally:
                with self.signals.ended():
                    writer.close()
                    parts.loaders.close()

    # -- before training ---------------------------------------------------------------------

    def _checkpoint_to_resume(self, folder: RunFolder | None) -> tuple[Path | None, Checkpoint | None]:
        """``--resume``'s checkpoint and its checked contents; rank 0 finds and checks it (``auto``)
        and applies the folder policy, then every other rank reads the file it named."""
        args = self.command.args
        path, saved, failure = None, None, None
        if self.topology.is_main:
            try:
                path, saved = checkpoint_to_resume(args.resume, self.output_dir)
                if saved is not None:
                    saved.check_fits(path, args.arch, args.num_classes)
                    saved.check_options(option_kinds(), RESUMED_OPTIONS)
                admit(folder, resume=path, auto=args.resume == "auto", evaluate=args.evaluate,
                      overwrite=args.overwrite)
            except UserError as error:
                failure = error
        fail_together(failure, self.topology)
        path = distributed.broadcast_object(path)
        if path is not None and saved is None:
            saved = checkpoints.read_checkpoint(path)
        return path, saved

    def _finished(self, saved: Checkpoint, source: Path) -> bool:
        """A resumed run with nothing left to train says so (and the process exits with 0)."""
        explicit = self.command.explicit
        epochs = resolve_options(self.command.args, explicit, self.topology.process_count, saved.options).args.epochs
        start = self.command.args.start_epoch if "start_epoch" in explicit else saved.epoch
        if start < epochs:
            return False
        best = f"{saved.best_acc1:.3f}" if saved.best_acc1 is not None else "none"
        log.info("%s: the run is finished (epoch %d of %d, best Acc@1 %s): nothing to train; give --epochs N "
                 "to train it longer", source, start, epochs, best)
        return True

    def _check_memory(self, parts: RunParts) -> None:
        """Refuse, on every rank, a first step that cannot fit in memory (training.memory)."""
        spec = models.model_spec(parts.args.arch)
        shape = StepShape(parts.loaders.batch_size, parts.state.identity.image_size,
                          low_precision=parts.args.amp and parts.args.opt_level != "O0",
                          channels_last=parts.decisions.channels_last, min_image_size=spec.min_input_size)
        message = check_step_fits(parts.state.model, parts.optimization.optimizer, shape, self.device,
                                  self.topology.local_process_count)
        fail_together(NotEnoughMemory(message) if message else None, self.topology)

    def _evaluate(self, parts: RunParts, saved: Checkpoint | None, writer: MetricsWriter) -> None:
        which = "model"
        if saved is not None:
            weights, which = saved.inference_weights(parts.args.eval_ema)
            if which == "ema":
                load_weights(parts.state.model, weights, strict_head=True)
            log.info("evaluating the checkpoint's %s", _weights_note(saved, which))
        metrics = evaluate(parts.state.model, parts.loaders.val, nn.CrossEntropyLoss(), parts.state.precision,
                           parts.settings, averaged=which == "ema")
        writer.write({"mode": "evaluate", "epoch": parts.state.epoch, "arch": parts.args.arch, "weights": which,
                      **metrics})

    # -- training ----------------------------------------------------------------------------

    def _train(self, parts: RunParts, writer: MetricsWriter) -> None:
        args, state, loaders, optimization = parts.args, parts.state, parts.loaders, parts.optimization
        trained = wrap_for_training(optimization.model, self.topology, self.device, parts.decisions.compile_backend)
        step_parts = parts.step_parts(trained)
        loss_fn = TrainingLoss(args.label_smoothing, args.aux_loss_weight)
        control = RunControl(self.signals, lambda *at: self._save_mid_epoch(state, *at), args.save_every,
                             args.save_every_steps, self.topology.is_main)
        with self.signals.saving_stop():
            for epoch in range(state.epoch, args.epochs):
                position = EpochPosition(epoch, loaders.steps_per_epoch, state.step if epoch == state.epoch else 0)
                loaders.train.set_epoch(epoch)
                loaders.train.skip(position.start_step * loaders.samples_per_step)
                sums = RunningSums(self.device)
                if state.epoch_sums and self.topology.is_main:
                    sums.load_state_dict(state.epoch_sums)  # the job's sums of the steps done before the resume
                record = train_one_epoch(trained.module, loaders.train, loss_fn, optimization.optimizer,
                                         optimization.schedule, state.precision, position, parts.settings, sums,
                                         control, writer.write, step_parts)
                if record.pop("interrupted"):
                    raise Stopped(control.exit_code)
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
                if epoch + 1 < args.epochs and control.stop_requested():  # after the last epoch: done
                    raise Stopped(control.exit_code)

    def _save_mid_epoch(self, state: TrainingState, position: EpochPosition, steps_done: int,
                        sums: RunningSums) -> None:
        state.epoch, state.step, state.epoch_sums = position.epoch, steps_done, sums.job_state_dict()
        self._save(state, best=False)
        log.info("saved %s at epoch %d step %d of %d", self.output_dir / checkpoints.LAST_NAME, position.epoch,
                 steps_done, position.steps)

    def _save(self, state: TrainingState, best: bool) -> None:
        """Rank 0 writes the checkpoint(s); every rank waits for the result, so a failed write
        stops the whole job with one line (the previous checkpoint stays intact)."""
        failure = None
        if self.topology.is_main:
            try:
                self._write(state.checkpoint(_plain(vars(self.args))), state, best)
            except UserError as error:
                failure = error
        fail_together(failure, self.topology)

    def _write(self, payload: Checkpoint, state: TrainingState, best: bool) -> None:
        last = self.output_dir / checkpoints.LAST_NAME
        kept = f"{last} still holds the previous checkpoint" if last.is_file() else "no checkpoint was written"
        bad = first_nonfinite(payload.weights)
        if bad is not None:
            raise NonFiniteLossError(f"the weights became non-finite ({bad}) at epoch {state.epoch} step "
                                     f"{state.step}: this checkpoint is not written, {kept}. Lower --lr or add "
                                     f"--clip-grad")
        try:
            checkpoints.save_checkpoint(payload, last)
        except WriteError as error:
            raise WriteError(f"{error}; {kept}") from None
        if best:
            checkpoints.save_checkpoint(payload, self.output_dir / checkpoints.BEST_NAME)


def _weights_note(saved: Checkpoint, which: str) -> str:
    if which == "ema":
        return "averaged (EMA) weights; --no-ema evaluates the raw ones"
    if saved.ema_weights is None:
        return "weights"
    return "raw weights" + (" (--no-ema)" if saved.best_weights != "model" or saved.best_acc1 is None
                            else ": they scored better than its averaged (EMA) ones")


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


def write_args(args: Any, output_dir: Path, topology: Topology) -> None:
    """``args.json``: the options the run really uses (after the checkpoint's and the recipe's)."""
    if topology.is_main:
        text = json.dumps(_plain(vars(args)), indent=2) + "\n"
        replace_file(output_dir / "args.json", lambda stream: stream.write(text.encode()))


def option_kinds() -> dict[str, Any]:
    """For each option, a value of the kind the parser gives it (a checkpoint's options are checked
    against these before a resumed run takes them)."""
    kinds: dict[str, Any] = {}
    for action in build_parser()._actions:
        if isinstance(action.const, bool) and action.nargs == 0:
            example: Any = False  # store_true / store_false
        else:
            example = {"int": 0, "float": 0.0}.get(getattr(action.type, "__name__", ""), "")
            if action.choices is not None:
                example = frozenset(action.choices)
        kinds[action.dest] = [example] * action.nargs if isinstance(action.nargs, int) and action.nargs > 1 else example
    return kinds


def checkpoint_to_resume(resume: str | None, output_dir: Path) -> tuple[Path | None, Checkpoint | None]:
    """``--resume``'s checkpoint file and its checked contents: FILE, or for ``auto`` the folder's
    own (``find_resume_checkpoint``), or none (a fresh start: only when the folder holds no
    checkpoint file)."""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), checkpoints.read_checkpoint(resume)
    found = checkpoints.find_resume_checkpoint(output_dir)
    if found is None:
        log.info("--resume auto: no checkpoint yet, starting fresh (%s holds no checkpoint file)", output_dir)
        return None, None
    log.info("--resume auto: resuming from %s", found[0])
    return found


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values (paths and the like as strings)."""
    return json.loads(json.dumps(options, default=str))
