"""torch_npu's GradScaler, as far as its state and its overflow check differ from torch's, on
a real CPU ``torch.amp.GradScaler``: what an NPU run's loss scaling does, without an NPU.

torch_npu/npu/amp/grad_scaler.py (identical in this respect from v2.3.1 to master):

* ``state_dict`` adds ``dynamic``; ``load_state_dict`` requires it and sets ``_dynamic`` from it
  (a GPU or CPU checkpoint, which lacks the key, raises KeyError there).
* ``_dynamic=False`` turns the inf/NaN check off: ``_unscale_grads_`` only multiplies the
  gradients by 1/scale (its ``if self._dynamic: ... else: grad.mul_(...)``), so ``found_inf``
  stays 0 and ``step`` always runs ``optimizer.step()``.
* an overflow leaves ``found_inf`` at 2, not 1: ``torch._amp_foreach_non_finite_check_and_unscale_``
  sets it to 1, then ``_unscale_grads_`` reads it (``if ....item() > 0: self._has_overflow =
  True``) and adds 1 (``if self._has_overflow: per_device_found_inf.get(...).add_(1)``).
"""
from __future__ import annotations

import torch


class TorchNpuStyleScaler(torch.amp.GradScaler):
    """A CPU GradScaler with torch_npu's state format and overflow check (module docstring)."""

    def __init__(self, dynamic: bool = True, **kwargs):
        super().__init__("cpu", **kwargs)
        self._dynamic = dynamic

    def state_dict(self):
        return {**super().state_dict(), "dynamic": self._dynamic}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._dynamic = state["dynamic"]  # KeyError on a torch-format state, as torch_npu's

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        grads = [parameter.grad for group in optimizer.param_groups for parameter in group["params"]
                 if parameter.grad is not None]
        if self._dynamic:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            if found_inf.item() > 0:
                found_inf.add_(1)
        else:
            torch._foreach_mul_(grads, inv_scale)
        return {found_inf.device: found_inf}
