"""Device choice and per-device facts: the only module that names torch.cuda, torch.npu or MPS.

Ascend NPUs come through the ``torch_npu`` plug-in, imported here and only here, guarded
(torch_npu's contrib helper that remaps every ``cuda`` call to the NPU is deliberately
not used: it acts globally and breaks an explicit device choice). Everything else asks this module.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO_ORDER = ("npu", "cuda", "mps", "cpu")
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl"}  # anything else: gloo


class DeviceError(RuntimeError):
    """A device that was asked for but cannot be used."""


@dataclass(frozen=True)
class DevicePlan:
    """Which device this process uses: ``type`` is npu/cuda/mps/cpu, ``index`` or None."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def torch_device(self) -> torch.device:
        return torch.device(str(self))


_torch_npu: ModuleType | None | bool = False  # False: not tried yet


def _import_torch_npu() -> ModuleType | None:
    global _torch_npu
    if _torch_npu is False:
        try:
            _torch_npu = importlib.import_module("torch_npu")
        except ImportError:
            _torch_npu = None
        except Exception as error:  # a broken CANN install raises at import time
            log.warning("torch_npu is installed but failed to import (%s); NPUs are not used", error)
            _torch_npu = None
    return _torch_npu


def device_api(device_type: str) -> Any | None:
    """The ``torch.<type>`` namespace (is_available, device_count, set_device...) or None."""
    if device_type == "npu":
        return getattr(torch, "npu", None) if _import_torch_npu() is not None else None
    if device_type == "cuda":
        return torch.cuda
    if device_type == "mps":
        return getattr(torch, "mps", None)
    return None


def is_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend and backend.is_available())
    api = device_api(device_type)
    return bool(api is not None and api.is_available())


def device_count(device_type: str) -> int:
    if device_type in ("cpu", "mps"):
        return 1 if is_available(device_type) else 0
    api = device_api(device_type)
    return int(api.device_count()) if api is not None and api.is_available() else 0


def select_device(name: str = "auto", index: int | None = None, local_rank: int = 0) -> DevicePlan:
    """Pick the device: ``name`` auto/npu/cuda/mps/cpu; ``index`` defaults to the local rank."""
    device_type = _pick_type(name)
    if device_type in ("cpu", "mps"):
        return DevicePlan(device_type)
    count = device_count(device_type)
    chosen = local_rank if index is None else index
    if not 0 <= chosen < count:
        raise DeviceError(f"{device_type} device {chosen} asked for, but this machine has {count}")
    return DevicePlan(device_type, chosen)


def _pick_type(name: str) -> str:
    if name == "auto":
        return next(kind for kind in AUTO_ORDER if is_available(kind))
    if not is_available(name):
        hint = {"npu": "torch_npu is not installed or sees no NPU",
                "cuda": "this torch build sees no CUDA GPU",
                "mps": "this machine has no Apple MPS device"}.get(name, "")
        raise DeviceError(f"--device {name} asked for, but {hint}")
    return name


def bind(plan: DevicePlan, binary_kernels: bool = False) -> torch.device:
    """Make ``plan`` this process's current device (before any process group exists)."""
    api = device_api(plan.type)
    if plan.index is not None and api is not None:
        api.set_device(plan.index)
    if plan.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if plan.type == "npu" and binary_kernels:
        api.set_compile_mode(jit_compile=False)
    elif binary_kernels:
        log.warning("--npu-binary-kernels has no effect on %s", plan.type)
    return plan.torch_device()


def dist_backend(device_type: str) -> str:
    return DIST_BACKENDS.get(device_type, "gloo")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that host timers measure it."""
    api = device_api(device.type)
    if api is not None and hasattr(api, "synchronize"):
        api.synchronize()


def supports_bf16(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    api = device_api(device_type)
    check = getattr(api, "is_bf16_supported", None)
    return bool(check()) if callable(check) else device_type == "npu"


def has_fast_bf16(device_type: str) -> bool:
    """False on CPUs without bf16 instructions, where bf16 autocast is many times slower."""
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return supports_bf16(device_type)


def supports_pinned_memory(device_type: str) -> bool:
    return device_type in ("cuda", "npu")


def supports_fused_sgd(device_type: str) -> bool:
    """torch's fused SGD kernel: CUDA (and CPU in recent releases) only."""
    return device_type == "cuda"


def grad_scaler(device_type: str, **kwargs: Any) -> torch.amp.GradScaler:
    """A GradScaler for ``device_type``; on NPU the one torch_npu documents (torch.npu.amp)."""
    if device_type == "npu":
        return device_api("npu").amp.GradScaler(**kwargs)
    return torch.amp.GradScaler(device_type, **kwargs)


def peak_memory_bytes(device: torch.device) -> int | None:
    api = device_api(device.type)
    reader = getattr(api, "max_memory_allocated", None)
    return int(reader(device)) if callable(reader) else None


def describe(device: torch.device) -> str:
    api = device_api(device.type)
    namer = getattr(api, "get_device_name", None)
    if callable(namer) and device.type in ("cuda", "npu"):
        return f"{device} ({namer(device)})"
    return str(device)
