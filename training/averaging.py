"""Model EMA: an exponential moving average of the weights, BatchNorm buffers included.

Updated after every optimizer step, on the device and without reading anything back from
it; validated every epoch like the raw model; saved and resumed with the run. ``NoAverage``
stands in when averaging is off, so the loop has one path.

torch's ``AveragedModel`` is not used: it keeps its update count in a host tensor and tests
it twice per update (``bool(self.n_averaged == 0)``, ``if self.n_averaged > 0``) before
copying it to the device once per dtype group (``self.n_averaged.to(device)``, a
synchronising copy on CUDA), and it "averages" integer buffers (``num_batches_tracked``)
in float and truncates them (torch/optim/swa_utils.py, ``update_parameters`` and
``get_ema_multi_avg_fn``). Here the floating tensors are updated with one
``torch._foreach_lerp_``, as its EMA does, the integer buffers are copied, and the updates
are counted on the host.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

WARMUP_OFFSET = 10  # with warm-up, the decay after t updates is min(decay, (1 + t) / (10 + t))


class ModelEma:
    """The averaged copy of ``model`` (``.module``), updated with ``update(model)``.

    Args:
        decay: weight of the average at each update (0.9998: a horizon of about 5000 steps).
        warmup: ramp the decay up from 0.1, so early averages are not dominated by the
            random initialisation.

    The first update takes the model's weights as they are. ``updates`` counts the optimizer
    steps the average followed, skipped ones included: known on the host without asking the
    device.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.module = copy.deepcopy(model).requires_grad_(False)

    def current_decay(self) -> float:
        if self.updates == 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (WARMUP_OFFSET + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s weights.

        Args:
            applied: the precision's answer to whether the optimizer step ran (a 0-dim device
                tensor, 1 or 0; None: it always runs). A skipped step leaves the average as it
                is: its weight is multiplied by ``applied`` on the device, never read here
                (at the cost of a temporary the size of the weights: their difference).
        """
        averaged, averaged_integers = _split(self.module)
        current, current_integers = _split(model)
        weight = 1.0 - self.current_decay()
        if applied is None:
            torch._foreach_lerp_(averaged, current, weight)
        else:
            steps = torch._foreach_sub(current, averaged)
            torch._foreach_mul_(steps, applied * weight)
            torch._foreach_add_(averaged, steps)
        if averaged_integers:
            torch._foreach_copy_(averaged_integers, current_integers)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights under the model's own names (what inference loads) and the count."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def _split(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The module's parameters and buffers: (floating, integer), in a fixed order."""
    floating, integer = [], []
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        (floating if tensor.is_floating_point() else integer).append(tensor)
    return floating, integer


class NoAverage:
    """Averaging off: updating does nothing and there is nothing to validate or save."""

    module = None

    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Nothing to average."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""
