"""What images must look like when they reach a model, and the one uint8 -> float step.

``PreprocessConfig`` is each architecture's crop size, eval resize, interpolation and
normalisation (the registry holds one per model). ``Normalizer`` turns a batch of uint8
pixels into the normalised float input; the training loader, the demo and the ONNX export
all use it, so the three can never disagree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are cropped and normalised for one architecture.

    Attributes:
        input_size: default square crop size (training crop and eval centre crop).
        crop_pct: eval centre-crop fraction; the short side is resized to
            ``round(size / crop_pct)`` before the centre crop.
        interpolation: resize interpolation, a ``torchvision.transforms.InterpolationMode`` value name.
        mean, std: per-channel normalisation applied to [0, 1] RGB pixels.
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def eval_resize(self, image_size: int | None = None) -> int:
        """Short-side resize before the eval centre crop (342 for a 299 crop)."""
        return round((image_size or self.input_size) / self.crop_pct)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


INCEPTION_V3 = PreprocessConfig(input_size=299, crop_pct=0.875, interpolation="bilinear",
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)

# timm evaluates its legacy_xception weights at resize 333 (crop_pct 0.8975), bicubic; we keep
# the seeds' one eval recipe (342 -> 299, bilinear) for both architectures.
XCEPTION = PreprocessConfig(input_size=299, crop_pct=0.875, interpolation="bilinear", mean=HALF, std=HALF)


class Normalizer:
    """``(x / 255 - mean) / std`` in float32 for a uint8 N x 3 x H x W batch, on its device.

    The output keeps the input's memory format. For channels-last input the arithmetic runs
    on rows of W x C values against a mean/std row repeated W times: with the channel
    innermost, broadcasting a (1, C, 1, 1) mean would give the kernels an inner loop of
    C = 3 elements (about 4x slower on a CPU, bench/input_pipeline.py). Bit-identical.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.mean = torch.tensor([m * 255 for m in mean], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([s * 255 for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image width -> (mean, std) rows

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalizer expects uint8 images, got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"Normalizer expects an N x C x H x W batch, got shape {tuple(images.shape)}")
        n, c, h, w = images.shape
        if not (images.numel() and images.is_contiguous(memory_format=torch.channels_last)) or c == 1:
            return images.to(torch.float32).sub_(self.mean).div_(self.std)
        if w not in self._rows:
            self._rows[w] = (self.mean.view(-1).repeat(w), self.std.view(-1).repeat(w))
        mean, std = self._rows[w]
        rows = images.permute(0, 2, 3, 1).reshape(n * h, w * c)  # a view of the NHWC memory
        rows = rows.to(torch.float32).sub_(mean).div_(std)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
