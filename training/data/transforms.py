"""Image transforms run in DataLoader workers: one decode and one resize per image, uint8 out.

``TrainTransform`` and ``EvalTransform`` keep the augmentation of the classic torchvision
recipe (``RandomResizedCrop`` + ``RandomHorizontalFlip``, ``Resize`` + ``CenterCrop``),
with the same crop sampling and the same torch RNG draws, but do less work per image:

* the crop box is computed on the *undecoded* image (``Image.open`` is lazy), so a JPEG
  much larger than the crop is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``draft``),
  never below the output resolution;
* training crops that need a full decode are cropped and resized by torch's antialiased
  uint8 bilinear kernel (the classic pipeline's pixels within 1, ~3x faster than Pillow's
  resize); otherwise crop and resize are one ``Image.resize(..., box=...)`` call;
* the result stays uint8 (``ToTensor``/``Normalize`` move to the device, see
  ``training.data.device_loader.DeviceLoader``), so workers ship 4x fewer bytes.

Colour modes: every image comes out RGB. ``L`` and ``RGB`` images are resized as they are
(resizing ``L`` then replicating it to RGB is exact); every other mode (palette, CMYK,
``1``, ``I;16``, ``LA``/``RGBA``/``PA`` ...) is first converted with ``convert("RGB")``,
exactly what torchvision's ImageFolder loader does. That **drops alpha** without
compositing: a transparent pixel shows whatever colour it stores, as in the classic
pipeline, so both pipelines see the same pixels.

Each transform has two halves: ``decode`` reads the pixels (the one step a broken file
can make fail, so the dataset catches read errors around it alone) and ``finish`` crops,
resizes and flips; a bug in ``finish`` surfaces as itself.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from models.errors import UserError

if TYPE_CHECKING:
    from models.preprocess import PreprocessConfig

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_DRAFT_SCALES = (8, 4, 2)  # the DCT reductions libjpeg offers, largest first
_RESIZE_AS_IS = ("RGB", "L")  # modes that resize correctly without a conversion first

# Pillow's reducing_gap: shrink by an integer factor with a box filter first when the
# remaining downscale is at least this large. 3.0 is indistinguishable from a full
# resample (Pillow docs); after draft decoding it only triggers on very large crops.
DEFAULT_REDUCING_GAP = 3.0


def resample_filter(interpolation: str) -> Image.Resampling:
    """Pillow filter for an interpolation name (torchvision ``InterpolationMode`` value)."""
    try:
        return _RESAMPLE[interpolation.lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r} (choose from {', '.join(_RESAMPLE)})"
        ) from None


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Crop ``(top, left, height, width)`` sampled like ``RandomResizedCrop.get_params``.

    Same torch RNG calls in the same order with the same float32 arithmetic, so a given
    RNG state yields the crop torchvision would pick (the tests check this).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # Fallback: the central crop with the aspect ratio clamped into ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draft_scale(crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
    """Largest JPEG DCT reduction that still leaves the crop at least ``out`` pixels."""
    for s in _DRAFT_SCALES:
        if crop_w >= out_w * s and crop_h >= out_h * s:
            return s
    return 1


# Filters torch has antialiased uint8 kernels for (vectorised, channels-last): about 3x
# faster than Pillow's resize on one core (bench/input_pipeline.py, docs/PERFORMANCE.md).
_TENSOR_RESIZE = ("bilinear",)


def _resize_tensor(crop: Image.Image, size: int, mode: str, flip: bool) -> torch.Tensor:
    """Resize a decoded RGB crop to size x size with torch's antialiased uint8 kernel; RGB uint8
    CHW with HWC memory.

    Crop-then-resize is the classic pipeline's order (``F.resized_crop``), and torch's
    antialiased bilinear follows Pillow's filter: the pixels equal the classic pipeline's
    within 1 (rounding), closer than a box resize, which reads neighbours past the crop edge.
    """
    # Dense HWC memory (NCHW shape, channels-last strides) takes torch's vectorised uint8
    # path and gives HWC output.
    pixels = _hwc_view(crop).unsqueeze(0).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(pixels, size=(size, size), mode=mode, antialias=True, align_corners=False)
    if flip:
        out = out.flip(-1)
    return out.contiguous(memory_format=torch.channels_last)[0]  # HWC memory for the collate (a no-op)


def _hwc_view(img: Image.Image) -> torch.Tensor:
    """H x W x 3 uint8 tensor over the image's bytes (read-only: never write to it)."""
    array = np.asarray(img)  # backed by an immutable bytes object
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """CHW uint8 view of the image's HWC bytes: no copy beyond Pillow's ``tobytes``.

    The tensor views read-only memory and has channels-last strides; ``collate_batch``
    stacks it into a contiguous NHWC batch. Clone it before writing to it in place.
    """
    return _hwc_view(img).permute(2, 0, 1)


