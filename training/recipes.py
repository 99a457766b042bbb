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

``--recipe paper`` (ours) replaces what the papers state, on top of the ModelZoo recipe:

* Inception v3 (Szegedy et al. 2015, section 8): RMSProp with decay 0.9 and epsilon 1.0,
  learning rate 0.045 decayed by 0.94 every 2 epochs, gradient clipping at 2.0, label
  smoothing 0.1, evaluation with averaged weights.
* Xception (Chollet 2017, section 4.3): SGD with momentum 0.9, learning rate 0.045 decayed
  by 0.94 every 2 epochs, weight decay 1e-5, dropout 0.5 before the classifier, Polyak
  averaging.

torch's RMSprop adds epsilon outside the square root (sqrt(v) + eps) where TensorFlow adds it
inside (sqrt(v + eps)); we keep torch's own optimizer, whose multi-tensor kernel runs on
every device, with the paper's epsilon: both damp the steps of parameters whose squared
gradients are far below 1. The averaging is an exponential moving average (decay 0.9998,
ours: the papers give none), and RMSProp keeps the recipe's momentum 0.9 (ours: the paper
names none).
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
    opt: str = "sgd"
    opt_eps: float | None = None  # None: the optimizer's own default
    clip_grad: float | None = None
    drop_rate: float | None = None  # None: the model's own (0.5 inception_v3, 0 xception)
    model_ema: bool = False
    model_ema_decay: float = 0.9998


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
# few minutes. The shape of the run (epochs, batch, crop) is the same for every recipe.
_DUMMY_SHAPE = dict(epochs=5, batch_size=16, image_size=96, print_freq=10)
# Under the ModelZoo recipe, --dummy also picks values that learn in those few minutes.
# Inception v3 keeps its reference initialisation (truncated normal, std 0.1, before every
# BatchNorm, and on the classifier): the large conv weights make SGD's effective step on them
# tiny while the classifier's logits start large, so at this batch SGD barely leaves chance
# (16-29 % val Acc@1 after 3 epochs at lr 0.002-0.01); AdamW's per-parameter steps do not
# depend on the weights' scale and learn it (`main.py -a inception_v3 --dummy`: 78.75 % after
# 3 epochs, 83.75 % best of 5, on a 2-core CPU).
_DUMMY_OPTIMISATION = {
    "inception_v3": dict(opt="adamw", lr=1e-3, weight_decay=0.05, warm_up_epochs=0),
    "xception": dict(lr=0.05, weight_decay=5e-5, warm_up_epochs=0),
}


def _dummy_values(arch: str, name: str) -> dict:
    if name != "modelzoo":  # the named recipe's own optimisation, on the quick run's shape
        return dict(_DUMMY_SHAPE)
    return dict(_DUMMY_SHAPE, **_DUMMY_OPTIMISATION[arch])


_PAPER_DECAY = dict(lr=0.045, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.94, warm_up_epochs=0,
                    model_ema=True)
_PAPER = {
    "inception_v3": dict(_PAPER_DECAY, opt="rmsprop", opt_eps=1.0, clip_grad=2.0, label_smoothing=0.1),
    "xception": dict(_PAPER_DECAY, opt="sgd", momentum=0.9, weight_decay=1e-5, drop_rate=0.5, label_smoothing=0.0),
}
RECIPES = ("modelzoo", "paper")


def recipe_for(arch: str, world_size: int = 1, dummy: bool = False, name: str = "modelzoo") -> Recipe:
    """The recipe ``name`` for ``arch`` at ``world_size`` processes (dummy data: a quick one)."""
    recipe = (_SINGLE if world_size <= 1 else _MULTI)[arch]
    if name == "paper":
        recipe = replace(recipe, **_PAPER[arch])
    if dummy:
        recipe = replace(recipe, **_dummy_values(arch, name))
    return recipe


def linear_scaling_hint(arch: str, world_size: int, batch_size: int) -> float:
    """The lr the linear scaling rule suggests, from the 1-device recipe."""
    base = _SINGLE[arch]
    return base.lr * (world_size * batch_size) / base.batch_size
