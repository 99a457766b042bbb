"""Devices, decided once: which device this process uses and what that device can do.

This is the only module that names ``torch.cuda``, ``torch.npu``, MPS or ``torch_npu``.
Everything that differs between device types is a row of the capability table
(``CAPABILITIES``): memory formats, the dtypes collectives accept, the optimizer kernel,
the ``torch.compile`` backend, pinned memory, stream overlap. Other modules ask the row
(``capabilities(device_type)``) and never test the device type themselves.

Ascend NPUs come through the ``torch_npu`` plug-in, imported here and only here. A missing
``torch_npu`` module means "no NPU"; any other import failure (a broken CANN install,
``libhccl.so`` not found...) is an error with its text, never a silent fall-back to the
CPU. Since torch_npu 2.5.1, ``import torch`` loads torch_npu itself (its ``torch.backends``
entry point) and raises if that fails, so by the time this module runs it is either loaded
or not autoloaded. torch_npu's ``transfer_to_npu`` helper, which remaps every ``cuda`` call
globally, is deliberately not used: it breaks an explicit device choice.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ContextManager

import torch

from models.errors import UserError

log = logging.getLogger(__name__)

AUTO_ORDER = ("npu", "cuda", "mps", "cpu")
DEVICE_CHOICES = ("auto", *AUTO_ORDER)
DEVICE_ALIASES = {"gpu": "cuda"}  # the ModelZoo scripts' spelling (`--device gpu`)

# HCCL's all_reduce accepts these dtypes only (checkSupportedDataType, ProcessGroupHCCL.cpp,
# torch_npu v2.1 to master): no float64, no bool, no uint8.
HCCL_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64,
                         torch.float16, torch.bfloat16, torch.float32})


class DeviceError(UserError):
    """A device that was asked for but cannot be used, or a device plug-in that is broken."""


@dataclass(frozen=True)
class Capabilities:
    """What one device type supports; one row of ``CAPABILITIES``.

    Attributes:
        device_type: npu, cuda, mps or cpu.
        dist_backend: the process-group backend for it.
        channels_last: models and batches may use channels-last memory.
        collective_dtypes: dtypes its collectives accept (None: any).
        optimizer_kernel: ``fused``, ``foreach``, or ``auto`` (torch decides).
        vendor_fused_sgd: the vendor's fused SGD (``torch_npu.optim.NpuFusedSGD``) exists.
        compile_backend: the ``torch.compile`` backend, or None when ``--compile`` is refused.
        compile_refusal: why ``--compile`` is refused, when it is.
        compile_backend_from_install: the backend depends on the installed plug-ins (the NPU's:
            torchair, Triton-Ascend): ``compile_backend()`` looks, for ``--compile`` only.
        pin_memory_device: the device string for pinned host memory, or None: no pinning.
        side_stream_prefetch: copy the next batch on a side stream while the current one runs.
        sync_batchnorm: torch's SyncBatchNorm runs on it.
        default_amp_dtype: what ``--amp`` means there (fp16 with loss scaling, or bf16).
    """

    device_type: str
    dist_backend: str
    channels_last: bool
    collective_dtypes: frozenset | None
    optimizer_kernel: str
    vendor_fused_sgd: bool
    compile_backend: str | None
    compile_refusal: str
    pin_memory_device: str | None
    side_stream_prefetch: bool
    sync_batchnorm: bool
    default_amp_dtype: torch.dtype
    compile_backend_from_install: bool = False


CAPABILITIES = {
    # torch_npu rejects channels-last tensors in `to`/`contiguous` ("Only contiguous_format or
    # preserve_format is supported"). Its compile backend depends on the install (compile_backend).
    "npu": Capabilities("npu", "hccl", channels_last=False, collective_dtypes=HCCL_DTYPES, optimizer_kernel="auto",
                        vendor_fused_sgd=True, compile_backend=None, compile_refusal="",
                        pin_memory_device="npu", side_stream_prefetch=False, sync_batchnorm=True,
                        default_amp_dtype=torch.float16, compile_backend_from_install=True),
    "cuda": Capabilities("cuda", "nccl", channels_last=True, collective_dtypes=None, optimizer_kernel="fused",
                         vendor_fused_sgd=False, compile_backend="inductor", compile_refusal="",
                         pin_memory_device="cuda", side_stream_prefetch=True, sync_batchnorm=True,
                         default_amp_dtype=torch.float16),
    "mps": Capabilities("mps", "gloo", channels_last=True, collective_dtypes=None, optimizer_kernel="auto",
                        vendor_fused_sgd=False, compile_backend="inductor", compile_refusal="",
                        pin_memory_device=None, side_stream_prefetch=False, sync_batchnorm=False,
                        default_amp_dtype=torch.bfloat16),
    "cpu": Capabilities("cpu", "gloo", channels_last=True, collective_dtypes=None, optimizer_kernel="foreach",
                        vendor_fused_sgd=False, compile_backend="inductor", compile_refusal="",
                        pin_memory_device=None, side_stream_prefetch=False, sync_batchnorm=False,
                        default_amp_dtype=torch.bfloat16),
}

# -- torch_npu ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def import_torch_npu() -> ModuleType | None:
    """torch_npu, None when it is not installed; DeviceError when it is installed but broken.

    Tried once per process (``import_torch_npu.cache_clear()`` forgets the answer).
    """
    return sys.modules.get("torch_npu") or _import_plugin("torch_npu")


def _import_plugin(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            return None  # not installed: no such device here
        raise DeviceError(f"{name} is installed but cannot be imported: {error}") from error
    except Exception as error:  # a broken CANN install raises ImportError/OSError/RuntimeError
        raise DeviceError(f"{name} is installed but cannot be imported: {type(error).__name__}: {error}") from error


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.5.1.post3+cpu"`` -> ``(2, 5, 1)``: compare versions as numbers, never as strings."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def npu_compile_backend(torch_npu_version: str, has_torchair: bool, has_triton: bool) -> tuple[str | None, str]:
    """The ``torch.compile`` backend on an NPU, or (None, why not).

    torch_npu registers the dynamo backend ``"npu"`` for its graph engine, torchair; without
    torchair that backend silently runs eagerly. Inductor generates NPU code only from torch_npu
    2.6 with Triton-Ascend; on older releases the default backend cannot compile for the NPU.
    """
    if has_torchair:
        return "npu", ""
    if version_tuple(torch_npu_version) >= (2, 6) and has_triton:
        return "inductor", ""
    return None, (f"torch_npu {torch_npu_version} has no torch.compile backend here: install torchair "
                  f"(torch_npu's graph mode), or Triton-Ascend with torch_npu >= 2.6 for inductor; "
                  f"or leave out --compile")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def capabilities(device_type: str) -> Capabilities:
    """The capability row of ``device_type``."""
    return CAPABILITIES[device_type]


def compile_backend(caps: Capabilities) -> tuple[str | None, str]:
    """``caps``'s ``torch.compile`` backend, or (None, why not); asked for ``--compile`` only.

    On an NPU the answer depends on the install, and torchair is imported to give it: only
    here, so a run without ``--compile`` never looks torchair up, and a broken torchair stops
    a ``--compile`` run with one error line (DeviceError) before training, not with a
    traceback from its first compiled step.
    """
    if not caps.compile_backend_from_install:
        return caps.compile_backend, caps.compile_refusal
    plugin = import_torch_npu()
    version = getattr(plugin, "__version__", "0") if plugin is not None else "0"
    return npu_compile_backend(version, _import_plugin("torchair") is not None, _installed("triton"))


# -- choosing and binding the device --------------------------------------------------------

@dataclass(frozen=True)
class DevicePlan:
    """Which device this process uses: ``type`` is npu/cuda/mps/cpu, ``index`` or None."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def torch_device(self) -> torch.device:
        return torch.device(str(self))


