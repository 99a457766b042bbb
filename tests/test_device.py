"""Device, backend and precision decisions, with an Ascend NPU simulated at the torch_npu
boundary (CI has none): a stand-in for the ``torch.npu`` namespace that torch_npu adds."""
from __future__ import annotations

import types

import pytest
import torch

from training import device as devices
from training.precision import build_precision


class FakeNpuApi:
    """The part of ``torch.npu`` that training.device uses, recording what it was asked."""

    def __init__(self, count: int):
        self.count = count
        self.current = None
        self.jit_compile = None
        self.amp = types.SimpleNamespace(GradScaler=self._grad_scaler)
        self.scalers = []

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.current = index

    def set_compile_mode(self, jit_compile: bool) -> None:
        self.jit_compile = jit_compile

    def _grad_scaler(self, **kwargs):
        self.scalers.append(kwargs)
        return torch.amp.GradScaler("cpu", **kwargs)  # a real scaler, for the type only


@pytest.fixture
def npu(monkeypatch):
    def install(count: int) -> FakeNpuApi:
        api = FakeNpuApi(count)
        monkeypatch.setattr(devices, "_torch_npu", types.ModuleType("torch_npu"))
        monkeypatch.setattr(torch, "npu", api, raising=False)
        return api
    return install


@pytest.fixture
def no_npu(monkeypatch):
    monkeypatch.setattr(devices, "_torch_npu", None)


def test_auto_prefers_npu_and_binds_local_rank(npu):
    api = npu(8)
    plan = devices.select_device("auto", local_rank=3)
    assert plan == devices.DevicePlan("npu", 3)
    assert str(plan) == "npu:3"
    assert devices.dist_backend(plan.type) == "hccl"


def test_explicit_index_beats_local_rank_and_is_checked(npu):
    npu(2)
    assert devices.select_device("npu", index=1, local_rank=0) == devices.DevicePlan("npu", 1)
    with pytest.raises(devices.DeviceError, match="npu device 2 asked for, but this machine has 2"):
        devices.select_device("npu", index=2)


def test_bind_sets_device_and_binary_kernel_mode(npu):
    api = npu(2)
    plan = devices.DevicePlan("npu", 1)
    # torch.device("npu:1") needs the real plug-in, so check what bind did before that.
    with pytest.raises(RuntimeError):
        devices.bind(plan, binary_kernels=True)
    assert api.current == 1 and api.jit_compile is False


def test_npu_unavailable_is_a_clear_error(no_npu):
    with pytest.raises(devices.DeviceError, match="torch_npu is not installed"):
        devices.select_device("npu")


def test_npu_installed_without_devices_falls_through(npu):
    npu(0)
    plan = devices.select_device("auto")
    assert plan.type != "npu"


def test_without_npu_auto_picks_cuda_or_cpu(no_npu):
    assert devices.dist_backend("cpu") == "gloo"
    if torch.cuda.is_available():
        assert devices.select_device("auto") == devices.DevicePlan("cuda", 0)
        return
    assert devices.select_device("auto") == devices.DevicePlan("cpu")
    with pytest.raises(devices.DeviceError, match="--device cuda asked for"):
        devices.select_device("cuda")


def test_npu_fp16_uses_torch_npu_grad_scaler_with_static_scale(npu):
    api = npu(1)
    precision = build_precision("npu", amp=True, loss_scale="128")
    assert precision.description == "autocast fp16, static loss scale 128"
    assert api.scalers == [{"init_scale": 128.0, "growth_interval": 2**31 - 1}]
    assert precision.static_scale == 128.0
    assert not precision.skips_nonfinite_steps
    dynamic = build_precision("npu", amp=True, loss_scale="dynamic")
    assert dynamic.skips_nonfinite_steps and api.scalers[-1] == {}


def test_precision_modes_on_cpu():
    assert build_precision("cpu", amp=False).description == "fp32"
    assert build_precision("cpu", amp=True, opt_level="O0").description == "fp32"
    bf16 = build_precision("cpu", amp=True)
    assert bf16.description == "autocast bf16" and bf16.scaler is None
    with bf16.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
