"""Mixed precision, decided once: one small interface, one class per kind.

The training loop calls ``autocast()``, ``backward(loss, optimizer)``, ``unscale(optimizer)``,
``clip_parameters(model, optimizer)`` and ``step(optimizer)`` and never asks which kind it
has; a checkpoint holds ``state_dict()``. The kinds:

* ``FullPrecision``: fp32 (no ``--amp``, or ``--opt-level O0``);
* ``Autocast``: torch autocast without loss scaling (bf16);
* ``ScaledFp16``: fp16 autocast with a GradScaler, whose scale is either static (a fixed
  ``--loss-scale``, put back after every step) or dynamic (grows and backs off). Either way
  a step whose gradients overflow is skipped and counted (``take_skipped_steps``);
* ``ApexAmp``: apex ``amp.initialize`` when ``--apex`` is given and apex is importable
  (otherwise a warning, and torch's AMP with the same settings). Deleting apex support is
  deleting this class and its branch in ``build_precision``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, ContextManager, Iterable

import torch
from torch import nn

from models.errors import UserError
from training import device as devices

log = logging.getLogger(__name__)

_STATIC_GROWTH_INTERVAL = 2**31 - 1  # a static scale never grows


class PrecisionError(UserError):
    """A precision mode the device cannot run."""


class Precision:
    """The interface, with the behaviour of a kind that neither casts nor scales.

    Attributes:
        description: what the run logs ("fp32", "autocast bf16"...).
        skips_nonfinite_steps: an overflowing step is skipped (and counted) rather than a
            reason to stop, so the loop's own finite-loss check is off.
    """

    description = "fp32"
    skips_nonfinite_steps = False

    def autocast(self) -> ContextManager[Any]:
        """The context of the forward pass and the loss."""
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """The model and optimizer the loop uses (apex wraps them; the others keep them)."""
        return model, optimizer

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale (before clipping)."""

    def clip_parameters(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
        """The parameters whose gradients clipping should see."""
        return model.parameters()

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Update the weights; returns None when the step always runs, else a 0-dim float tensor
        on the device: 1 if the step ran, 0 if it was skipped (never read it on the host: that
        is a device synchronisation; use it in device arithmetic)."""
        optimizer.step()
        return None

    def take_skipped_steps(self) -> int:
        """Steps skipped for overflowing gradients since the last call (one host read)."""
        return 0

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Nothing to restore."""


class FullPrecision(Precision):
    """fp32: no casts, no loss scaling."""


class Autocast(Precision):
    """torch autocast to ``dtype`` (bf16), without loss scaling: bf16 has fp32's range."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        self.device_type, self.dtype = device_type, dtype
        self.description = f"autocast {_short(dtype)}"

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


class ScaledFp16(Autocast):
    """fp16 autocast with a GradScaler: the loss is scaled up before backward, the gradients
    unscaled before the update, and a step whose gradients overflow is skipped.

    A static scale (``static_scale``) is a GradScaler whose scale is put back after every
    step instead of backing off, so overflowing steps are still skipped (as apex does with a
    fixed scale). Skipped steps are summed on the device and read once per epoch.
    """

    skips_nonfinite_steps = True

    def __init__(self, device_type: str, scaler: torch.amp.GradScaler, static_scale: float | None = None):
        super().__init__(device_type, torch.float16)
        self.scaler = scaler
        self.static_scale = static_scale
        self.description = ("autocast fp16, dynamic loss scale" if static_scale is None
                            else f"autocast fp16, static loss scale {static_scale:g}")
        self._skipped: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        self.scaler.step(optimizer)
        overflowed = self._overflowed(optimizer)
        self._skipped = overflowed.int() if self._skipped is None else self._skipped + overflowed
        self.scaler.update(self.static_scale)
        return (~overflowed).float()

    def _overflowed(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        # The scaler records, per device, whether this step's gradients held an inf or NaN (and
        # so whether it skipped optimizer.step); compared on the device, never read here.
        # Compared with 0, not summed as a count: torch_npu's scaler sets an overflowing step's
        # found_inf to 1 and then adds 1 (torch_npu/npu/amp/grad_scaler.py, _unscale_grads_:
        # `if self._has_overflow: per_device_found_inf.get(found_inf.device).add_(1)`,
        # v2.3.1 to master).
        found = sum(self.scaler._found_inf_per_device(optimizer).values())
        return found > 0

    def take_skipped_steps(self) -> int:
        if self._skipped is None:
            return 0
        count, self._skipped = int(self._skipped.item()), None
        return count

    def state_dict(self) -> dict[str, Any]:
        # torch_npu's GradScaler requires a "dynamic" key (torch's ignores it): always True,
        # since the inf/NaN check must stay on (see adapt_scaler_state).
        return {**self.scaler.state_dict(), "dynamic": True}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            expected = self.scaler.state_dict().keys() or _SCALER_KEYS
            self.scaler.load_state_dict(adapt_scaler_state(state, expected, self.static_scale))


class ApexAmp(Precision):
    """apex's AMP: ``amp.initialize`` patches the model and optimizer; apex scales the loss,
    skips overflowing steps itself and keeps fp32 master weights (which clipping must see)."""

    skips_nonfinite_steps = True

    def __init__(self, apex_amp: Any, opt_level: str, loss_scale: str):
        self.amp, self.opt_level = apex_amp, opt_level
        self.loss_scale: Any = "dynamic" if loss_scale == "dynamic" else float(loss_scale)
        self.description = f"apex amp {opt_level}, loss scale {loss_scale}"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return self.amp.initialize(model, optimizer, opt_level=self.opt_level, loss_scale=self.loss_scale)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        with self.amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()

    def clip_parameters(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
        return self.amp.master_params(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.amp.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.amp.load_state_dict(state)


# torch.amp.GradScaler's state; torch_npu's scaler adds "dynamic".
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def adapt_scaler_state(saved: dict[str, Any], expected: Iterable[str], static_scale: float | None) -> dict[str, Any]:
    """A GradScaler state saved by one scaler, in the format another expects.

    torch_npu's GradScaler saves and requires a ``dynamic`` key that torch's lacks, so a GPU
    or CPU checkpoint would not load on an NPU (KeyError) without this. That key is always
    True here: torch_npu's ``load_state_dict`` copies it into ``_dynamic``, and ``_dynamic``
    False turns its inf/NaN check off (torch_npu/npu/amp/grad_scaler.py, ``_unscale_grads_``:
    ``if self._dynamic:`` around ``_amp_foreach_non_finite_check_and_unscale_``, else a bare
    multiply; ``step``: ``optimizer.step()`` without the check), so overflowing steps would
    reach the weights. This project's static scale is a dynamic scaler whose scale is put
    back after every step; checkpoints written before said ``dynamic: False`` for it.
    A static loss scale keeps this run's value.
    """
    expected = set(expected)
    state = {key: value for key, value in saved.items() if key in expected}
    if "dynamic" in expected:
        state["dynamic"] = True
    if static_scale is not None and "scale" in expected:
        state["scale"] = static_scale
    return state


def resolve_dtype(device_type: str, requested: str) -> torch.dtype:
    """``auto``: the device's default (fp16 on NPU/CUDA, the ModelZoo recipes' numerics; bf16
    on CPU and MPS)."""
    if requested == "float16":
        return torch.float16
    if requested == "bfloat16":
        if not devices.supports_bf16(device_type):
            raise PrecisionError(f"--amp-dtype bfloat16 is not supported on {device_type}")
        return torch.bfloat16
    return devices.capabilities(device_type).default_amp_dtype


def build_precision(device_type: str, *, amp: bool, amp_dtype: str = "auto", opt_level: str = "O2",
                    loss_scale: str = "dynamic", use_apex: bool = False) -> Precision:
    """Decide the precision mode once, from the options."""
    if not amp or opt_level == "O0":
        return FullPrecision()
    if use_apex:
        apex_amp = _import_apex_amp()
        if apex_amp is not None:
            return ApexAmp(apex_amp, opt_level, loss_scale)
        log.warning("--apex asked for, but apex is not installed: using torch.amp with the same "
                    "settings instead")
    dtype = resolve_dtype(device_type, amp_dtype)
    if dtype == torch.bfloat16 and not devices.has_fast_bf16(device_type):
        log.warning("this %s has no bf16 instructions: --amp (bf16) will be slower than fp32 here "
                    "(docs/PERFORMANCE.md); --opt-level O0 turns it off", device_type)
    if dtype != torch.float16:
        return Autocast(device_type, dtype)
    if loss_scale == "dynamic":
        return ScaledFp16(device_type, devices.grad_scaler(device_type))
    scale = float(loss_scale)
    scaler = devices.grad_scaler(device_type, init_scale=scale, growth_interval=_STATIC_GROWTH_INTERVAL)
    return ScaledFp16(device_type, scaler, static_scale=scale)


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _import_apex_amp() -> Any | None:
    try:
        return importlib.import_module("apex.amp")
    except ImportError:
        return None
