"""The optimizer: SGD (the recipes'), RMSProp or AdamW, torch's own, optionally without weight
decay on BatchNorm and biases.

The kernel follows the device's capability row: torch's fused kernel where the device has
one (SGD and AdamW on CUDA), the multi-tensor (foreach) one elsewhere, or torch_npu's
``NpuFusedSGD`` on an NPU when asked (``--npu-fused-sgd``). A resumed optimizer keeps this
run's kernel, whatever the checkpoint's device chose (``load_optimizer_state``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import UserError
from training import device as devices
from training.device import Capabilities

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
RMSPROP_DECAY = 0.9  # the Inception v3 paper's "RMSProp with decay 0.9" (torch's alpha)
_FUSED = ("sgd", "adamw")  # optimizers torch has a fused kernel for


@dataclass(frozen=True)
class OptimizerSettings:
    kind: str  # sgd, rmsprop or adamw
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool = False
    decay_norm_and_bias: bool = True
    eps: float | None = None  # None: torch's default for the optimizer

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


def _kernel(kind: str, caps: Capabilities) -> dict[str, bool]:
    if caps.optimizer_kernel == "fused" and kind in _FUSED:
        return {"fused": True}
    if caps.optimizer_kernel in ("fused", "foreach"):
        return {"foreach": True}
    return {}


def _eps(settings: OptimizerSettings) -> dict[str, float]:
    return {"eps": settings.eps} if settings.eps is not None else {}


def build_optimizer(model: nn.Module, caps: Capabilities, settings: OptimizerSettings,
                    vendor_fused: bool = False) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings.weight_decay, settings.decay_norm_and_bias)
    if vendor_fused:
        if not (caps.vendor_fused_sgd and settings.kind == "sgd"):
            raise UserError(f"--npu-fused-sgd needs SGD on an NPU; this run is {settings.kind} on {caps.device_type}")
        return devices.vendor_fused_sgd()(groups, lr=settings.lr, momentum=settings.momentum,
                                          nesterov=settings.uses_nesterov)
    kernel = _kernel(settings.kind, caps)
    if settings.kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=settings.lr, alpha=RMSPROP_DECAY, momentum=settings.momentum,
                                   **_eps(settings), **kernel)
    if settings.kind == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, **_eps(settings), **kernel)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.uses_nesterov,
                           **kernel)


# Parameter-group flags that choose the kernel, not the maths.
_KERNEL_FLAGS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, keeping this run's kernel choice.

    A state dict carries its groups' ``fused``/``foreach`` flags, and ``load_state_dict``
    would put them back: a checkpoint written on a CPU, NPU or MPS (foreach) would turn a
    CUDA run's fused SGD into foreach, while GradScaler, which looks at the optimizer as it
    was built (``_step_supports_amp_scaling``, set in ``SGD.__init__``), still hands it
    ``grad_scale``/``found_inf``: ``AssertionError: Expected grad_scale and found_inf to be
    None`` (torch/optim/sgd.py, ``_multi_tensor_sgd``) at the first fp16 step. The other way,
    a CUDA checkpoint's ``fused=True`` would make an NPU run call ``torch._fused_sgd_``,
    which torch_npu implements from 2.7 only (op-plugin's op_plugin_functions.yaml:
    ``_fused_sgd_``, ``op_api: [v2.7, newest]``). The flags are replaced in the saved groups
    before loading, since ``load_state_dict`` also reads them to place each parameter's
    ``step`` (torch/optim/optimizer.py, ``_process_value_according_to_param_policy``).
    """
    saved_groups = saved["param_groups"]
    if len(saved_groups) == len(optimizer.param_groups):  # else load_state_dict says what does not match
        saved = {**saved, "param_groups": [_with_kernel_of(group, saved_group) for group, saved_group in
                                           zip(optimizer.param_groups, saved_groups)]}
    optimizer.load_state_dict(saved)


def _with_kernel_of(group: dict, saved_group: dict) -> dict:
    loaded = {key: value for key, value in saved_group.items() if key not in _KERNEL_FLAGS}
    loaded.update({key: group[key] for key in _KERNEL_FLAGS if key in group})
    return loaded


def apply_settings(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> None:
    """Put this run's weight decay (and momentum, Nesterov, epsilon where the optimizer has them)
    into the parameter groups.

    ``load_state_dict`` restores the saved groups' values; a resumed run uses the options
    it was given (``training.config``), so they are written back afterwards.
    """
    for index, group in enumerate(optimizer.param_groups):
        no_decay_group = not settings.decay_norm_and_bias and index == 1
        group["weight_decay"] = 0.0 if no_decay_group else settings.weight_decay
        if "momentum" in group:
            group["momentum"] = settings.momentum
        if "nesterov" in group:
            group["nesterov"] = settings.uses_nesterov
        if "eps" in group and settings.eps is not None:
            group["eps"] = settings.eps
