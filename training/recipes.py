"""Training recipes: the seeds' hyper-parameters per architecture, in one place.

main.py leaves every recipe option unset (``None``) on the command line and fills the
gaps from here, so the launch scripts under ``test/`` pass only what the user chose.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

# Values are those of the Ascend ModelZoo scripts for each model; the "8p" column is
# the 8-device recipe (per-device batch unchanged, larger learning rate).


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int  # per device
    lr: float
    weight_decay: float
    warm_up_epochs: float
    label_smoothing: float
    loss_scale: str  # a number, or "dynamic"
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    aux_loss_weight: float = 0.4
    image_size: int | None = None  # None: the model's input size
    print_freq: int = 10


_SINGLE = {
    "inception_v3": Recipe(epochs=240, batch_size=256, lr=0.045, weight_decay=2e-4,
                           warm_up_epochs=0, label_smoothing=0.1, loss_scale="128"),
    "xception": Recipe(epochs=150, batch_size=128, lr=0.1, weight_decay=1e-4,
                       warm_up_epochs=5, label_smoothing=0.1, loss_scale="1024"),
}

# The multi-device recipes were published for 8 devices; any world size above one
# starts from them (the learning rate is not rescaled behind the user's back).
_MULTI = {
    "inception_v3": replace(_SINGLE["inception_v3"], lr=1.2, weight_decay=1e-4,
                            warm_up_epochs=5),
    "xception": replace(_SINGLE["xception"], lr=0.8),
}

# --dummy: the embedded default data set is small and low-resolution, so a CPU learns
# it in a couple of minutes. Inception v3's reference initialisation starts with large
# logits and needs a gentler learning rate at this small batch.
_DUMMY = dict(epochs=5, batch_size=16, warm_up_epochs=0, image_size=96, weight_decay=5e-5, print_freq=10)
_DUMMY_LR = {"inception_v3": 0.01, "xception": 0.05}

REFERENCE_WORLD_SIZE = 8


def recipe_for(arch: str, world_size: int = 1, dummy: bool = False) -> Recipe:
    """The recipe for ``arch`` at ``world_size`` processes (dummy data: a quick one)."""
    recipe = (_SINGLE if world_size <= 1 else _MULTI)[arch]
    if dummy:
        recipe = replace(recipe, lr=_DUMMY_LR[arch], **_DUMMY)
    return recipe


def linear_scaling_hint(arch: str, world_size: int, batch_size: int) -> float:
    """The lr the linear scaling rule suggests, from the 1-device recipe."""
    base = _SINGLE[arch]
    return base.lr * (world_size * batch_size) / base.batch_size
