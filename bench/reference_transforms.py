"""The plain torchvision input pipeline the reference scripts use (float, normalised, in the
worker): the baseline ``bench/input_pipeline.py`` measures ours against, and the pixels the
tests compare ours with."""
from __future__ import annotations

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


class ToRGB:
    """``img.convert("RGB")``, the conversion torchvision's ImageFolder loader applies."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def classic_train_transform(image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
                            interpolation: str = "bilinear", scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> T.Compose:
    """PIL -> RGB -> RandomResizedCrop -> flip -> ToTensor -> Normalize (float CHW)."""
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=InterpolationMode(interpolation)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def classic_eval_transform(image_size: int, resize_size: int, mean: tuple[float, float, float],
                           std: tuple[float, float, float], interpolation: str = "bilinear") -> T.Compose:
    """PIL -> RGB -> Resize(short side) -> CenterCrop -> ToTensor -> Normalize."""
    return T.Compose([
        ToRGB(),
        T.Resize(resize_size, interpolation=InterpolationMode(interpolation)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
