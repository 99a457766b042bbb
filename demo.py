"""Offline inference on one image: load a checkpoint, print the top-k classes.

    python demo.py                                     # demo/sample.jpg, the newest checkpoint written
    python demo.py --checkpoint output/model_best.pth.tar --image cat.jpg --topk 3
    python demo.py --checkpoint inception_v3.pth -a inception_v3   # a bare state dict needs -a

With no checkpoint it takes the newest run's under ./output, <repo>/output and
<repo>/test/output (main.py's and the test/ scripts' defaults) and says which. Reads our
checkpoints (their EMA weights when they have them, unless --no-ema), ModelZoo's and bare
state dicts. No network access and no process group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import models
from models.errors import UserError
from training import device as devices
from training.checkpoint import checkpoint_for_inference
from training.data.transforms import read_eval_image
from training.inference import load_for_inference

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE / "demo" / "sample.jpg"
IGNORED_UPSTREAM = ("--device-list", "--dist-backend", "--addr")  # ModelZoo demo options with no use here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", "--model-path", "--resume", dest="checkpoint", metavar="FILE", default=None,
                        help="checkpoint or state dict (default: the newest one written under output/ or test/output/)")
    parser.add_argument("--image", metavar="FILE", default=str(DEFAULT_IMAGE.relative_to(HERE)),
                        help="image to classify (default: demo/sample.jpg next to demo.py)")
    parser.add_argument("-a", "--arch", default=None,
                        help="architecture (default: the checkpoint's; needed for bare state dicts): "
                             + ", ".join(models.list_models()))
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="how many classes to print (default: 5)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="crop size (default: the checkpoint's training size, else the model's)")
    parser.add_argument("--device", type=devices.canonical_type, choices=devices.DEVICE_CHOICES, default="auto",
                        help="device; auto (default) picks npu, then cuda, then mps, then cpu (gpu means cuda)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="use the raw weights even when the checkpoint has averaged (EMA) ones")
    for flag in IGNORED_UPSTREAM:
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return parser


def _image_path(text: str) -> Path:
    path = Path(text)
    if not path.is_absolute() and not path.exists() and (HERE / path).exists():
        return HERE / path  # the default sample, when demo.py runs from another folder
    return path


def run(args: argparse.Namespace) -> None:
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    for flag in IGNORED_UPSTREAM:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            print(f"warning: {flag} is accepted for ModelZoo command lines but has no effect here", file=sys.stderr)
    checkpoint = checkpoint_for_inference(args.checkpoint, HERE)
    loaded = load_for_inference(checkpoint, args.arch, use_ema=args.use_ema)
    image_size = args.image_size or loaded.image_size
    image_path = _image_path(args.image)
    pixels = read_eval_image(image_path, image_size, loaded.preprocess)
    device = devices.bind(devices.select_device(args.device))
    normalize = models.Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)
    model = loaded.model.to(device)
    with torch.inference_mode():
        probabilities = model(normalize(pixels.to(device))).float().softmax(dim=1)[0].cpu()
    top = probabilities.topk(min(args.topk, loaded.num_classes))

    epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
    weights = ", EMA weights" if loaded.weights == "ema" else ""
    print(f"checkpoint: {checkpoint} ({loaded.arch}{epoch}, {loaded.num_classes} classes{weights})")
    print(f"image: {image_path} ({image_size}x{image_size} crop, on {device})")
    for rank, (probability, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>3}. {probability * 100:6.2f}%  {loaded.class_names[index]} ({index})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
