"""Inception v3 with its auxiliary classifier.

Szegedy, Vanhoucke, Ioffe, Shlens, Wojna: "Rethinking the Inception Architecture for
Computer Vision", CVPR 2016, https://arxiv.org/abs/1512.00567.

Parameter and buffer names are those of ``torchvision.models.inception_v3(aux_logits=True)``,
so a torchvision state dict loads with ``strict=True`` and gives the same outputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConvBNReLU, check_input_size, trunc_normal_
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

BN_EPS = 1e-3  # the TensorFlow reference's batch-norm epsilon


class InceptionOutputs(NamedTuple):
    """What the model returns in train mode when the auxiliary classifier is enabled."""

    logits: torch.Tensor
    aux_logits: torch.Tensor


def _conv(in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0) -> ConvBNReLU:
    return ConvBNReLU(in_channels, out_channels, kernel_size, stride=stride, padding=padding, eps=BN_EPS)


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # Padded positions count in the average (count_include_pad=True), as in the reference.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionBlock35(nn.Module):
    """35x35 grid module (paper Fig. 5): the 5x5 path as in Inception v1, plus two stacked 3x3s."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _conv(in_channels, 64, 1)
        self.branch5x5_1 = _conv(in_channels, 48, 1)
        self.branch5x5_2 = _conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, 3, padding=1)
        self.branch_pool = _conv(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)  # 64 + 64 + 96 + pool_features channels


class ReductionBlock35to17(nn.Module):
    """Grid reduction 35x35 -> 17x17 (paper Fig. 10): strided convs in parallel with a max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)  # 384 + 96 + in_channels channels


class InceptionBlock17(nn.Module):
    """17x17 grid module (paper Fig. 6): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _conv(in_channels, 192, 1)
        self.branch7x7_1 = _conv(in_channels, c7, 1)
        self.branch7x7_2 = _conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = _conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _conv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_3(self.branch7x7dbl_2(c))
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(c))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)  # 4 x 192 = 768 channels


class ReductionBlock17to8(nn.Module):
    """Grid reduction 17x17 -> 8x8: strided convs in parallel with a max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _conv(in_channels, 192, 1)
        self.branch3x3_2 = _conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _conv(in_channels, 192, 1)
        self.branch7x7x3_2 = _conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(b))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)  # 320 + 192 + in_channels channels


class InceptionBlock8(nn.Module):
    """8x8 grid module (paper Fig. 7): filter banks widened with parallel 1x3 and 3x1 outputs."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _conv(in_channels, 320, 1)
        self.branch3x3_1 = _conv(in_channels, 384, 1)
        self.branch3x3_2a = _conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = _conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _conv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)  # 320 + 768 + 768 + 192 = 2048 channels


