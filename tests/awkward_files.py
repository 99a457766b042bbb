"""Awkward image files for the tests: odd colour modes and broken files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.data.embedded import class_name, render_image

KINDS = ("gray", "cmyk", "palette", "rgba", "corrupt", "garbage")


def add_awkward_files(root: Path, kinds: tuple[str, ...] = KINDS, num_classes: int = 2,
                      size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Write ``extra_<kind>.<ext>`` files into ``root/train/<class 0>``; returns that folder.

    ``gray`` (L JPEG), ``cmyk`` (CMYK JPEG), ``palette`` (P PNG), ``rgba`` (RGBA PNG),
    ``corrupt`` (a JPEG cut in half: opens, fails to decode), ``garbage`` (random bytes named
    ``.jpg``: fails to open). The names sort before the class's regular images.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)} (choose from {', '.join(KINDS)})")
    folder = root / "train" / class_name(0, num_classes)
    rng = np.random.default_rng([seed, 2, 0])
    rgb = Image.fromarray(render_image(rng, 0, num_classes, *size))
    for kind in kinds:
        if kind == "gray":
            rgb.convert("L").save(folder / "extra_gray.jpg", "JPEG", quality=90)
        elif kind == "cmyk":
            rgb.convert("CMYK").save(folder / "extra_cmyk.jpg", "JPEG", quality=90)
        elif kind == "palette":
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "extra_palette.png")
        elif kind == "rgba":
            rgba = rgb.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(size))
            rgba.save(folder / "extra_rgba.png")
        elif kind == "corrupt":
            path = folder / "extra_corrupt.jpg"
            rgb.save(path, "JPEG", quality=90)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "garbage":
            (folder / "extra_garbage.jpg").write_bytes(rng.bytes(512))
    return folder
