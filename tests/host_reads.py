"""Counting the host reads of tensor values that real training steps make, on the CPU.

A host read of a value that lives on a GPU or NPU (``.item()``, ``float(t)``, ``bool(t)``,
``if t:``, ``.tolist()``) waits for every kernel queued before it: a full device
synchronisation. On a CPU it costs nothing, so no benchmark here can see one; this recorder
does, from what the reads touch.

* Reads are caught where they go through torch: ``aten._local_scalar_dense`` (``item``,
  ``float``, ``int``, ``bool``, formatting), the ops whose output size depends on the values
  (``nonzero``...), and, since a CPU tensor's ``tolist``/``numpy`` never reach the
  dispatcher, those methods themselves. Checks torch makes on the CPU only (``CPU_ONLY_CHECKS``)
  are left out: a GPU or NPU run does not make them.
* Device values are the tensors marked as such (the model, its average, every batch the
  loader hands out), the tensors made by a call that names a device (``torch.zeros(...,
  device=...)``: the code's way of putting a value on the GPU), and everything computed from
  one: an op's outputs, and the arguments an op writes into. A read of anything else is a
  host read: MixUp's and CutMix's parameters, and the data pipeline's augmentation draws,
  come from torch's CPU generator without naming a device, as they would next to a GPU.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.equal.default, aten._unique2.default, aten.unique_consecutive.default}
READ_METHODS = {"tolist", "numpy", "__array__", "cpu"}  # whole-tensor copies to the host
# Functions whose reads are checks made on the CPU only: one_hot checks the class values with
# `.item()` except on CUDA, MPS, XLA and PrivateUse1 (the NPU), where scatter's device asserts
# do it (aten/src/ATen/native/Onehot.cpp). MixUp and CutMix one-hot the labels.
CPU_ONLY_CHECKS = {torch.nn.functional.one_hot}


@dataclass(frozen=True)
class Read:
    step: int  # the 0-based optimizer step during which it happened; the step count after the last
    what: str  # the op or method
    device_value: bool
    where: str  # the innermost calling line outside torch


class HostReads:
    """Records every host read made inside ``watching()``, tagged with the current ``step``."""

    def __init__(self) -> None:
        self._device_values = WeakTensorKeyDictionary()
        self.reads: list[Read] = []
        self.step = 0
        self.in_cpu_only_check = 0

    def mark(self, tensors: Iterable[Any]) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._device_values[tensor] = True

    def mark_module(self, module: nn.Module) -> None:
        self.mark(module.parameters())
        self.mark(module.buffers())

    def is_device_value(self, tensor: torch.Tensor) -> bool:
        return tensor in self._device_values

    def note(self, what: str, tensors: Iterable[Any]) -> None:
        if self.in_cpu_only_check:
            return
        touched = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.reads.append(Read(self.step, what, any(self.is_device_value(t) for t in touched), _caller()))

    def device_reads(self, step: int) -> Counter:
        """``{(what, where): count}`` of the device reads made during ``step``."""
        return Counter((read.what, read.where) for read in self.reads if read.step == step and read.device_value)

    def host_reads(self) -> Counter:
        return Counter(read.what for read in self.reads if not read.device_value)

    @contextlib.contextmanager
    def watching(self) -> Iterator["HostReads"]:
        with _Calls(self), _Ops(self):
            yield self


def _caller() -> str:
    torch_root = str(Path(torch.__file__).parent) + "/"
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(torch_root) and not frame.filename.endswith("host_reads.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


class _Ops(TorchDispatchMode):
    """Dispatched ops: value reads, and device values passed on to outputs and written arguments."""

    def __init__(self, recorder: HostReads) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if func in READ_OPS:
            self.recorder.note(func.overloadpacket.__name__, inputs)
        result = func(*args, **kwargs)
        if any(self.recorder.is_device_value(tensor) for tensor in inputs):
            self.recorder.mark(tree_leaves(result))
            self.recorder.mark(_written_arguments(func, args, kwargs))
        return result


def _written_arguments(func, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments ``func`` writes into (``self`` of an in-place op, ``out=``, foreach lists)."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            written.extend(tree_leaves(value))
    return written


class _Calls(TorchFunctionMode):
    """Python-level calls: whole-tensor reads, CPU-only checks, and values made on a named device."""

    def __init__(self, recorder: HostReads) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READ_METHODS:
            self.recorder.note(name, tree_leaves((args, kwargs)))
        check = func in CPU_ONLY_CHECKS
        self.recorder.in_cpu_only_check += check
        try:
            result = func(*args, **kwargs)
        finally:
            self.recorder.in_cpu_only_check -= check
        if kwargs.get("device") is not None and name != "to":  # (a CPU .to() returns its input)
            self.recorder.mark(tree_leaves(result))
        return result


class MarkedBatches:
    """``loader``'s batches, each marked as device values as it is handed out."""

    def __init__(self, loader: Any, recorder: HostReads) -> None:
        self.loader = loader
        self.recorder = recorder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for images, labels, replaced in self.loader:
            self.recorder.mark([images, labels])
            yield images, labels, replaced


class StepMarks:
    """The run's ``StepControl``, telling the recorder where each optimizer step ends."""

    def __init__(self, control: Any, recorder: HostReads) -> None:
        self.control = control
        self.recorder = recorder

    def after_step(self, position, steps_done: int, sums) -> bool:
        stop = self.control.after_step(position, steps_done, sums)
        self.recorder.step = steps_done
        return stop
