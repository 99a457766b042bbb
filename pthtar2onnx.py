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
makes it.

The check runs demo/sample.jpg (through validation's preprocessing) and random images through
onnxruntime and through PyTorch on the CPU (training.predict, as demo.py does), and passes when
every logit agrees within ``|onnx - torch| <= atol + rtol * |torch|`` (numpy.allclose) and
the top-1 class agrees on every image whose PyTorch top-1 leads by more than that tolerance.
The file is written atomically: a temporary file beside the output, renamed into place only
after the check passed, so a failed check or a full disk leaves an existing file untouched.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import UserError
from training import device as devices, progress
from training.atomic import WriteError, replacing
from training.checkpoint import checkpoint_for_inference
from training.inference import InferenceModel, load_for_inference
from training.data.transforms import read_eval_image
from training.options import architecture, checked_number, non_negative_float, positive_int
from training.predict import OnnxClassifier, TorchClassifier

HERE = Path(__file__).resolve().parent
SAMPLE_IMAGE = HERE / "demo" / "sample.jpg"

INPUT_NAME = "actual_input_1"  # ModelZoo's names: its OM conversion commands use them
OUTPUT_NAME = "output1"
DEFAULT_OPSET = 11
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter does not write older opsets reliably
# The opsets torch's exporters write (torch.onnx._constants in torch 2.14): TorchScript 7 to 20, dynamo to 23.
MIN_OPSET, TORCHSCRIPT_MAX_OPSET, MAX_OPSET = 7, 20, 23
# float32 logits of two runtimes differ by rounding that grows with the activations, so a logit
# near zero can be off by what its large neighbours are off by: up to 1.4e-3 on Inception v3 logits
# of up to 22 (80 px, random images; AMD EPYC). atol 1e-2 leaves a margin for other CPUs' kernels
# and is still far below what a wrong export gives (BatchNorm, padding or weights off: whole units).
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-2
LARGE_LOGITS = 100.0  # beyond this, float32 rounding alone can exceed the default tolerance
CHECK_IMAGES = 2  # demo/sample.jpg and a random image; a batch other than the traced one (1)


_opset = checked_number(int, lambda v: MIN_OPSET <= v <= MAX_OPSET, f"{MIN_OPSET} to {MAX_OPSET}", "int")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pthtar2onnx.py", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, metavar="CHECKPOINT",
                        help="checkpoint or state dict (default: the newest one written under output/ "
                             "or test/output/)")
    parser.add_argument("--checkpoint", "--model-path", dest="checkpoint", default=None, metavar="FILE",
                        help="same as the positional CHECKPOINT")
    parser.add_argument("-a", "--arch", type=architecture, default=None,
                        help="architecture (default: the checkpoint's; needed for bare state dicts)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="ONNX file to write (default: <arch>.onnx next to the checkpoint)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="fixed batch size (default: a dynamic batch axis)")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="input height and width (default: the checkpoint's training size, "
                             "else the model's)")
    parser.add_argument("--opset", type=_opset, default=DEFAULT_OPSET,
                        help=f"ONNX opset version, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET}, as ModelZoo)")
    parser.add_argument("--dynamo", action="store_true",
                        help=f"use the torch.export-based exporter (needs --opset >= {DYNAMO_MIN_OPSET}) "
                             "instead of the TorchScript one")
    parser.add_argument("--rtol", type=non_negative_float, default=DEFAULT_RTOL, metavar="R",
                        help=f"check: relative tolerance on each logit (default: {DEFAULT_RTOL:g})")
    parser.add_argument("--atol", type=non_negative_float, default=DEFAULT_ATOL, metavar="A",
                        help=f"check: absolute tolerance on each logit (default: {DEFAULT_ATOL:g}); a logit passes "
                             "when |onnxruntime - PyTorch| <= atol + rtol x |PyTorch|")
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
    if args.dynamo and args.opset < DYNAMO_MIN_OPSET:
        parser.error(f"--dynamo writes opset {DYNAMO_MIN_OPSET} or newer; got --opset {args.opset}")
    if not args.dynamo and args.opset > TORCHSCRIPT_MAX_OPSET:
        parser.error(f"the TorchScript exporter writes opsets {MIN_OPSET} to {TORCHSCRIPT_MAX_OPSET}; "
                     f"add --dynamo for --opset {args.opset}")
    return args


class ExportError(UserError):
    """An export that cannot be made or does not match PyTorch."""


def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{purpose} needs the {module} package: pip install {module} "
                          f"(pip install -r requirements.txt installs it)")


def export(model: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
           dynamo: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    # torch < 2.5 has only the TorchScript exporter and no `dynamo` argument.
    has_choice = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if dynamo and not has_choice:
        raise ExportError(f"--dynamo needs torch >= 2.5 (this is {torch.__version__})")
    _require("onnx", "the export")
    if dynamo:
        _require("onnxscript", "--dynamo")
    # One file: the dynamo exporter would put the weights in a "<name>.data" file beside it, which
    # the file refers to by its (temporary) name. These models are far below protobuf's 2 GB.
    exporter = ({"dynamo": True, "external_data": False} if dynamo else {"dynamo": False}) if has_choice else {}
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated, but it is the one that writes
        # opset 11 (ModelZoo's; dynamo=True cannot): nothing for the user to act on.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended when dynamo=True")
        torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          **exporter)


@dataclass(frozen=True)
class Comparison:
    """onnxruntime against PyTorch on the check images."""

    images: int
    worst_excess: float  # max of |onnx - torch| / (atol + rtol |torch|): at most 1 passes
    max_difference: float  # max |onnx - torch|
    largest_logit: float  # max |torch|
    top1_disagreements: int  # images whose top-1 differs although PyTorch's top-1 leads by more than the tolerance

    @property
    def passed(self) -> bool:
        return self.worst_excess <= 1.0 and self.top1_disagreements == 0


