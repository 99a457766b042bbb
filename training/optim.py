"""The optimizer: SGD with momentum, optionally without weight decay on BatchNorm and biases.

The kernel follows the device's capability row: torch's fused SGD where the device has
it, the multi-tensor (foreach) one elsewhere, or torch_npu's ``NpuFusedSGD`` on an NPU
when asked (``--npu-fused-sgd``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import UserError
from training import device as devices
from training.device import Capabilities


@dataclass(frozen=True)
class SgdSettings:
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool = False
    decay_norm_and_bias: bool = True

    @property
    def uses_nesterov(self) -> bool:
        return self.nesterov and self.momentum > 0


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group, or two when BatchNorm weights and biases (1-d tensors) get no decay."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, caps: Capabilities, settings: SgdSettings,
                    vendor_fused: bool = False) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings.weight_decay, settings.decay_norm_and_bias)
    common = dict(lr=settings.lr, momentum=settings.momentum, nesterov=settings.uses_nesterov)
    if vendor_fused:
        if not caps.vendor_fused_sgd:
            raise UserError(f"--npu-fused-sgd needs an NPU; this run is on {caps.device_type}")
        return devices.vendor_fused_sgd()(groups, **common)
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(caps.sgd_kernel, {})
    return torch.optim.SGD(groups, **common, **kernel)


def apply_settings(optimizer: torch.optim.Optimizer, settings: SgdSettings) -> None:
    """Put this run's momentum, Nesterov and weight decay into the parameter groups.

    ``load_state_dict`` restores the saved groups' values; a resumed run uses the options
    it was given (``training.config``), so they are written back afterwards.
    """
    for index, group in enumerate(optimizer.param_groups):
        group["momentum"] = settings.momentum
        group["nesterov"] = settings.uses_nesterov
        no_decay_group = not settings.decay_norm_and_bias and index == 1
        group["weight_decay"] = 0.0 if no_decay_group else settings.weight_decay
