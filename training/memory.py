"""Will a training step fit? An estimate before the first step, and one line when it cannot.

Beyond what the run already holds when it is built (weights, the EMA copy, a resumed
optimizer state), the first step allocates the activations autograd saves for the
backward pass, the gradients, the optimizer's state and the batches in flight. The saved
activations are counted for the run's real batch and image size: the model's forward
runs on the ``meta`` device (shapes only: no memory, no arithmetic) under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps.

Calibration (AMD EPYC, 2 CPU cores, torch 2.14.1; ``main.py`` with SGD and momentum,
channels-last, one process, two steps; what the run added = the peak resident memory the OS
reports for the process minus what it held at the estimate): the estimate was 63-87 % of
what the steps really added (Xception 299 px batch 8: 2.00 of 2.29 GiB; 160 px batch 16;
128 px batch 32 and 4; Inception v3 299 px batch 8, fp32 and bf16, batch 2; 160 px batch 16).
So a run is refused only when even this lower figure exceeds what is available, and warned
about from 80 % on. The available memory is the host's (``MemAvailable``, within the
cgroup's limit, shared by this node's processes) unless the device reports its own
(``training.device.free_memory_bytes``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call

from models.errors import UserError
from training import device as devices

log = logging.getLogger(__name__)

GiB = 2**30
WARN_FRACTION = 0.8  # the estimate is a lower figure: warn when it comes this close to the limit
_C10_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")
_OUT_OF_MEMORY = re.compile(r"out of memory|not enough memory|can't allocate memory|cannot allocate memory",
                            re.IGNORECASE)


class NotEnoughMemory(UserError):
    """A training step that cannot fit in the memory available."""


class OutOfMemory(UserError):
    """The device or the host ran out of memory during the run."""


@dataclass(frozen=True)
class StepShape:
    """What one training step of a process processes: its batch, on what model and device."""

    batch_size: int
    image_size: int
    low_precision: bool  # --amp: activations in 16 bits
    channels_last: bool
    min_image_size: int


@dataclass(frozen=True)
class StepMemory:
    """Bytes the first training step adds to what the process already holds."""

    activations: int
    gradients: int
    optimizer_state: int
    batches: int

    @property
    def total(self) -> int:
        return self.activations + self.gradients + self.optimizer_state + self.batches

    @property
    def fixed(self) -> int:
        """The part that does not grow with the batch or the image size."""
        return self.gradients + self.optimizer_state


# -- the estimate ---------------------------------------------------------------------------------

def _meta_like(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return meta.requires_grad_(tensor.requires_grad)


def saved_activation_bytes(model: nn.Module, shape: StepShape, batch_size: int | None = None,
                           image_size: int | None = None, low_precision: bool | None = None) -> int:
    """Bytes of the tensors autograd saves in one training forward of ``model`` (the weights
    themselves left out), measured on the ``meta`` device."""
    batch = batch_size or shape.batch_size
    size = image_size or shape.image_size
    dtype = torch.bfloat16 if (shape.low_precision if low_precision is None else low_precision) else torch.float32
    state = {name: _meta_like(tensor, dtype) for name, tensor in
             [*model.named_parameters(), *model.named_buffers()]}
    weights = {tensor.untyped_storage()._cdata for tensor in state.values()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:  # one storage saved by several operations counts once
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return tensor

    images = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)
    if shape.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    training = model.training
    model.train()
    try:
        with saved_tensors_hooks(pack, lambda tensor: tensor):
            functional_call(model, state, (images,))
    finally:
        model.train(training)
    return sum(saved.values())


def _optimizer_state_slots(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of the parameters' size the optimizer keeps per parameter."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 2
    if isinstance(optimizer, torch.optim.RMSprop):
        return 1 + int(group.get("momentum", 0) > 0) + int(bool(group.get("centered")))
    return int(group.get("momentum", 0) > 0)  # SGD and the fused SGD kernels


def _parameter_bytes(model: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()
               if parameter.requires_grad)


def checkpoint_bytes(model_state: Any, optimizer: torch.optim.Optimizer) -> int:
    """About the size of a checkpoint of ``model_state`` (a ``TrainingState``): the weights, the
    optimizer's state once it exists, and the averaged copy when one is kept."""
    model = model_state.model
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    averaged = weights if model_state.average.module is not None else 0
    return weights + averaged + _parameter_bytes(model) * _optimizer_state_slots(optimizer)


def estimate_step(model: nn.Module, optimizer: torch.optim.Optimizer, shape: StepShape) -> StepMemory:
    """What the first training step of ``model`` adds (see the module docstring)."""
    parameters = _parameter_bytes(model)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None)
    state = 0 if optimizer.state else parameters * _optimizer_state_slots(optimizer)
    pixels = shape.batch_size * 3 * shape.image_size ** 2
    batches = 2 * pixels * 4  # the batch in use and the next one, normalised on the device (float32)
    return StepMemory(saved_activation_bytes(model, shape), gradients, state, batches)


# -- what is available -------------------------------------------------------------------------

