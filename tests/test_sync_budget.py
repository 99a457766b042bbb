"""The sync budget: a training step that does not print reads no device value on the host.

On a GPU or NPU each such read is a full device synchronisation, which a CPU benchmark never
shows; ``host_reads`` finds them on the CPU. The steps are main.py's, built by the public
building steps (``training.setup.build_run``) and run by ``train_one_epoch`` as ``Run`` does.
The printed step's reads are what docs/PERFORMANCE.md lists.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from capability_rows import FUSED_CPU
from host_reads import HostReads, MarkedBatches, StepMarks
from training.device import CAPABILITIES
from training.distributed import Topology
from training.engine import EpochPosition, LoopSettings, TrainingLoss, train_one_epoch
from training.options import parse_command_line
from training.precision import build_precision
from training.preemption import RunControl, StopSignals
from training.schedule import LrSchedule
from training.setup import build_run, wrap_for_training

STEPS = 3  # the last one prints (it ends the epoch)
CPU = CAPABILITIES["cpu"]

BUDGETED = {
    "sgd, mixup and cutmix": (CPU, ["--mixup", "0.2", "--cutmix", "1.0"]),
    "model-ema": (CPU, ["--model-ema", "--model-ema-warmup"]),
    "accum-steps": (CPU, ["--accum-steps", "2"]),
    "bf16": (CPU, ["--amp", "--amp-dtype", "bfloat16"]),
    # fused SGD: CUDA's choice (torch's CPU kernel here); a static scale, so steps run
    "fp16, fused sgd, clip, ema": (FUSED_CPU, ["--amp", "--amp-dtype", "float16", "--loss-scale", "128",
                                               "--clip-grad", "5", "--model-ema"]),
    # the dynamic scale's first steps overflow and are skipped
    "fp16 dynamic, fused sgd": (FUSED_CPU, ["--amp", "--amp-dtype", "float16"]),
}


def idle_control() -> RunControl:
    """The run's step control, with no signal and no periodic checkpoint."""
    return RunControl(StopSignals(), lambda *at: None, 0, 0, is_main=True)


def watch_one_epoch(row, data, output, *extra: str) -> HostReads:
    """Build main.py's run for these options and train one epoch of ``STEPS`` steps, watched."""
    command = parse_command_line(["-a", "xception", "--data", str(data), "--output_dir", str(output), "--image-size",
                                  "48", "-b", "2", "-j", "0", "--epochs", "1", "--max-steps", str(STEPS), "--seed",
                                  "0", "--print-freq", "1000", "--progress", "lines", *extra])
    topology, device = Topology(), torch.device("cpu")
    parts = build_run(command, topology, device, row, saved=None)
    assert parts.loaders.steps_per_epoch == STEPS
    trained = wrap_for_training(parts.optimization.model, topology, device, parts.decisions.compile_backend)
    reads = HostReads()
    reads.mark_module(parts.state.model)
    if parts.state.average.module is not None:
        reads.mark_module(parts.state.average.module)
    with reads.watching():
        train_one_epoch(trained.module, MarkedBatches(parts.loaders.train, reads),
                        TrainingLoss(parts.args.label_smoothing, parts.args.aux_loss_weight),
                        parts.optimization.optimizer, parts.optimization.schedule, parts.state.precision,
                        EpochPosition(0, STEPS), parts.settings, control=StepMarks(idle_control(), reads),
                        parts=parts.step_parts(trained))
    return reads


@pytest.mark.parametrize("name", list(BUDGETED))
def test_a_step_that_does_not_print_reads_nothing_from_the_device(name, tiny_data, tmp_path):
    row, extra = BUDGETED[name]
    reads = watch_one_epoch(row, tiny_data, tmp_path, *extra)
    for step in range(STEPS - 1):
        assert reads.device_reads(step) == Counter(), f"step {step}"
    assert reads.device_reads(STEPS - 1), "the printed step reads its metrics"
    if "mixup" in name:
        assert sum(reads.host_reads().values()) >= STEPS, "the mixing parameters are drawn on the host"


def test_the_recorder_sees_a_step_that_reads():
    """torch's GradScaler with a non-fused optimizer reads found_inf before every step
    (``GradScaler._maybe_opt_step``): why fp16 wants the fused kernel where the device has one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), []) for _ in range(STEPS)]
    settings = LoopSettings(device=torch.device("cpu"), print_freq=1000, fps_warmup_steps=0, show_progress=False,
                            progress="lines")
    reads = HostReads()
    reads.mark_module(model)
    with reads.watching():
        train_one_epoch(model, MarkedBatches(batches, reads), TrainingLoss(), optimizer, LrSchedule(0.1, epochs=1),
                        build_precision("cpu", amp=True, amp_dtype="float16", loss_scale="128"),
                        EpochPosition(0, STEPS), settings, control=StepMarks(idle_control(), reads))
    for step in range(STEPS - 1):
        [((what, where), count)] = reads.device_reads(step).items()
        assert (what, count) == ("_local_scalar_dense", 1) and where.startswith("precision.py"), (step, where)
