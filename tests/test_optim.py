"""The optimizer kernel is this run's (its device's capability row), also when it resumes a
checkpoint written on a device that chose another; fp16 loss scaling agrees with it.

torch has the CPU kernels of every choice, so each device's run happens here
(``capability_rows``): the CPU's foreach SGD, CUDA's fused SGD, and the NPU's "torch
decides" (foreach here; never fused kernels torch_npu may lack).
"""
from __future__ import annotations

import torch
from torch import nn

from capability_rows import FUSED_CPU, TORCH_DECIDES_CPU, run_main_with_row
from conftest import quick_args, run_main
from training.checkpoint import load_checkpoint
from training.device import CAPABILITIES
from training.optim import OptimizerSettings, build_optimizer, load_optimizer_state
from training.precision import build_precision


def kernels(output) -> list[tuple]:
    """(fused, foreach) of each parameter group of the run's last checkpoint."""
    groups = load_checkpoint(output / "checkpoint.pth.tar")["optimizer"]["param_groups"]
    return [(group.get("fused"), group.get("foreach")) for group in groups]


def test_a_resumed_run_keeps_its_own_kernel(tiny_data, tmp_path):
    def run_args(epochs: int) -> list[str]:
        return quick_args(tiny_data, tmp_path, "xception", "--image-size", "32", "--max-steps", "1", "--epochs",
                          str(epochs), "--resume", "auto")

    assert run_main(*run_args(1)).code == 0
    assert kernels(tmp_path) == [(None, True)]
    on_gpu = run_main_with_row(FUSED_CPU, *run_args(2))  # a CPU, NPU or MPS checkpoint on a GPU
    assert on_gpu.code == 0, on_gpu.output
    assert kernels(tmp_path) == [(True, None)]
    on_npu = run_main_with_row(TORCH_DECIDES_CPU, *run_args(3))  # a GPU checkpoint on an NPU
    assert on_npu.code == 0, on_npu.output
    assert kernels(tmp_path) == [(None, None)]


def test_fused_sgd_takes_fp16_steps_after_loading_a_foreach_state():
    """GradScaler gives a fused optimizer its scale and found_inf; the foreach kernel would refuse
    them (``AssertionError: Expected grad_scale and found_inf to be None``)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    settings = OptimizerSettings("sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    saved = build_optimizer(model, CAPABILITIES["cpu"], settings).state_dict()
    optimizer = build_optimizer(model, FUSED_CPU, settings)
    load_optimizer_state(optimizer, saved)
    precision = build_precision("cpu", amp=True, amp_dtype="float16", loss_scale="128")
    before = model.weight.detach().clone()
    for _ in range(2):
        with precision.autocast():
            loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.arange(8) % 3)
        precision.backward(loss, optimizer)
        precision.step(optimizer)
        optimizer.zero_grad()
    assert precision.take_skipped_steps() == 0
    assert not torch.equal(model.weight, before)