@dataclass
class Decoded:
    """An image read from its file, ready for the resize: what ``decode`` hands to ``finish``.

    Attributes:
        image: the decoded pixels (RGB or L), possibly at a reduced JPEG scale.
        box: the region to resize, in ``image``'s pixels (None: the whole image).
        flip: mirror the result horizontally.
        tensor_resize: resize with torch's uint8 kernel instead of Pillow's.
    """

    image: Image.Image
    box: tuple[float, float, float, float] | None
    flip: bool = False
    tensor_resize: bool = False


def _decode_region(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Decoded:
    """Decode ``img`` at the largest JPEG reduction that keeps ``box`` at ``size`` pixels or more."""
    left, top, right, bottom = box
    s = _draft_scale(right - left, bottom - top, size, size)
    if s > 1:
        width = img.size[0]
        # Only JPEG (and MPO) decoders act on draft; other formats return None. Asking for
        # (W // s, H // s) makes Pillow pick exactly scale s (W // (W // s) is in [s, 2s)).
        drafted = img.draft("RGB", (img.size[0] // s, img.size[1] // s))
        if drafted is not None:
            # Reduced pixel k covers original pixels [k*s, (k+1)*s): coordinates scale by 1/s.
            factor = drafted[1][2] / width
            box = (left * factor, top * factor, right * factor, bottom * factor)
    img.load()
    if img.mode not in _RESIZE_AS_IS:
        img = img.convert("RGB")  # before resizing: palette/1 would resize as NEAREST, RGBA premultiplied
    return Decoded(img, box)


def _resize_decoded(decoded: Decoded, size: int, resample: Image.Resampling,
                    reducing_gap: float | None) -> torch.Tensor:
    out = decoded.image.resize((size, size), resample, box=decoded.box, reducing_gap=reducing_gap)
    if out.mode != "RGB":
        out = out.convert("RGB")
    if decoded.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_uint8_chw(out)


class TrainTransform:
    """RandomResizedCrop + RandomHorizontalFlip on a lazily opened PIL image -> uint8 CHW.

    ``decode`` draws the crop and the flip and reads the pixels (the only part that can fail
    on a broken file); ``finish`` resizes. Calling the transform does both.

    Args:
        image_size: output side (square crops).
        interpolation: resize filter name (``bilinear``, ``bicubic`` ...).
        scale, ratio: as ``torchvision.transforms.RandomResizedCrop``.
        hflip: probability of a horizontal flip.
        reducing_gap: Pillow ``reducing_gap`` (None: always a full resample).
        extra: further augmentation of the uint8 CHW result (``extra_augmentation``), or None.
    """

    def __init__(
        self,
        image_size: int,
        interpolation: str = "bilinear",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        reducing_gap: float | None = DEFAULT_REDUCING_GAP,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.resample = resample_filter(interpolation)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.reducing_gap = reducing_gap
        self.extra = extra

    def decode(self, img: Image.Image) -> Decoded:
        width, height = img.size
        top, left, h, w = random_resized_crop_params(width, height, self.scale, self.ratio)
        flip = bool(torch.rand(1) < self.hflip)  # the draw RandomHorizontalFlip makes, after the crop's
        size = self.image_size
        if self.interpolation in _TENSOR_RESIZE and _draft_scale(w, h, size, size) == 1:
            # No reduced decode possible: decode fully, crop, and resize in torch (finish).
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            return Decoded(rgb.crop((left, top, left + w, top + h)), None, flip, tensor_resize=True)
        decoded = _decode_region(img, (left, top, left + w, top + h), size)
        decoded.flip = flip
        return decoded

    def finish(self, decoded: Decoded) -> torch.Tensor:
        if decoded.tensor_resize:
            image = _resize_tensor(decoded.image, self.image_size, self.interpolation, decoded.flip)
        else:
            image = _resize_decoded(decoded, self.image_size, self.resample, self.reducing_gap)
        return self.extra(image) if self.extra is not None else image

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.finish(self.decode(img))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, interpolation={self.interpolation!r}, "
                f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, extra={self.extra!r})")


def eval_crop_box(width: int, height: int, image_size: int, resize_size: int) -> tuple[float, float, float, float]:
    """The region of the original image that Resize(resize_size) + CenterCrop(image_size) keeps.

    Reproduces torchvision's integer sizes (long side ``int(resize * long / short)``,
    crop offset ``round((new - crop) / 2)``) and maps them back to original pixels, so
    one ``resize(box=...)`` samples exactly the pixels the two-step version does.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    left = int(round((new_w - image_size) / 2.0))
    top = int(round((new_h - image_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)


class EvalTransform:
    """Resize(resize_size) (short side) + CenterCrop(image_size) as one box resize -> uint8 CHW."""

    def __init__(
        self,
        image_size: int,
        resize_size: int,
        interpolation: str = "bilinear",
        reducing_gap: float | None = DEFAULT_REDUCING_GAP,
    ) -> None:
        if resize_size < image_size:
            raise ValueError(f"eval resize {resize_size} is smaller than the crop {image_size}")
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.interpolation = interpolation
        self.resample = resample_filter(interpolation)
        self.reducing_gap = reducing_gap

    def decode(self, img: Image.Image) -> Decoded:
        return _decode_region(img, eval_crop_box(*img.size, self.image_size, self.resize_size), self.image_size)

    def finish(self, decoded: Decoded) -> torch.Tensor:
        return _resize_decoded(decoded, self.image_size, self.resample, self.reducing_gap)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.finish(self.decode(img))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, resize_size={self.resize_size}, "
                f"interpolation={self.interpolation!r})")


AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet")


@dataclass(frozen=True)
class AugmentSettings:
    """Training augmentation and evaluation crop; the defaults are the ModelZoo recipes'.

    Attributes:
        scale, ratio, hflip: RandomResizedCrop's area and aspect ranges, the flip probability.
        interpolation: the resize filter (None: the model's).
        crop_pct: evaluation centre crop fraction (None: the model's, 0.875).
        auto_augment: ``ra``, ``ta_wide``, ``augmix`` or ``imagenet`` (torchvision v2), or None.
        random_erase: RandomErasing probability.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str | None = None
    crop_pct: float | None = None
    auto_augment: str | None = None
    random_erase: float = 0.0


def extra_augmentation(auto_augment: str | None, random_erase: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision v2 augmentation of a uint8 CHW crop: an AutoAugment-family policy and
    RandomErasing, in that order; None when neither is asked for."""
    from torchvision.transforms import v2

    policies = {"ra": v2.RandAugment, "ta_wide": v2.TrivialAugmentWide, "augmix": v2.AugMix,
                "imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)}
    steps = [policies[auto_augment]()] if auto_augment else []
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase, value=0))
    return v2.Compose(steps) if steps else None


class ImageReadError(UserError):
    """An image file that cannot be opened or decoded; the message names it."""


def read_eval_image(path: str | os.PathLike, image_size: int, preprocess: PreprocessConfig) -> torch.Tensor:
    """One image as validation sees it: Resize + CenterCrop, uint8 1 x 3 x S x S (for a Normalizer)."""
    transform = EvalTransform(image_size, preprocess.eval_resize(image_size), preprocess.interpolation)
    try:
        with Image.open(path) as img:
            decoded = transform.decode(img)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from None
    return transform.finish(decoded).unsqueeze(0)