def device_api(device_type: str) -> Any | None:
    """The ``torch.<type>`` namespace (is_available, device_count, set_device...) or None."""
    if device_type == "npu":
        return getattr(torch, "npu", None) if import_torch_npu() is not None else None
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


def canonical_type(name: str) -> str:
    """``gpu`` -> ``cuda``; other names unchanged."""
    return DEVICE_ALIASES.get(name, name)


def select_device(name: str = "auto", index: int | None = None, local_rank: int = 0) -> DevicePlan:
    """Pick the device: ``name`` auto/npu/cuda/mps/cpu; ``index`` defaults to the local rank."""
    device_type = _pick_type(canonical_type(name))
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


def visible_device_ids(device_type: str) -> list[int]:
    """Indices of this node's devices of ``device_type`` ([0] for the CPU and MPS)."""
    return list(range(max(1, device_count(device_type))))


# -- device facts the rest of the code asks for ---------------------------------------------

def pin_memory_options(caps: Capabilities, torch_version: str = torch.__version__) -> dict[str, Any]:
    """DataLoader options that pin host memory for the device, where it has pinned memory.

    Before torch 2.6 the DataLoader pins for CUDA alone unless ``pin_memory_device`` names the
    device; later releases pin for the current accelerator and deprecate the option.
    """
    if caps.pin_memory_device is None:
        return {"pin_memory": False}
    if version_tuple(torch_version) < (2, 6):
        return {"pin_memory": True, "pin_memory_device": caps.pin_memory_device}
    return {"pin_memory": True}


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


def grad_scaler(device_type: str, **kwargs: Any) -> torch.amp.GradScaler:
    """A GradScaler for ``device_type``; on NPU the one torch_npu documents (torch.npu.amp)."""
    if device_type == "npu":
        return device_api("npu").amp.GradScaler(**kwargs)
    return torch.amp.GradScaler(device_type, **kwargs)


def vendor_fused_sgd() -> type[torch.optim.Optimizer]:
    """torch_npu's fused SGD (all parameters updated by one kernel, as ModelZoo's apex
    ``combine_grad``)."""
    plugin = import_torch_npu()
    if plugin is None:
        raise DeviceError("the fused NPU optimizer needs torch_npu")
    return importlib.import_module("torch_npu.optim").NpuFusedSGD


def current_stream(device: torch.device) -> Any:
    return device_api(device.type).current_stream(device)


def new_stream(device: torch.device) -> Any:
    return device_api(device.type).Stream(device=device)


def use_stream(stream: Any, device: torch.device) -> ContextManager[Any]:
    """Queue the work of the ``with`` block on ``stream``."""
    return device_api(device.type).stream(stream)


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes an accelerator can still allocate for this process (free device memory, plus what
    torch's caching allocator holds unused); None for the CPU, MPS, or where unknown: their
    memory is the host's."""
    api = device_api(device.type)
    reader = getattr(api, "mem_get_info", None)
    if not callable(reader):
        return None
    free, _total = reader(device)
    reserved, allocated = getattr(api, "memory_reserved", None), getattr(api, "memory_allocated", None)
    cached = int(reserved(device)) - int(allocated(device)) if callable(reserved) and callable(allocated) else 0
    return int(free) + max(cached, 0)


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
