"""Mixed precision: fp16 steps skipped for overflowing gradients are counted, reported and warned about,
with torch's loss scaler and with torch_npu's, also after a resume."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import metrics_of, quick_args, run_main
from torch_npu_scaler import TorchNpuStyleScaler
from training.precision import ScaledFp16, adapt_scaler_state

FP16 = ("--amp", "--amp-dtype", "float16", "--image-size", "48", "--max-steps", "3", "--print-freq", "1")


def test_overflowing_static_scale_steps_are_counted_and_warned(tiny_data, tmp_path):
    # A scale this large overflows every fp16 gradient: GradScaler skips every step.
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", *FP16, "--loss-scale", "1e30"))
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path)
    assert record["skipped_steps"] == 3
    assert "skipped_steps 3" in next(line for line in result.output.splitlines() if "summary" in line)
    assert ("3 of 3 steps (100.0%) of epoch 0 were skipped because the fp16 gradients overflowed "
            "(autocast fp16, static loss scale 1e+30): use --loss-scale dynamic, or a lower --loss-scale"
            in result.output)
    board = _scalars(tmp_path)
    assert board["train/skipped_steps"] == [3.0]


def test_a_sane_scale_skips_nothing(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", *FP16, "--loss-scale", "128"))
    assert result.code == 0, result.output
    assert metrics_of(tmp_path)[0]["skipped_steps"] == 0
    assert "were skipped" not in result.output


def _scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing import event_accumulator as accumulator
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# -- torch_npu's loss scaler, reproduced on the CPU (tests/torch_npu_scaler.py) ------------------------

STATIC = 2**31 - 1  # the growth interval of a static scale: it never grows
# A static-scale NPU checkpoint's scaler state, as this project wrote it until the inf/NaN check
# was kept on: torch_npu's load_state_dict copies "dynamic" into _dynamic.
NPU_STATIC_STATE = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": STATIC,
                    "_growth_tracker": 0, "dynamic": False}


def overflowing_step(precision) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """One step of a tiny model whose gradients are infinite; (the weights before it, the model)."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    precision.backward(model(torch.full((1, 4), math.inf)).sum(), optimizer)
    precision.step(optimizer)
    return before, model


@pytest.mark.parametrize("scaler", [lambda: torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=STATIC),
                                    lambda: TorchNpuStyleScaler(init_scale=1024.0, growth_interval=STATIC)],
                         ids=["torch", "torch_npu"])
def test_a_static_scale_skips_overflowing_steps_after_a_resume(scaler):
    precision = ScaledFp16("cpu", scaler(), static_scale=1024.0)
    precision.load_state_dict(NPU_STATIC_STATE)
    before, model = overflowing_step(precision)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert precision.take_skipped_steps() == 1
    assert precision.state_dict()["dynamic"] is True and precision.scaler.get_scale() == 1024.0


def test_the_scaler_state_keeps_torch_npus_overflow_check_on():
    expected = TorchNpuStyleScaler().state_dict().keys()
    assert adapt_scaler_state(NPU_STATIC_STATE, expected, static_scale=1024.0) == {**NPU_STATIC_STATE,
                                                                                   "dynamic": True}


def test_an_overflowing_npu_step_counts_once():
    """torch_npu leaves found_inf at 2 for an overflowing step."""
    precision = ScaledFp16("cpu", TorchNpuStyleScaler())
    overflowing_step(precision)
    overflowing_step(precision)
    assert precision.take_skipped_steps() == 2
