"""Offline inference on one image: load a checkpoint, print the top-k classes.

    python demo.py                                     # demo/sample.jpg, newest checkpoint under output/
    python demo.py --checkpoint output/model_best.pth.tar --image cat.jpg --topk 3
    python demo.py --checkpoint inception_v3.pth -a inception_v3   # a bare state dict needs -a

Reads our checkpoints, ModelZoo's (``module.`` prefixes) and bare state dicts. Class names
come from the checkpoint; 1000-class checkpoints without names get ImageNet's. No network
access and no process group.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

import models
from models.weights import WeightsError, extract_state_dict, load_weights, read_weights_file
from training import device as devices
from training.checkpoint import find_latest_checkpoint
from training.transforms import EvalTransform

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE / "demo" / "sample.jpg"
DEFAULT_SEARCH_DIR = Path("output")  # main.py's default --output_dir, relative to where it ran
IMAGENET_CLASSES = 1000


class DemoError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass
class LoadedModel:
    """A model in eval mode and what its checkpoint said about it."""

    model: nn.Module
    arch: str
    num_classes: int
    class_names: list[str] | None
    image_size: int | None  # training crop size stored in the checkpoint, if any
    epoch: int | None


def find_checkpoint(path: str | None, search_dir: Path = DEFAULT_SEARCH_DIR) -> Path:
    """``path`` if given, else the newest readable checkpoint below ``search_dir``."""
    if path is not None:
        return Path(path)
    found = find_latest_checkpoint(search_dir)
    if found is None:
        raise DemoError(f"no checkpoint found under {search_dir}/; train one first, "
                        f"e.g. python main.py -a inception_v3 --dummy --epochs 2")
    return found


def _num_classes_of(arch: str, state: Mapping[str, torch.Tensor], source: Path) -> int:
    # Bare state dicts do not say how many classes they have; the classifier's rows do.
    with torch.device("meta"):  # no memory, no initialisation cost: only the head names are read
        probe = models.create_model(arch)
    for head in probe.classifier_names:
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    raise DemoError(f"{source} has no classifier weights ({', '.join(probe.classifier_names)}) "
                    f"for {arch}; is -a right?")


def load_model(path: Path, arch: str | None = None) -> LoadedModel:
    """Build the checkpoint's model for inference (eval mode, on the CPU, no aux head)."""
    try:
        obj = read_weights_file(path)
        state = extract_state_dict(obj, str(path))
    except WeightsError as error:
        raise DemoError(str(error)) from None
    meta = obj if isinstance(obj, Mapping) and ("state_dict" in obj or "model" in obj) else {}
    name = arch or meta.get("arch")
    if not name:
        raise DemoError(f"{path} does not name its architecture; give it with -a "
                        f"({', '.join(models.list_models())})")
    try:
        name = models.resolve_arch(str(name))
    except ValueError as error:
        raise DemoError(f"{path}: {error}") from None
    if arch and meta.get("arch") and models.resolve_arch(str(meta["arch"])) != name:
        raise DemoError(f"{path} is a checkpoint of {meta['arch']}, but -a is {name}")
    num_classes = int(meta.get("num_classes") or _num_classes_of(name, state, path))
    # The aux head only matters for training; its weights, if present, are dropped.
    wanted = {"aux_logits": False, "init_weights": False}
    accepted = models.model_options(name)
    model = models.create_model(name, num_classes=num_classes,
                                **{key: value for key, value in wanted.items() if key in accepted})
    try:
        load_weights(model, state, strict_head=True)
    except WeightsError as error:
        raise DemoError(f"{path}: {error}") from None
    model.eval()
    names = meta.get("class_names")
    return LoadedModel(model, name, num_classes, list(names) if names else None,
                       meta.get("image_size"), meta.get("epoch"))


def class_names_for(loaded: LoadedModel) -> list[str]:
    if loaded.class_names and len(loaded.class_names) == loaded.num_classes:
        return loaded.class_names
    if loaded.num_classes == IMAGENET_CLASSES:
        from torchvision.models import Inception_V3_Weights  # its metadata is local: no download

        return list(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])
    return [f"class {index}" for index in range(loaded.num_classes)]


def load_image(path: Path, image_size: int, preprocess: models.PreprocessConfig) -> torch.Tensor:
    """A 1 x 3 x S x S float tensor, resized, centre-cropped and normalised like validation."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise DemoError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DemoError(f"cannot read image {path}: {error}") from None
    transform = EvalTransform(image_size, preprocess.eval_resize(image_size), preprocess.interpolation)
    pixels = transform(image).float().div_(255)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help=f"checkpoint or state dict (default: the newest under {DEFAULT_SEARCH_DIR}/)")
    parser.add_argument("--image", metavar="FILE", default=str(DEFAULT_IMAGE.relative_to(HERE)),
                        help="image to classify (default: demo/sample.jpg next to demo.py)")
    parser.add_argument("-a", "--arch", default=None,
                        help="architecture (default: the checkpoint's; needed for bare state dicts): "
                             + ", ".join(models.list_models()))
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="how many classes to print (default: 5)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="crop size (default: the checkpoint's training size, else the model's)")
    parser.add_argument("--device", choices=("auto", "npu", "cuda", "mps", "cpu"), default="auto",
                        help="device; auto (default) picks npu, then cuda, then mps, then cpu")
    return parser


def _image_path(text: str) -> Path:
    path = Path(text)
    if not path.is_absolute() and not path.exists() and (HERE / path).exists():
        return HERE / path  # the default sample, when demo.py runs from another folder
    return path


def run(args: argparse.Namespace) -> None:
    if args.topk < 1:
        raise DemoError(f"--topk must be at least 1, got {args.topk}")
    checkpoint = find_checkpoint(args.checkpoint)
    loaded = load_model(checkpoint, args.arch)
    preprocess = loaded.model.preprocess
    image_size = args.image_size or loaded.image_size or preprocess.input_size
    image_path = _image_path(args.image)
    batch = load_image(image_path, image_size, preprocess)
    try:
        device = devices.bind(devices.select_device(args.device))
    except devices.DeviceError as error:
        raise DemoError(str(error)) from None

    model = loaded.model.to(device)
    with torch.inference_mode():
        probabilities = model(batch.to(device)).float().softmax(dim=1)[0].cpu()
    top = probabilities.topk(min(args.topk, loaded.num_classes))
    names = class_names_for(loaded)

    epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
    print(f"checkpoint: {checkpoint} ({loaded.arch}{epoch}, {loaded.num_classes} classes)")
    print(f"image: {image_path} ({image_size}x{image_size} crop, on {device})")
    for rank, (probability, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>3}. {probability * 100:6.2f}%  {names[index]} ({index})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
