"""Training recipes: the seeds' hyper-parameters per architecture, in one place.

main.py leaves every recipe option unset (``None``) on the command line and fills the gaps
from here (``training.config``), so the launch scripts under ``test/`` pass only what the
user chose. The values are those of the ModelZoo scripts and ``main.py`` defaults:

* Inception v3, 1 device (``train_full_1p.sh``): batch 256, lr 0.045, wd 2e-4, label
  smoothing 0.1, loss scale 1024 (main.py's default; the script passes none), no warm-up.
* Inception v3, 8 devices (``train_full_8p.sh``): global batch 2048 (256 per device),
  lr 1.2, wd 1e-4, label smoothing 0.1, loss scale 128, no warm-up.
* Xception, 1 device: batch 128, lr 0.1, wd 1e-4, no label smoothing, dynamic loss scale.
* Xception, 8 devices (``main-8p.py``): global batch 1024 (128 per device), lr 0.8, wd 1e-4,
  label smoothing 0.1, warm-up 5 epochs, loss scale 1024 (main-8p.py's default).
* Both: 240 / 150 epochs, cosine decay, SGD momentum 0.9, auxiliary loss weight 0.4.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

REFERENCE_WORLD_SIZE = 8  # the multi-device recipes were published for 8 devices


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
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    momentum: float = 0.9
    aux_loss_weight: float = 0.4
    image_size: int | None = None  # None: the model's input size
    print_freq: int = 10


_SINGLE = {
    "inception_v3": Recipe(epochs=240, batch_size=256, lr=0.045, weight_decay=2e-4, warm_up_epochs=0,
                           label_smoothing=0.1, loss_scale="1024"),
    "xception": Recipe(epochs=150, batch_size=128, lr=0.1, weight_decay=1e-4, warm_up_epochs=0,
                       label_smoothing=0.0, loss_scale="dynamic"),
}

# Any world size above one starts from the 8-device recipe (the learning rate is not
# rescaled behind the user's back; the start-up log prints the linear-scaling value).
_MULTI = {
    "inception_v3": replace(_SINGLE["inception_v3"], lr=1.2, weight_decay=1e-4, loss_scale="128"),
    "xception": replace(_SINGLE["xception"], lr=0.8, label_smoothing=0.1, warm_up_epochs=5, loss_scale="1024"),
}

# --dummy (ours): the embedded data set is small and low-resolution, so a CPU learns it in a
# couple of minutes. Inception v3's reference initialisation starts with large logits and
# needs a gentler learning rate at this small batch.
_DUMMY = dict(epochs=5, batch_size=16, warm_up_epochs=0, image_size=96, weight_decay=5e-5, print_freq=10)
_DUMMY_LR = {"inception_v3": 0.01, "xception": 0.05}


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
