"""The optimizer: SGD with momentum, optionally without weight decay on BatchNorm and biases."""
from __future__ import annotations

import torch
from torch import nn

from training import device as devices


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group, or two when BatchNorm weights and biases (1-d tensors) get no decay."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, device_type: str, *, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, decay_norm_and_bias: bool = True) -> torch.optim.SGD:
    """SGD; the fused kernel where the device has one (no per-step sync under a GradScaler),
    the multi-tensor (foreach) one elsewhere."""
    implementation = {"fused": True} if devices.supports_fused_sgd(device_type) else {"foreach": True}
    return torch.optim.SGD(parameter_groups(model, weight_decay, decay_norm_and_bias), lr=lr,
                           momentum=momentum, nesterov=nesterov and momentum > 0, **implementation)
