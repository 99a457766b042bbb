"""Synthetic ImageFolder datasets: the embedded default data set (``--dummy``) and its generator.

Each class has its own hue (evenly spaced around the colour wheel) and its own shape or
texture (circle, square, stripes, checker ...), drawn at a random position, size and
brightness over a tinted, noisy background: any crop carries the colour cue and most
carry the shape, so a CNN trained from scratch beats chance within an epoch or two.
Generation is deterministic given ``seed`` (one RNG per image, independent of order).
"""
from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.progress import QUIET, Progress

log = logging.getLogger(__name__)

# The embedded default dataset (``ensure_dummy_imagefolder``). Bump DUMMY_VERSION whenever
# anything below or the drawing code changes, so stale caches are not reused.
DUMMY_VERSION = "dummy-v1"
DUMMY_NUM_CLASSES = 10
DUMMY_TRAIN_PER_CLASS = 48
DUMMY_VAL_PER_CLASS = 16
DUMMY_IMAGE_SIZE = (136, 136)
DUMMY_SIZES_JITTER = 0.15  # sides vary by +-15%: about 116 to 156 px
DUMMY_SEED = 0
CACHE_SUBDIR = "inception-xception"

_SHAPES = ("circle", "square", "hstripes", "checker", "ring", "diamond", "vstripes", "cross",
           "triangle", "dots")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "PPM": ".ppm"}
_SPLIT_IDS = {"train": 0, "val": 1}


def class_name(index: int, num_classes: int) -> str:
    return f"class_{index:0{max(2, len(str(num_classes - 1)))}d}"


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, radius: float, period: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at 0 (xx, yy are offsets from the centre, in pixels)."""
    ax, ay = np.abs(xx), np.abs(yy)
    inside = np.maximum(ax, ay) < radius
    if shape == "circle":
        return xx ** 2 + yy ** 2 < radius ** 2
    if shape == "square":
        return inside
    if shape == "ring":
        d2 = xx ** 2 + yy ** 2
        return (d2 < radius ** 2) & (d2 > (0.55 * radius) ** 2)
    if shape == "diamond":
        return ax + ay < radius
    if shape == "cross":
        return ((ax < radius / 3) & (ay < radius)) | ((ay < radius / 3) & (ax < radius))
    if shape == "triangle":
        return (yy < radius) & (yy > -radius) & (ax < (yy + radius) / 2)
    if shape == "hstripes":
        return inside & (np.floor(yy / period) % 2 == 0)
    if shape == "vstripes":
        return inside & (np.floor(xx / period) % 2 == 0)
    if shape == "checker":
        return inside & ((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0)
    if shape == "dots":
        return inside & (((xx % (2 * period)) - period) ** 2 + ((yy % (2 * period)) - period) ** 2
                         < (0.6 * period) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_image(rng: np.random.Generator, label: int, num_classes: int, width: int, height: int) -> np.ndarray:
    """One H x W x 3 uint8 image of class ``label``."""
    hue = label / num_classes
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)))
    bg_hue = (hue + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
    bg = np.array(colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.2, 0.4), rng.uniform(0.25, 0.6)))

    side = min(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Background: the tint with a gentle random gradient.
    gx, gy = rng.uniform(-0.3, 0.3, size=2)
    shade = 1.0 + gx * (xx / width - 0.5) + gy * (yy / height - 0.5)
    image = shade[..., None] * bg

    radius = rng.uniform(0.22, 0.42) * side
    cx = rng.uniform(radius * 0.6, width - radius * 0.6)
    cy = rng.uniform(radius * 0.6, height - radius * 0.6)
    period = max(2.0, rng.uniform(0.08, 0.14) * side)
    mask = _shape_mask(_SHAPES[label % len(_SHAPES)], xx - cx, yy - cy, radius, period)
    image[mask] = fg

    image = image * rng.uniform(0.75, 1.25) * 255.0
    image += rng.normal(0.0, rng.uniform(3.0, 10.0), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _image_size(base: tuple[int, int], jitter: float, rng: np.random.Generator) -> tuple[int, int]:
    if not jitter:
        return base
    w, h = (max(8, int(round(side * rng.uniform(1 - jitter, 1 + jitter)))) for side in base)
    return w, h


def make_imagefolder(
    root: str | os.PathLike,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    image_size: int | tuple[int, int] = (64, 48),
    seed: int = 0,
    fmt: str = "JPEG",
    quality: int = 90,
    sizes_jitter: float = 0.0,
    progress: str | None = None,
) -> Path:
    """Write ``root/{train,val}/class_XX/*`` of the synthetic task and return ``root``.

    Args:
        image_size: ``(width, height)`` or one side for square images.
        fmt: Pillow format name (JPEG, PNG, BMP, WEBP, TIFF, PPM).
        sizes_jitter: each side is scaled by a random factor in ``[1 - j, 1 + j]``
            (0.25 around 500x375 gives an ImageNet-like spread of sizes).
        progress: a description for a progress bar (``training.progress``), or None: none.
    """
    root = Path(root)
    fmt = fmt.upper()
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unsupported format {fmt!r} (choose from {', '.join(_EXTENSIONS)})")
    base = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    save_args = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}

    bar = Progress(num_classes * (train_per_class + val_per_class), progress or "", unit="img",
                   display=None if progress else QUIET)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / class_name(label, num_classes)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, i])
                w, h = _image_size(base, sizes_jitter, rng)
                pixels = render_image(rng, label, num_classes, w, h)
                path = folder / f"{split}_{label:04d}_{i:05d}{_EXTENSIONS[fmt]}"
                Image.fromarray(pixels).save(path, fmt, **save_args)
                bar.advance()
    bar.close()
    return root


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/inception-xception``, by default ``~/.cache/inception-xception``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_SUBDIR


def ensure_dummy_imagefolder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded default dataset, generated once into ``<cache_dir>/dummy-v1``; returns that path.

    ``cache_dir`` defaults to ``default_cache_dir()``. The folder is built in a temporary
    sibling and renamed into place, so it either exists complete or not at all; when
    another process wins the race, its copy is kept and ours is discarded.
    """
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / DUMMY_VERSION
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DUMMY_VERSION}.tmp-", dir=parent))
    try:
        log.info("generating the --dummy data set once: %d JPEG images into %s",
                 DUMMY_NUM_CLASSES * (DUMMY_TRAIN_PER_CLASS + DUMMY_VAL_PER_CLASS), target)
        make_imagefolder(staging, DUMMY_NUM_CLASSES, DUMMY_TRAIN_PER_CLASS, DUMMY_VAL_PER_CLASS,
                         image_size=DUMMY_IMAGE_SIZE, seed=DUMMY_SEED, sizes_jitter=DUMMY_SIZES_JITTER,
                         progress="generating the --dummy data set")
        (staging / "dataset.json").write_text(json.dumps({
            "version": DUMMY_VERSION, "num_classes": DUMMY_NUM_CLASSES,
            "train_per_class": DUMMY_TRAIN_PER_CLASS, "val_per_class": DUMMY_VAL_PER_CLASS,
            "image_size": DUMMY_IMAGE_SIZE, "sizes_jitter": DUMMY_SIZES_JITTER, "seed": DUMMY_SEED,
        }, indent=1) + "\n")
        try:
            os.rename(staging, target)  # atomic; fails if target appeared meanwhile
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
