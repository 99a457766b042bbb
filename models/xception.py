"""Xception: Inception modules replaced by depthwise-separable convolutions with residuals.

François Chollet: "Xception: Deep Learning with Depthwise Separable Convolutions",
CVPR 2017, https://arxiv.org/abs/1610.02357.

Parameter and buffer names are those of timm's ``legacy_xception`` (the Keras weights
ported by Cadene), so its state dict loads with ``strict=True`` and gives the same outputs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import SeparableConv2d, check_input_size


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU -> separable 3x3 conv -> BN), an optional strided max pool, plus a shortcut.

    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes.
    ``rep`` keeps the reference's layer order (ReLUs included) so the parameter indices match.

    Args:
        grow_first: widen to ``out_channels`` in the first separable conv (else in the last).
        start_with_relu: begin with a ReLU (the first block follows the stem's ReLU already).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reps: int,
        stride: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
    ) -> None:
        super().__init__()
        if out_channels != in_channels or stride != 1:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None
            self.skipbn = None

        if grow_first:
            widths = [in_channels] + [out_channels] * reps
        else:
            widths = [in_channels] * reps + [out_channels]
        layers: list[nn.Module] = []
        for i in range(reps):
            if i > 0 or start_with_relu:
                # The first ReLU must not overwrite the block input: the shortcut still needs it.
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv2d(widths[i], widths[i + 1]), nn.BatchNorm2d(widths[i + 1])]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + shortcut


class Xception(nn.Module):
    """Xception for 299x299 ImageNet crops: entry flow, 8 middle-flow blocks, exit flow.

    22,855,952 parameters (1000 classes); 8,357,403,496 (8.36 G) multiply-adds per 299x299 image
    (measured with ``torch.utils.flop_counter.FlopCounterMode``: convolutions and the classifier,
    FLOPs / 2). Inputs must be at least 7x7 pixels, the smallest size the layers accept (every
    map from the stem on is then 1x1, so train-mode BatchNorm needs a batch of 2 or more).

    Initialisation as in timm: convs Kaiming-normal (fan_out, ReLU gain); BN weight 1, bias 0;
    the classifier PyTorch's default ``nn.Linear`` init.

    Args:
        num_classes: classifier outputs.
        dropout: dropout probability before the classifier (0 in the reference).
    """

    arch = "xception"
    # Smallest input its stride-2 layers accept (measured); every map is then 1x1.
    MIN_INPUT_SIZE = 7
    classifier_names = ("fc",)
    optional_names: tuple[str, ...] = ()

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 2048
        # Entry flow
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.block1 = XceptionBlock(64, 128, reps=2, stride=2, start_with_relu=False)
        self.block2 = XceptionBlock(128, 256, reps=2, stride=2)
        self.block3 = XceptionBlock(256, 728, reps=2, stride=2)
        # Middle flow: 8 identical residual blocks
        self.block4 = XceptionBlock(728, 728, reps=3)
        self.block5 = XceptionBlock(728, 728, reps=3)
        self.block6 = XceptionBlock(728, 728, reps=3)
        self.block7 = XceptionBlock(728, 728, reps=3)
        self.block8 = XceptionBlock(728, 728, reps=3)
        self.block9 = XceptionBlock(728, 728, reps=3)
        self.block10 = XceptionBlock(728, 728, reps=3)
        self.block11 = XceptionBlock(728, 728, reps=3)
        # Exit flow
        self.block12 = XceptionBlock(728, 1024, reps=2, stride=2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, self.num_features)
        self.bn4 = nn.BatchNorm2d(self.num_features)
        # Head
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_classifier(self) -> None:
        """(Re-)initialise the classifier head, e.g. before fine-tuning on new classes."""
        self.fc.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.MIN_INPUT_SIZE, self.arch)
        # Shapes for a N x 3 x 299 x 299 input.
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # N x 32 x 149 x 149
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)  # N x 64 x 147 x 147
        x = self.block1(x)  # N x 128 x 74 x 74
        x = self.block2(x)  # N x 256 x 37 x 37
        x = self.block3(x)  # N x 728 x 19 x 19
        x = self.block4(x)  # N x 728 x 19 x 19 (same through block11)
        x = self.block5(x)
        x = self.block6(x)
        x = self.block7(x)
        x = self.block8(x)
        x = self.block9(x)
        x = self.block10(x)
        x = self.block11(x)
        x = self.block12(x)  # N x 1024 x 10 x 10
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)  # N x 1536 x 10 x 10
        x = F.relu(self.bn4(self.conv4(x)), inplace=True)  # N x 2048 x 10 x 10
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # N x 2048
        x = self.dropout(x)
        return self.fc(x)  # N x num_classes


def xception(num_classes: int = 1000, *, dropout: float = 0.0) -> Xception:
    """Builder used by the registry; see ``Xception`` for the options."""
    return Xception(num_classes, dropout=dropout)