def compare(expected: torch.Tensor, actual: torch.Tensor, rtol: float, atol: float) -> Comparison:
    """numpy.allclose's rule on every logit, and top-1 agreement where the tolerance cannot explain a swap."""
    if actual.shape != expected.shape:
        raise ExportError(f"onnxruntime returned shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}")
    expected, actual = expected.double(), actual.double()
    difference = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    excess = (difference / allowed).masked_fill(difference == 0, 0.0)  # x / 0 is inf: fails; 0 / 0 passes
    top2 = expected.topk(min(2, expected.shape[1]), dim=1)
    lead = top2.values[:, 0] - top2.values[:, -1]
    decided = lead > 2 * allowed.max(dim=1).values  # a swap needs both logits to move by their tolerance
    disagree = (actual.argmax(dim=1) != top2.indices[:, 0]) & decided
    return Comparison(images=expected.shape[0], worst_excess=float(excess.max()),
                      max_difference=float(difference.max()), largest_logit=float(expected.abs().max()),
                      top1_disagreements=int(disagree.sum()))


def check_pixels(loaded: InferenceModel, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """demo/sample.jpg as validation reads it, then random uint8 images up to ``count``."""
    pixels = [read_eval_image(SAMPLE_IMAGE, size, loaded.preprocess)]
    if count > 1:
        pixels.append(torch.randint(0, 256, (count - 1, 3, size, size), dtype=torch.uint8, generator=generator))
    return torch.cat(pixels)


def verify(loaded: InferenceModel, path: Path, pixels: torch.Tensor, rtol: float, atol: float) -> Comparison:
    """The ONNX checker, then onnxruntime against PyTorch on the CPU, both fed as demo.py feeds them."""
    _require("onnxruntime", "the check (or leave it out: --no-check)")
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the ONNX checker rejects the exported model: {str(error).strip().splitlines()[0]}") \
            from None
    cpu = torch.device("cpu")
    expected = TorchClassifier(loaded.model, loaded.preprocess, cpu, devices.capabilities(cpu.type)).logits(pixels)
    actual = OnnxClassifier(path, loaded.preprocess).logits(pixels)
    return compare(expected, actual, rtol, atol)


def _report(comparison: Comparison, rtol: float, atol: float) -> str:
    images = "demo/sample.jpg" + (f" and {comparison.images - 1} random image(s)" if comparison.images > 1 else "")
    return (f"onnx checker: ok; onnxruntime vs PyTorch on {images}: max abs difference "
            f"{comparison.max_difference:.2e}, {comparison.worst_excess:.3g} of the "
            f"tolerance (atol {atol:g} + rtol {rtol:g} x |logit|; largest |logit| {comparison.largest_logit:.3g}); "
            f"top-1 disagreements {comparison.top1_disagreements}")


def _export_checked(args: argparse.Namespace, loaded: InferenceModel, size: int, output: Path) -> None:
    """Export to a temporary file beside ``output``, check it, and only then rename it into place."""
    dynamic = args.batch_size is None
    generator = torch.Generator().manual_seed(0)
    print(f"exporting {loaded.arch} to ONNX (opset {args.opset}){' and checking it' if args.check else ''}: "
          f"this can take a minute on a CPU", flush=True)
    with replacing(output) as temporary:
        export(loaded.model, torch.randn(args.batch_size or 1, 3, size, size, generator=generator), temporary,
               args.opset, dynamic, args.dynamo)
        if args.check:
            # A different batch than the traced one proves the dynamic axis works.
            pixels = check_pixels(loaded, size, CHECK_IMAGES if dynamic else args.batch_size, generator)
            comparison = verify(loaded, temporary, pixels, args.rtol, args.atol)
            print(_report(comparison, args.rtol, args.atol))
            if not comparison.passed:
                hint = (f"; its logits reach {comparison.largest_logit:.3g}, where float32 rounding alone grows "
                        f"that large (an untrained model, or BatchNorm statistics not settled): a larger --atol "
                        f"accepts it" if comparison.largest_logit > LARGE_LOGITS else "")
                raise ExportError(f"the ONNX model differs from PyTorch beyond the tolerance "
                                  f"({comparison.worst_excess:.3g} x it, {comparison.top1_disagreements} top-1 "
                                  f"disagreements); nothing was written to {output}{hint}")


def run(args: argparse.Namespace) -> None:
    checkpoint = checkpoint_for_inference(args.checkpoint, HERE)
    loaded = load_for_inference(checkpoint, args.arch, use_ema=args.use_ema)
    size = args.image_size or loaded.image_size
    if size < loaded.spec.min_input_size:
        raise ExportError(f"--image-size {size} is below {loaded.arch}'s minimum {loaded.spec.min_input_size}")
    output = Path(args.output) if args.output else checkpoint.parent / f"{loaded.arch}.onnx"
    print(f"checkpoint: {checkpoint}")
    try:
        _export_checked(args, loaded, size, output)
    except WriteError as error:  # a full disk, a folder without write permission...
        raise ExportError(f"{error}; nothing was written to it") from None
    except OSError as error:
        raise ExportError(f"cannot write {output}: {error.strerror or error}; nothing was written to it") from None
    shape = f"{'batch' if args.batch_size is None else args.batch_size} x 3 x {size} x {size}"
    weights = ", EMA weights" if loaded.weights == "ema" else ""
    print(f"wrote {output} ({loaded.arch}, {loaded.num_classes} classes{weights}, input {INPUT_NAME} {shape}, "
          f"opset {args.opset})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return progress.tool_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
