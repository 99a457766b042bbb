"""Model EMA: an exponential moving average of the weights, BatchNorm buffers included.

Built on torch's own ``torch.optim.swa_utils.AveragedModel`` with EMA averaging. Updated
after every optimizer step; validated every epoch like the raw model; saved and resumed
with the run. ``NoAverage`` stands in when averaging is off, so the loop has one path.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

WARMUP_OFFSET = 10  # with warm-up, the decay after t updates is min(decay, (1 + t) / (10 + t))


class ModelEma:
    """The averaged copy of ``model`` (``.module``), updated with ``update(model)``.

    Args:
        decay: weight of the average at each update (0.9998: a horizon of about 5000 steps).
        warmup: ramp the decay up from 0.1, so early averages are not dominated by the
            random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # counted on the host: no device read per step
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (WARMUP_OFFSET + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.warmup:
            self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.current_decay())
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights under the model's own names (what inference loads) and the count."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)


class NoAverage:
    """Averaging off: updating does nothing and there is nothing to validate or save."""

    module = None

    def update(self, model: nn.Module) -> None:
        """Nothing to average."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""