def _read_numbers(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    numbers = {}
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            numbers[parts[0]] = int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return numbers


def _read_value(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """What the memory cgroup still allows, page cache counted as free (the kernel reclaims it)."""
    for limit, usage, stat, cache in ((Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
                                       Path("/sys/fs/cgroup/memory.stat"), "file"),
                                      (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                                       Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
                                       Path("/sys/fs/cgroup/memory/memory.stat"), "total_cache")):
        cap, used = _read_value(limit), _read_value(usage)
        if cap is not None and used is not None and cap < 2**60:
            return max(0, cap - used + _read_numbers(stat).get(cache, 0))
    return None


def host_memory_available() -> int | None:
    """Bytes of host memory a new allocation can use now: ``MemAvailable``, within the cgroup's limit."""
    found = [value for value in (_read_numbers(Path("/proc/meminfo")).get("MemAvailable"), _cgroup_available())
             if value is not None]
    if not found:
        try:
            found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


@dataclass(frozen=True)
class Available:
    bytes: int
    where: str  # follows the amount: "available (host memory)", "free on cuda:0"
    held: int | None = None  # host memory this process holds already (its resident set)


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_memory(device: torch.device, local_processes: int) -> Available | None:
    """This process's share of the memory its training step will use, or None when unknown."""
    own = devices.free_memory_bytes(device)
    if own is not None:
        return Available(own, f"free on {device}")
    host = host_memory_available()
    if host is None:
        return None
    if local_processes > 1:
        return Available(host // local_processes, f"available to each of this node's {local_processes} "
                                                 f"processes (host memory: {_gib(host)})", _resident_bytes())
    return Available(host, "available (host memory)", _resident_bytes())


# -- the verdict -------------------------------------------------------------------------------

def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _largest_batch(memory: StepMemory, shape: StepShape, limit: int) -> int:
    per_sample = (memory.activations + memory.batches) / shape.batch_size
    return int((limit - memory.fixed) // per_sample) if per_sample else 0


def _largest_image_size(model: nn.Module, memory: StepMemory, shape: StepShape, limit: int) -> int | None:
    # Activations grow with the pixels; the guess is checked with the real count, stepping down.
    ratio = (limit - memory.fixed) / max(memory.activations + memory.batches, 1)
    size = min(int(shape.image_size * math.sqrt(max(ratio, 0.0))) // 8 * 8, shape.image_size - 8)
    for _ in range(12):
        if size < max(shape.min_image_size, 8):
            break
        pixels = shape.batch_size * 3 * size ** 2 * 8
        if memory.fixed + saved_activation_bytes(model, shape, image_size=size) + pixels <= limit:
            return size
        size = min(size - 8, int(size * 0.95) // 8 * 8)
    return None


def _what_fits(model: nn.Module, memory: StepMemory, shape: StepShape, limit: int) -> list[str]:
    fits = []
    batch = _largest_batch(memory, shape, limit)
    if 1 <= batch < shape.batch_size:
        fits.append(f"-b {batch}")
    size = _largest_image_size(model, memory, shape, limit)
    if size is not None and size < shape.image_size:
        fits.append(f"--image-size {size}")
    if not shape.low_precision:
        halved = replace(memory, activations=saved_activation_bytes(model, shape, low_precision=True))
        if halved.total <= limit:
            fits.append(f"--amp (about {_gib(halved.total)})")
    return fits


def check_step_fits(model: nn.Module, optimizer: torch.optim.Optimizer, shape: StepShape, device: torch.device,
                    local_processes: int = 1) -> str | None:
    """Log the estimate; return the one-line refusal when the step cannot fit, else None."""
    if any(isinstance(module, nn.SyncBatchNorm) for module in model.modules()):
        return None  # its forward talks to the other ranks: it cannot run on the meta device
    available = available_memory(device, local_processes)
    memory = estimate_step(model, optimizer, shape)
    if available is None:
        log.info("memory: a training step adds about %s (not compared: the free memory is unknown)",
                 _gib(memory.total))
        return None
    held = f" to the {_gib(available.held)} this process holds" if available.held else ""
    log.info("memory: a training step adds about %s%s; %s %s", _gib(memory.total), held, _gib(available.bytes),
             available.where)
    if memory.total <= WARN_FRACTION * available.bytes:
        return None
    parts = (f"about {_gib(memory.total)} (activations {_gib(memory.activations)} for a batch of {shape.batch_size} "
             f"at {shape.image_size} px, gradients and optimizer state {_gib(memory.fixed)})")
    if memory.total <= available.bytes:
        log.warning("warning: a training step needs %s, close to the %s %s: the run may run out of memory",
                    parts, _gib(available.bytes), available.where)
        return None
    fits = _what_fits(model, memory, shape, available.bytes)
    ways = f"what fits: {', or '.join(fits)}" if fits else "even -b 1 does not fit this image size"
    return f"a training step needs {parts}, but {_gib(available.bytes)} is {available.where}; {ways}"


# -- at run time -------------------------------------------------------------------------------

def is_out_of_memory(error: BaseException) -> bool:
    # torch's OutOfMemoryError is a RuntimeError whose text says so on every device.
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError)
                                              and bool(_OUT_OF_MEMORY.search(str(error))))


@contextlib.contextmanager
def out_of_memory_as_error(batch: Callable[[], tuple[int | None, int | None]], device: torch.device) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one line naming the batch size.

    Args:
        batch: returns (batch size per device, image size) as known at the time of the error.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        first = _C10_PREFIX.sub("", first)  # "[enforce fail at alloc_cpu.cpp:N] err == 0. " says nothing to the user
        batch_size, image_size = batch()
        shape = (f"a batch of {batch_size} per device" if batch_size else "the recipe's batch size") + (
            f" at {image_size} px" if image_size else "")
        smaller = f"-b {max(1, batch_size // 2)}" if batch_size else "-b N"
        raise OutOfMemory(f"out of memory on {device} with {shape} ({first}): use a smaller batch ({smaller}), a "
                          f"smaller --image-size, or --amp") from None
