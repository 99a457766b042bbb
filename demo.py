"""Offline inference: the top-k classes of one image, or a CSV of them for a whole folder.

    python demo.py                                     # demo/sample.jpg, the newest checkpoint written
    python demo.py --checkpoint output/model_best.pth.tar --image cat.jpg --topk 3
    python demo.py --checkpoint inception_v3.pth -a inception_v3   # a bare state dict needs -a
    python demo.py --image photos/ --csv predictions.csv          # a folder (or 'photos/*.jpg'), batched
    python demo.py --image photos/ --csv onnx.csv --onnx model.onnx   # the same through onnxruntime

With no checkpoint it takes the newest run's under ./output, <repo>/output and
<repo>/test/output (main.py's and the test/ scripts' defaults) and says which. Reads our
checkpoints (their EMA weights when they have them, unless --no-ema), ModelZoo's and bare
state dicts. Images get validation's preprocessing. With --onnx the exported model computes
and the checkpoint gives the preprocessing and class names. No network access and no
process group. The library part is training/predict.py.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import models
from training import device as devices, progress
from training.atomic import replacing
from training.checkpoint import checkpoint_for_inference
from training.data.embedded import DUMMY_NUM_CLASSES, class_name
from training.data.imagefolder import default_workers
from training.data.transforms import read_eval_image
from training.inference import load_for_inference
from training.options import architecture, non_negative_int, positive_int
from training.predict import OnnxClassifier, Outcome, PredictionError, TorchClassifier, classify_files, \
    find_images, top_k

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE / "demo" / "sample.jpg"
IGNORED_UPSTREAM = ("--device-list", "--dist-backend", "--addr")  # ModelZoo demo options with no use here
DEFAULT_BATCH_SIZE = 32
# The class names of the embedded --dummy data set: a model that knows only these is the quick start's.
DUMMY_CLASS_NAMES = [class_name(index, DUMMY_NUM_CLASSES) for index in range(DUMMY_NUM_CLASSES)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", "--model-path", "--resume", dest="checkpoint", metavar="FILE", default=None,
                        help="checkpoint or state dict (default: the newest one written under output/ or test/output/)")
    parser.add_argument("--image", metavar="FILE|DIR|GLOB", default=str(DEFAULT_IMAGE.relative_to(HERE)),
                        help="image to classify, or a folder (its image files, sub-folders too) or a quoted glob "
                             "pattern of many (default: demo/sample.jpg next to demo.py)")
    parser.add_argument("--csv", metavar="FILE", default=None,
                        help="write one row per image: path, then each top-k class and its probability")
    parser.add_argument("--onnx", metavar="FILE", default=None,
                        help="run this exported model (pthtar2onnx.py) in onnxruntime instead of PyTorch; the "
                             "checkpoint still gives the preprocessing and the class names")
    parser.add_argument("-a", "--arch", type=architecture, default=None,
                        help="architecture (default: the checkpoint's; needed for bare state dicts): "
                             + ", ".join(models.list_models()))
    parser.add_argument("--topk", type=positive_int, default=5, metavar="K",
                        help="how many classes to give (default: 5)")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="crop size (default: the checkpoint's training size, else the model's)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per batch for a folder (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("-j", "--workers", type=non_negative_int, default=None, metavar="N",
                        help="image decoding processes for a folder (default: from the CPU count)")
    parser.add_argument("--device", type=devices.canonical_type, choices=devices.DEVICE_CHOICES, default="auto",
                        help="device; auto (default) picks npu, then cuda, then mps, then cpu (gpu means cuda)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="use the raw weights even when the checkpoint has averaged (EMA) ones")
    for flag in IGNORED_UPSTREAM:
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return parser


def _image_path(text: str) -> str:
    path = Path(text)
    if not path.is_absolute() and not path.exists() and (HERE / path).exists():
        return str(HERE / path)  # the default sample, when demo.py runs from another folder
    return text


def _classifier(args: argparse.Namespace, loaded) -> tuple[TorchClassifier | OnnxClassifier, int]:
    """What computes the classes, and the crop size it takes."""
    if args.onnx:
        classifier = OnnxClassifier(args.onnx, loaded.preprocess)
        # An exported file fixes its input size: read it rather than make the user repeat it.
        image_size = args.image_size or classifier.image_size or loaded.image_size
        classifier.check_fits(image_size, loaded.num_classes)
    else:
        device = devices.bind(devices.select_device(args.device))
        classifier = TorchClassifier(loaded.model, loaded.preprocess, device, devices.capabilities(device.type))
        image_size = args.image_size or loaded.image_size
    if image_size < loaded.spec.min_input_size:
        raise PredictionError(f"--image-size {image_size} is below {loaded.arch}'s minimum input size "
                              f"{loaded.spec.min_input_size}")
    return classifier, image_size


def run(args: argparse.Namespace) -> None:
    for flag in IGNORED_UPSTREAM:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            print(f"warning: {flag} is accepted for ModelZoo command lines but has no effect here", file=sys.stderr)
    checkpoint = checkpoint_for_inference(args.checkpoint, HERE)
    loaded = load_for_inference(checkpoint, args.arch, use_ema=args.use_ema)
    paths, several = find_images(_image_path(args.image))
    classifier, image_size = _classifier(args, loaded)

    epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
    weights = ", EMA weights" if loaded.weights == "ema" else ""
    print(f"checkpoint: {checkpoint} ({loaded.arch}{epoch}, {loaded.num_classes} classes{weights})")
    if several or args.csv:
        _classify_many(args, paths, image_size, loaded, classifier)
    else:
        _classify_one(args, paths[0], image_size, loaded, classifier)
    if loaded.class_names == DUMMY_CLASS_NAMES:
        print(f"note: this model was trained on the generated --dummy data set: it knows only its "
              f"{DUMMY_NUM_CLASSES} synthetic classes (coloured shapes), so it names one of them for any image; "
              f"train on real data (--data DIR) to classify photos")


def _classify_one(args: argparse.Namespace, path: Path, image_size: int, loaded, classifier) -> None:
    pixels = read_eval_image(path, image_size, loaded.preprocess)
    [classes], [probabilities] = top_k(classifier.logits(pixels), args.topk)
    print(f"image: {path} ({image_size}x{image_size} crop, {classifier.description})")
    for rank, (probability, index) in enumerate(zip(probabilities, classes), 1):
        print(f"{rank:>3}. {probability * 100:6.2f}%  {loaded.class_names[index]} ({index})")


def _classify_many(args: argparse.Namespace, paths: list[Path], image_size: int, loaded, classifier) -> None:
    workers = args.workers if args.workers is not None else default_workers()
    print(f"images: {len(paths)} file(s) from {args.image} ({image_size}x{image_size} crop, batches of "
          f"{args.batch_size}, {classifier.description})")

    def unreadable(path: Path, reason: str) -> None:
        print(f"warning: {reason}; skipped", file=sys.stderr)

    outcome = classify_files(classifier, paths, image_size, loaded.preprocess, args.topk, args.batch_size, workers,
                             on_unreadable=unreadable)
    if args.csv:
        try:
            _write_csv(Path(args.csv), outcome, loaded.class_names, args.topk)
        except OSError as error:  # a full disk, a folder without write permission...
            raise PredictionError(f"cannot write {args.csv}: {error.strerror or error}") from None
    else:
        for prediction in outcome.predictions:
            best = ", ".join(f"{loaded.class_names[index]} {probability * 100:.2f}%"
                             for index, probability in zip(prediction.classes, prediction.probabilities))
            print(f"{prediction.path}: {best}")
    skipped = f"; {len(outcome.unreadable)} unreadable file(s) skipped (listed above)" if outcome.unreadable else ""
    written = f", written to {args.csv}" if args.csv else ""
    print(f"classified {len(outcome.predictions)} image(s){written}: {outcome.images_per_second:.1f} images/s"
          f"{skipped}")
    if not outcome.predictions:
        raise PredictionError(f"none of the {len(paths)} file(s) from {args.image} could be read")


def _write_csv(path: Path, outcome: Outcome, class_names: list[str], topk: int) -> None:
    k = min(topk, len(class_names))
    with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", *[f"{column}_{rank}" for rank in range(1, k + 1)
                                   for column in ("class", "probability")]])
        for prediction in outcome.predictions:
            cells = [cell for index, probability in zip(prediction.classes, prediction.probabilities)
                     for cell in (class_names[index], f"{probability:.6f}")]
            writer.writerow([str(prediction.path), *cells])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return progress.tool_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