class AuxClassifier(nn.Module):
    """Auxiliary classifier on the 17x17 grid, used for an extra training loss.

    The reference pools 5x5/stride 3, which turns the 17x17 map of a 299 px input into
    the 5x5 map its 5x5 convolution expects. Smaller inputs give smaller maps, so below
    17x17 we pool adaptively to 5x5 instead; at 17x17 and above the output is the reference's.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = _conv(in_channels, 128, 1)
        self.conv1 = _conv(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] >= 17 and x.shape[-1] >= 17:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)  # N x 768 x 5 x 5 at 17x17
        else:
            x = F.adaptive_avg_pool2d(x, 5)  # N x 768 x 5 x 5
        x = self.conv0(x)  # N x 128 x 5 x 5
        x = self.conv1(x)  # N x 768 x 1 x 1 (larger when the input was larger than 299)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # N x 768
        return self.fc(x)  # N x num_classes


class InceptionV3(nn.Module):
    """Inception v3 for 299x299 ImageNet crops.

    27,161,264 parameters with the auxiliary classifier (1000 classes), 23,834,568 without;
    5,713,216,096 (5.71 G) multiply-adds per 299x299 image in eval mode (measured with
    ``torch.utils.flop_counter.FlopCounterMode``: convolutions and the classifier, FLOPs / 2).
    The auxiliary classifier adds 5,683,200 multiply-adds per image in train mode.

    Train mode with ``aux_logits=True`` returns ``InceptionOutputs(logits, aux_logits)``;
    eval mode (or ``aux_logits=False``) returns the logits tensor alone. Inputs must be at
    least 75x75 pixels (the last maps are then 1x1, so train mode needs a batch of 2 or more for
    BatchNorm). The auxiliary head works at any of these sizes (see ``AuxClassifier``).

    Initialisation, as in the TensorFlow reference and torchvision: conv and linear weights from a
    normal truncated at 2 std, std 0.1 (auxiliary conv1 0.01, auxiliary fc 0.001); BN weight 1, bias 0;
    linear biases 0.

    Args:
        num_classes: classifier outputs.
        aux_logits: build the auxiliary classifier (returned in train mode).
        transform_input: the input is normalised with the ImageNet mean/std; re-map it to the
            (x - 0.5) / 0.5 normalisation the original Google weights were trained with.
        init_weights: apply the initialisation above (else PyTorch's defaults).
        dropout: dropout probability before the final classifier.
    """

    arch = "inception_v3"
    # Below 75x75 the last grid reduction has nothing left to pool (measured).
    MIN_INPUT_SIZE = 75
    # Parameter prefixes of the classifier heads, re-initialised when fine-tuning to new classes.
    classifier_names = ("fc", "AuxLogits.fc")
    # Optional parts: weights for them are dropped when the model was built without them.
    optional_names = ("AuxLogits",)

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        transform_input: bool = False,
        init_weights: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        # Stem
        self.Conv2d_1a_3x3 = _conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _conv(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _conv(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        # 35x35
        self.Mixed_5b = InceptionBlock35(192, pool_features=32)
        self.Mixed_5c = InceptionBlock35(256, pool_features=64)
        self.Mixed_5d = InceptionBlock35(288, pool_features=64)
        # 17x17
        self.Mixed_6a = ReductionBlock35to17(288)
        self.Mixed_6b = InceptionBlock17(768, channels_7x7=128)
        self.Mixed_6c = InceptionBlock17(768, channels_7x7=160)
        self.Mixed_6d = InceptionBlock17(768, channels_7x7=160)
        self.Mixed_6e = InceptionBlock17(768, channels_7x7=192)
        self.AuxLogits = AuxClassifier(768, num_classes) if aux_logits else None
        # 8x8
        self.Mixed_7a = ReductionBlock17to8(768)
        self.Mixed_7b = InceptionBlock8(1280)
        self.Mixed_7c = InceptionBlock8(2048)
        # Head
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.AuxLogits is not None:
            trunc_normal_(self.AuxLogits.conv1.conv.weight, std=0.01)
        self.init_classifier()

    @torch.no_grad()
    def init_classifier(self) -> None:
        """(Re-)initialise the classifier heads, e.g. before fine-tuning on new classes."""
        trunc_normal_(self.fc.weight, std=0.1)
        nn.init.zeros_(self.fc.bias)
        if self.AuxLogits is not None:
            trunc_normal_(self.AuxLogits.fc.weight, std=0.001)
            nn.init.zeros_(self.AuxLogits.fc.bias)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        # (x_in - mean) / std  ->  (x_raw - 0.5) / 0.5, per channel: x * std / 0.5 + (mean - 0.5) / 0.5
        channels = [
            x[:, i : i + 1] * (std / 0.5) + (mean - 0.5) / 0.5
            for i, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))
        ]
        return torch.cat(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | InceptionOutputs:
        check_input_size(x, self.MIN_INPUT_SIZE, self.arch)
        if self.transform_input:
            x = self._transform_input(x)
        # Shapes for a N x 3 x 299 x 299 input.
        x = self.Conv2d_1a_3x3(x)  # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # N x 64 x 147 x 147
        x = self.maxpool1(x)  # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # N x 192 x 71 x 71
        x = self.maxpool2(x)  # N x 192 x 35 x 35
        x = self.Mixed_5b(x)  # N x 256 x 35 x 35
        x = self.Mixed_5c(x)  # N x 288 x 35 x 35
        x = self.Mixed_5d(x)  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)  # N x 768 x 17 x 17
        x = self.Mixed_6b(x)  # N x 768 x 17 x 17
        x = self.Mixed_6c(x)  # N x 768 x 17 x 17
        x = self.Mixed_6d(x)  # N x 768 x 17 x 17
        x = self.Mixed_6e(x)  # N x 768 x 17 x 17
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None  # N x num_classes
        x = self.Mixed_7a(x)  # N x 1280 x 8 x 8
        x = self.Mixed_7b(x)  # N x 2048 x 8 x 8
        x = self.Mixed_7c(x)  # N x 2048 x 8 x 8
        x = self.avgpool(x)  # N x 2048 x 1 x 1
        x = self.dropout(x)
        x = self.fc(x.flatten(1))  # N x num_classes
        if aux is not None:
            return InceptionOutputs(x, aux)
        return x


def inception_v3(
    num_classes: int = 1000,
    *,
    aux_logits: bool = True,
    transform_input: bool = False,
    init_weights: bool = True,
    dropout: float = 0.5,
) -> InceptionV3:
    """Builder used by the registry; see ``InceptionV3`` for the options."""
    return InceptionV3(
        num_classes,
        aux_logits=aux_logits,
        transform_input=transform_input,
        init_weights=init_weights,
        dropout=dropout,
    )
