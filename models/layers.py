"""Building blocks shared by the architectures in this package."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU.

    The attribute names ``conv`` and ``bn`` are those of torchvision's Inception
    ``BasicConv2d``, so its weights load unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SeparableConv2d(nn.Module):
    """Depthwise k x k convolution (``conv1``) followed by a pointwise 1x1 one (``pointwise``).

    No normalisation or activation in between, as in Xception. No biases: a BatchNorm follows.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride=stride, padding=padding, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


def check_input_size(x: torch.Tensor, min_size: int, arch: str) -> None:
    """Fail early, with a readable message, on images too small for the network.

    Reads plain ints from ``x.shape`` so it stays cheap under ``torch.compile`` and
    ``torch.export``. Skipped while TorchScript-tracing (the legacy ONNX exporter): sizes are
    traced values there and a traced graph could not raise anyway.
    """
    if torch.jit.is_tracing():
        return
    height, width = x.shape[-2], x.shape[-1]
    if height < min_size or width < min_size:
        raise ValueError(f"{arch} needs inputs of at least {min_size}x{min_size} pixels, got {height}x{width}")


_TWO_SIGMA_MASS = math.erf(2.0 / math.sqrt(2.0))  # P(|z| < 2) for a standard normal z


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Zero-mean normal truncated at two standard deviations (TensorFlow's ``truncated_normal``).

    Inverse-CDF sampling, one pass: ``nn.init.trunc_normal_`` rejection-samples the whole
    tensor again while any value is out of range, which takes a minute for Inception v3.
    """
    edge = _TWO_SIGMA_MASS
    return tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2.0 * std, 2.0 * std)
