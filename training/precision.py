"""Mixed precision, decided once: the autocast context and the gradient-scaling path.

The training loop calls ``precision.autocast()``, ``precision.backward(loss)``,
``precision.unscale(optimizer)`` and ``precision.step(optimizer)`` and never asks which
kind it has. Three kinds exist:

* full precision (no ``--amp``, or ``--opt-level O0``);
* native ``torch.amp``: fp16 with a GradScaler (static scale: fixed ``--loss-scale``;
  ``dynamic``: grows and backs off), or bf16 without scaling. Either scale skips a step
  whose gradients overflow; those steps are counted (``skipped_steps``);
* apex ``amp.initialize`` when ``--apex`` is given and apex is importable (otherwise a
  warning, and native torch.amp with the same settings).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch

from models.errors import UserError
from training import device as devices

log = logging.getLogger(__name__)

_STATIC_GROWTH_INTERVAL = 2**31 - 1  # a static scale never grows


@dataclass
class Precision:
    """What the loop needs to run one precision mode; built by :func:`build_precision`."""

    description: str
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    scaler: Any = None  # torch.amp.GradScaler when fp16 scaling is on
    dynamic_scale: bool = False
    static_scale: float | None = None  # the fixed fp16 loss scale, re-set after every step
    apex_amp: Any = None  # the apex.amp module when apex drives the precision
    _skipped: Any = None  # steps the scaler skipped, summed on the device

    @property
    def skips_nonfinite_steps(self) -> bool:
        """True when an overflowing step is skipped (and counted) rather than a reason to stop."""
        return self.scaler is not None or self.apex_amp is not None

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.apex_amp is not None:
            with self.apex_amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def clip_parameters(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if self.apex_amp is not None:
            return self.apex_amp.master_params(optimizer)
        return model.parameters()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self._count_skipped(optimizer)
            self.scaler.update(self.static_scale)
        else:
            optimizer.step()

    def _count_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        # GradScaler records, per device, whether this step's gradients overflowed (and so
        # whether it skipped optimizer.step); summed on the device, read once per epoch.
        found = sum(self.scaler._found_inf_per_device(optimizer).values())
        self._skipped = found if self._skipped is None else self._skipped + found

    def take_skipped_steps(self) -> int:
        """Steps skipped for overflowing gradients since the last call."""
        if self._skipped is None:
            return 0
        count, self._skipped = int(self._skipped.item()), None
        return count

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state, with ``dynamic`` (torch_npu's scaler needs it, torch's ignores it)."""
        if self.scaler is not None:
            return {**self.scaler.state_dict(), "dynamic": self.dynamic_scale}
        if self.apex_amp is not None:
            return self.apex_amp.state_dict()
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if self.scaler is not None:
            expected = self.scaler.state_dict().keys() or _SCALER_KEYS
            self.scaler.load_state_dict(adapt_scaler_state(state, expected, self.dynamic_scale, self.static_scale))
        elif self.apex_amp is not None:
            self.apex_amp.load_state_dict(state)


# torch.amp.GradScaler's state; torch_npu's scaler adds "dynamic".
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def adapt_scaler_state(saved: dict[str, Any], expected: Iterable[str], dynamic: bool,
                       static_scale: float | None) -> dict[str, Any]:
    """A GradScaler state saved by one scaler, in the format another expects.

    torch_npu's GradScaler saves and requires a ``dynamic`` key that torch's lacks, so a GPU
    or CPU checkpoint would not load on an NPU (KeyError) without this. A static loss scale
    keeps this run's value.
    """
    expected = set(expected)
    state = {key: value for key, value in saved.items() if key in expected}
    if "dynamic" in expected:
        state["dynamic"] = dynamic
    if static_scale is not None and "scale" in expected:
        state["scale"] = static_scale
    return state


class PrecisionError(UserError):
    """A precision mode the device cannot run."""


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
        return Precision(description="fp32")
    if use_apex:
        apex_amp = _import_apex_amp()
        if apex_amp is not None:
            return Precision(description=f"apex amp {opt_level}, loss scale {loss_scale}",
                             apex_amp=apex_amp, dynamic_scale=loss_scale == "dynamic")
        log.warning("--apex asked for, but apex is not installed: using torch.amp with the same "
                    "settings instead")
    dtype = resolve_dtype(device_type, amp_dtype)
    if dtype == torch.bfloat16 and not devices.has_fast_bf16(device_type):
        log.warning("this %s has no bf16 instructions: --amp (bf16) will be slower than fp32 here "
                    "(docs/PERFORMANCE.md); --opt-level O0 turns it off", device_type)
    autocast = _autocast_factory(device_type, dtype)
    if dtype != torch.float16:
        return Precision(description=f"autocast {_short(dtype)}", autocast=autocast)
    if loss_scale == "dynamic":
        return Precision(description="autocast fp16, dynamic loss scale", autocast=autocast,
                         scaler=devices.grad_scaler(device_type), dynamic_scale=True)
    # A static scale: overflowing steps are still skipped (as apex does), but the scale is
    # put back after each step instead of backing off.
    scale = float(loss_scale)
    scaler = devices.grad_scaler(device_type, init_scale=scale, growth_interval=_STATIC_GROWTH_INTERVAL)
    return Precision(description=f"autocast fp16, static loss scale {scale:g}", autocast=autocast,
                     scaler=scaler, static_scale=scale)


def _autocast_factory(device_type: str, dtype: torch.dtype) -> Callable[[], ContextManager[Any]]:
    def autocast() -> ContextManager[Any]:
        return torch.autocast(device_type=device_type, dtype=dtype)
    return autocast


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _import_apex_amp() -> Any | None:
    try:
        return importlib.import_module("apex.amp")
    except ImportError:
        return None


def initialize_apex(precision: Precision, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    opt_level: str, loss_scale: str):
    """apex wants to wrap the model and optimizer itself; a no-op for other modes."""
    if precision.apex_amp is None:
        return model, optimizer
    scale: Any = "dynamic" if loss_scale == "dynamic" else float(loss_scale)
    return precision.apex_amp.initialize(model, optimizer, opt_level=opt_level, loss_scale=scale)
