"""Convert a checkpoint to ONNX and check the result against PyTorch with onnxruntime.

    python pthtar2onnx.py                                  # the newest checkpoint written
    python pthtar2onnx.py output/model_best.pth.tar --output inception_v3.onnx
    python pthtar2onnx.py xception.pth -a xception --batch-size 1 --opset 13

Reads what demo.py reads, through the same loader (training.inference): our checkpoints (their
EMA weights when they have them, unless --no-ema), ModelZoo's, bare state dicts with -a.
With no checkpoint it takes the newest run's under ./output, <repo>/output and
<repo>/test/output, and says which. The graph is the eval-mode model (Inception's aux head
left out) with ModelZoo's tensor names, ``actual_input_1`` -> ``output1``, and a dynamic
batch axis unless --batch-size is given. Its input is the normalised image, as validation
makes it; the check runs demo/sample.jpg through that preprocessing and random images.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import models
from models.errors import UserError
from training.checkpoint import checkpoint_for_inference
from training.data.transforms import read_eval_image
from training.inference import InferenceModel, load_for_inference

HERE = Path(__file__).resolve().parent
SAMPLE_IMAGE = HERE / "demo" / "sample.jpg"

INPUT_NAME = "actual_input_1"  # ModelZoo's names: its OM conversion commands use them
OUTPUT_NAME = "output1"
DEFAULT_OPSET = 11
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter does not write older opsets reliably


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, metavar="CHECKPOINT",
                        help="checkpoint or state dict (default: the newest one written under output/ "
                             "or test/output/)")
    parser.add_argument("--checkpoint", "--model-path", dest="checkpoint", default=None, metavar="FILE",
                        help="same as the positional CHECKPOINT")
    parser.add_argument("-a", "--arch", default=None,
                        help="architecture (default: the checkpoint's; needed for bare state dicts)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="ONNX file to write (default: <arch>.onnx next to the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="fixed batch size (default: a dynamic batch axis)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="input height and width (default: the checkpoint's training size, "
                             "else the model's)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset version (default: {DEFAULT_OPSET}, as ModelZoo)")
    parser.add_argument("--dynamo", action="store_true",
                        help=f"use the torch.export-based exporter (needs --opset >= {DYNAMO_MIN_OPSET}) "
                             "instead of the TorchScript one")
    parser.add_argument("--tolerance", type=float, default=1e-3, metavar="T",
                        help="largest accepted |onnxruntime - PyTorch| on the logits, "
                             "times the largest |logit| when that is above 1 (default: 1e-3)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnx checker and the onnxruntime comparison")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="export the raw weights even when the checkpoint has averaged (EMA) ones")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.path and args.checkpoint and args.path != args.checkpoint:
        parser.error("give the checkpoint once: positionally or with --checkpoint")
    args.checkpoint = args.checkpoint or args.path
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.dynamo and args.opset < DYNAMO_MIN_OPSET:
        parser.error(f"--dynamo writes opset {DYNAMO_MIN_OPSET} or newer; got --opset {args.opset}")
    return args


class ExportError(UserError):
    """An export that cannot be made or does not match PyTorch."""


def export(model: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
           dynamo: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    # torch < 2.5 has only the TorchScript exporter and no `dynamo` argument.
    has_choice = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if dynamo and not has_choice:
        raise ExportError(f"--dynamo needs torch >= 2.5 (this is {torch.__version__})")
    exporter = {"dynamo": dynamo} if has_choice else {}
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated, but it is the one that writes
        # opset 11 (ModelZoo's; dynamo=True cannot): nothing for the user to act on.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended when dynamo=True")
        torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          **exporter)


def verify(model: torch.nn.Module, path: Path, batch: torch.Tensor) -> tuple[float, float]:
    """Check the file with the ONNX checker; return max |onnxruntime - PyTorch| on ``batch``
    and the largest |logit| PyTorch gave."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    with torch.inference_mode():
        expected = model(batch).numpy()
    if actual.shape != expected.shape:
        raise ExportError(f"onnxruntime returned shape {actual.shape}, PyTorch {expected.shape}")
    return float(np.abs(actual - expected).max()), float(np.abs(expected).max())


def check_batch(loaded: InferenceModel, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """demo/sample.jpg preprocessed as validation does, then random images up to ``count``."""
    normalize = models.Normalizer(loaded.preprocess.mean, loaded.preprocess.std)
    pixels = [read_eval_image(SAMPLE_IMAGE, size, loaded.preprocess)]
    if count > 1:
        pixels.append(torch.randint(0, 256, (count - 1, 3, size, size), dtype=torch.uint8, generator=generator))
    return normalize(torch.cat(pixels)).contiguous()


def run(args: argparse.Namespace) -> int:
    checkpoint = checkpoint_for_inference(args.checkpoint, HERE)
    loaded = load_for_inference(checkpoint, args.arch, use_ema=args.use_ema)
    size = args.image_size or loaded.image_size
    if size < loaded.spec.min_input_size:
        raise ExportError(f"--image-size {size} is below {loaded.arch}'s minimum {loaded.spec.min_input_size}")
    output = Path(args.output) if args.output else checkpoint.parent / f"{loaded.arch}.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)

    dynamic = args.batch_size is None
    generator = torch.Generator().manual_seed(0)
    export(loaded.model, torch.randn(args.batch_size or 1, 3, size, size, generator=generator), output,
           args.opset, dynamic, args.dynamo)
    shape = f"{'batch' if dynamic else args.batch_size} x 3 x {size} x {size}"
    weights = ", EMA weights" if loaded.weights == "ema" else ""
    print(f"checkpoint: {checkpoint}")
    print(f"wrote {output} ({loaded.arch}, {loaded.num_classes} classes{weights}, input {INPUT_NAME} {shape}, "
          f"opset {args.opset})")
    if not args.check:
        return 0

    # A different batch than the traced one proves the dynamic axis works.
    batch = check_batch(loaded, size, 2 if dynamic else args.batch_size, generator)
    difference, largest = verify(loaded.model, output, batch)
    # float32 rounding grows with the values: logits of an untrained model can be huge, and
    # only a relative difference says anything about them.
    allowed = args.tolerance * max(1.0, largest)
    print(f"onnx checker: ok; onnxruntime vs PyTorch on a batch of {batch.shape[0]} (demo/sample.jpg and random "
          f"images): max abs difference {difference:.2e} (allowed {allowed:.1e}; largest |logit| {largest:.3g})")
    if not difference <= allowed:
        print(f"error: the ONNX model differs from PyTorch by {difference:.2e} > {allowed:.1e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
