"""Input preprocessing each architecture expects: crop size, eval resize, normalisation.

Data loading, demo and export read these configs instead of repeating constants.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images must look when they reach the model.

    Attributes:
        input_size: default square crop size (training crop and eval centre crop).
        crop_pct: eval centre-crop fraction; the short side is resized to
            ``round(size / crop_pct)`` before the centre crop.
        interpolation: resize interpolation, a ``torchvision.transforms.InterpolationMode`` value name.
        mean, std: per-channel normalisation applied to [0, 1] RGB pixels.
        min_input_size: smallest height/width the network accepts (its forward raises below it).
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_input_size: int

    def eval_resize(self, image_size: int | None = None) -> int:
        """Short-side resize before the eval centre crop (342 for a 299 crop)."""
        return round((image_size or self.input_size) / self.crop_pct)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


INCEPTION_V3 = PreprocessConfig(
    input_size=299,
    crop_pct=0.875,
    interpolation="bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    min_input_size=75,
)

# timm evaluates its legacy_xception weights at resize 333 (crop_pct 0.8975), bicubic; we keep
# one eval recipe (342 -> 299, bilinear) for both architectures.
XCEPTION = PreprocessConfig(
    input_size=299,
    crop_pct=0.875,
    interpolation="bilinear",
    mean=HALF,
    std=HALF,
    min_input_size=7,
)
