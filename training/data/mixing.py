"""MixUp and CutMix on the device batch (torchvision's v2 transforms), with soft targets."""
from __future__ import annotations

import torch


def keep_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No mixing: the batch and its class labels as they are."""
    return images, labels


class BatchMixer:
    """Mix each training batch: MixUp, CutMix, or one of the two chosen per batch.

    Returns the mixed images and soft targets (class probabilities), which
    ``nn.CrossEntropyLoss`` takes as they are. Draws from torch's generator, which the loop
    seeds per step.
    """

    def __init__(self, num_classes: int, mixup: float, cutmix: float):
        from torchvision.transforms import v2

        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixer needs --mixup or --cutmix above 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(images, labels)


def build_mixer(num_classes: int, mixup: float, cutmix: float):
    """The batch mixing the options ask for, or ``keep_batch``."""
    return BatchMixer(num_classes, mixup, cutmix) if mixup > 0 or cutmix > 0 else keep_batch
