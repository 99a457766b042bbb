"""Command-line options: the parser, its groups, and the checks on their combinations.

Option names follow the ModelZoo scripts (``-a``, ``--data``, ``--data_path``,
``--warm_up_epochs``, ``--loss_scale``, ``--device_list``...) so their command lines run as
written; options that were dead upstream are accepted and ignored with a warning. Recipe
options default to ``None`` and are filled by :mod:`training.config`.

``parse_command_line`` also reports which options the user typed (``explicit``): on resume
those win over the checkpoint's values (see ``training.config``).
"""
from __future__ import annotations

import argparse
import math
import logging
from dataclasses import dataclass
from pathlib import Path

import models
from training.device import DEVICE_ALIASES, DEVICE_CHOICES, canonical_type
from training.optim import OPTIMIZERS
from training.recipes import RECIPES
from training.data.transforms import AUTO_AUGMENT

log = logging.getLogger(__name__)

OPT_LEVELS = ("O0", "O1", "O2", "O3")
PUBLISHED = "published"  # --pretrained without a file: the architecture's published weights

# ModelZoo options that did nothing (or broke the run) upstream: accepted, ignored, named in a warning.
IGNORED_UPSTREAM = {
    "benchmark": ("-bm", "--benchmark"),
    "prof": ("--prof",),
    "fine_tuning": ("-t", "--fine-tuning"),
    "workspace": ("--workspace",),
    "eval_freq": ("-ef", "--eval-freq"),
    "checkpoint_nameprefix": ("--checkpoint-nameprefix",),
    "checkpoint_freq": ("--checkpoint-freq",),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _checked_number(convert, accepts, requirement: str, name: str):
    """An argparse ``type`` that converts with ``convert`` and rejects values outside a range."""
    def parse(text: str):
        value = convert(text)
        if not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = name  # argparse names it in "invalid <name> value"
    return parse


_positive_int = _checked_number(int, lambda v: v > 0, "a positive integer", "int")
_non_negative_float = _checked_number(float, lambda v: v >= 0, ">= 0", "float")
_probability = _checked_number(float, lambda v: 0.0 <= v <= 1.0, "between 0 and 1", "float")
_fraction = _checked_number(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]", "float")
_positive_float = _checked_number(float, lambda v: v > 0, "positive", "float")
_open_fraction = _checked_number(float, lambda v: 0.0 < v < 1.0, "in (0, 1)", "float")


def _loss_scale(text: str) -> str:
    if text in ("dynamic", "-1"):  # ModelZoo: "default -1 means dynamic"
        return "dynamic"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'dynamic', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return text


def _arch(text: str) -> str:
    try:
        return models.resolve_arch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device(text: str) -> str:
    name = canonical_type(text.strip().lower())
    if name not in DEVICE_CHOICES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DEVICE_CHOICES)} (or gpu for cuda), got {text!r}")
    return name


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("data_dir", nargs="?", default=None, metavar="DIR",
                       help="the data set, as pytorch/examples takes it (same as --data)")
    group.add_argument("--data", "--data_path", dest="data", metavar="DIR",
                       help="ImageFolder root holding train/<class>/* and val/<class>/*")
    group.add_argument("--dummy", action="store_true",
                       help="train on the embedded synthetic JPEG data set (made once in a cache "
                            "folder), with a quick low-resolution recipe")
    group.add_argument("--synthetic", action="store_true",
                       help="random batches already on the device instead of a data set (measures the "
                            "training step alone; 1000 classes unless --num-classes)")
    group.add_argument("--dummy-dir", metavar="DIR", default=None,
                       help="where --dummy keeps its data set (default: $XDG_CACHE_HOME/inception-xception)")
    group.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                       help="data loading processes per device; with --multiprocessing-distributed per node, "
                            "divided between its devices as ModelZoo does (default: from the CPU count)")
    group.add_argument("--image-size", type=_positive_int, default=None, metavar="N",
                       help="training crop size; validation uses Resize(N/0.875)+CenterCrop(N) "
                            "(default: the model's input size, 299)")
    group.add_argument("--num-classes", type=_positive_int, default=None, metavar="N",
                       help="classifier size (default: the number of class folders)")
    group.add_argument("--strict-data", action="store_true",
                       help="stop at the first unreadable image instead of replacing and counting it")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("-a", "--arch", type=_arch, default="inception_v3", metavar="ARCH",
                       help="architecture: " + ", ".join(models.list_models()))
    group.add_argument("--pretrained", nargs="?", const=PUBLISHED, default=None, metavar="FILE",
                       help="initial weights: alone, the architecture's published ImageNet weights "
                            "(torchvision inception_v3 IMAGENET1K_V1, timm legacy_xception); with FILE, a local "
                            "state dict or checkpoint (ours or ModelZoo's). Heads are re-initialised when "
                            "the class count differs")
    group.add_argument("--aux-loss-weight", type=_non_negative_float, default=None, metavar="W",
                       help="weight of Inception's auxiliary loss; 0 turns the aux head off (recipe: 0.4)")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="keep NCHW memory format (channels_last is faster on GPUs and CPUs; NPUs "
                            "accept NCHW only, so there it is always off)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (compile time is reported separately)")


def _add_optimisation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation (unset values come from the recipe of -a)")
    group.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                       help="total epochs (recipe: 240 inception_v3, 150 xception)")
    group.add_argument("--start-epoch", type=int, default=None, metavar="N",
                       help="epoch to start at (default 0, or the resumed checkpoint's; given, it "
                            "overrides the checkpoint's)")
    group.add_argument("-b", "--batch-size", type=_positive_int, default=None, metavar="N",
                       help="batch size per device; with --multiprocessing-distributed per node, divided "
                            "between its devices as ModelZoo does (recipe: 256 inception_v3, 128 xception)")
    group.add_argument("--lr", "--learning-rate", dest="lr", type=_non_negative_float, default=None,
                       metavar="LR", help="peak learning rate, not rescaled for the world size "
                                          "(recipe: 0.045/1.2 inception_v3, 0.1/0.8 xception on 1/8 devices)")
    group.add_argument("--momentum", type=_non_negative_float, default=None, metavar="M",
                       help="SGD momentum (recipe: 0.9)")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=_non_negative_float,
                       default=None, metavar="WD",
                       help="weight decay (recipe: 2e-4/1e-4 inception_v3, 1e-4 xception on 1/several devices)")
    group.add_argument("--no-bn-weight-decay", action="store_true",
                       help="no weight decay on BatchNorm parameters and biases")
    group.add_argument("--label-smoothing", type=_non_negative_float, default=None, metavar="E",
                       help="label smoothing epsilon, 0 allowed (recipe: 0.1; 0 for xception on 1 device)")
    group.add_argument("--warm_up_epochs", "--warmup-epochs", dest="warm_up_epochs",
                       type=_non_negative_float, default=None, metavar="N",
                       help="linear warm-up epochs before the schedule (recipe: 5 for xception on several "
                            "devices, else 0; scaled down with a shorter --epochs)")
    group.add_argument("--lr-schedule", choices=("cosine", "step"), default=None,
                       help="decay after warm-up (recipe: cosine)")
    group.add_argument("--lr-step-epochs", type=_positive_int, default=None, metavar="N",
                       help="step schedule: decay every N epochs (default 30)")
    group.add_argument("--lr-gamma", type=_non_negative_float, default=None, metavar="G",
                       help="step schedule: decay factor (default 0.1)")
    group.add_argument("--clip-grad", type=_non_negative_float, default=None, metavar="NORM",
                       help="clip the gradient norm to NORM")
    group.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                       help="stop each training epoch after N steps (performance runs)")
    group.add_argument("--npu-fused-sgd", action="store_true",
                       help="NPU: torch_npu's NpuFusedSGD (one kernel for all parameters, as ModelZoo's "
                            "apex combine_grad)")


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    group.add_argument("--amp", action="store_true",
                       help="mixed precision: fp16 with loss scaling on NPU/CUDA, bf16 on CPU")
    group.add_argument("--amp-dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                       help="autocast dtype for --amp")
    group.add_argument("--opt-level", choices=OPT_LEVELS, default="O2",
                       help="apex-style level: O0 disables --amp; with --apex it goes to amp.initialize")
    group.add_argument("--loss-scale", "--loss_scale", dest="loss_scale", type=_loss_scale, default=None,
                       metavar="S|dynamic",
                       help="fp16 loss scale: a fixed number, or 'dynamic' (or -1) (recipe: 1024/128 "
                            "inception_v3 on 1/several devices; dynamic/1024 xception)")
    group.add_argument("--apex", action="store_true",
                       help="use apex amp.initialize instead of torch.amp (needs apex installed)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--device", type=_device, default="auto", metavar="{" + ",".join(DEVICE_CHOICES) + "}",
                       help="auto picks npu, then cuda, then mps, then cpu; "
                            + ", ".join(f"{k} means {v}" for k, v in DEVICE_ALIASES.items()))
    group.add_argument("--gpu", "--npu", dest="device_id", type=int, default=None, metavar="ID",
                       help="device index for a single-process run (default: the local rank); with "
                            "--multiprocessing-distributed, run only this device's process (ModelZoo's "
                            "one-process-per-device loop)")
    group.add_argument("--npu-binary-kernels", action="store_true",
                       help="NPU: use pre-compiled binary kernels (set_compile_mode(jit_compile=False))")


def _add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "distributed (torchrun sets these through the environment; the ModelZoo "
        "--multiprocessing-distributed way is kept)")
    group.add_argument("--dist-backend", default=None,
                       help="process group backend (default: hccl on NPU, nccl on CUDA, gloo on CPU)")
    group.add_argument("--dist-timeout", type=_positive_int, default=600, metavar="SEC",
                       help="a collective that waits longer than this fails the job instead of hanging")
    group.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across devices")
    group.add_argument("--multiprocessing-distributed", action="store_true",
                       help="spawn one process per device of this node (--device_list, default: all visible)")
    group.add_argument("--device_list", "--device-list", dest="device_list", default=None, metavar="IDS",
                       help="comma-separated device ids for --multiprocessing-distributed (default: all "
                            "visible devices of the node)")
    group.add_argument("--world-size", dest="nodes", type=int, default=-1, metavar="NODES",
                       help="with --multiprocessing-distributed: number of nodes (-1: one)")
    group.add_argument("--rank", dest="node_rank", type=int, default=-1, metavar="NODE",
                       help="with --multiprocessing-distributed: this node's rank (-1: 0)")
    group.add_argument("--dist-url", default=None, metavar="URL",
                       help="with --multiprocessing-distributed: rendezvous URL, tcp://HOST:PORT or env://")
    group.add_argument("--addr", default=None,
                       help="master address for --multiprocessing-distributed (wins over --dist-url's "
                            "host, as in ModelZoo; default 127.0.0.1)")
    group.add_argument("--port", type=int, default=None,
                       help="master port for --multiprocessing-distributed (default: --dist-url's, else 29500)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", "--output-dir", dest="output_dir", default="output", metavar="DIR",
                       help="checkpoints, metrics.jsonl, args.json and TensorBoard logs")
    group.add_argument("--resume", default=None, metavar="FILE|auto",
                       help="continue from a checkpoint, at the exact step it was written; 'auto' takes "
                            "--output_dir's own (and starts fresh when it holds no checkpoint file)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output_dir: remove the files main.py writes there "
                            "(a new run into such a folder is refused otherwise)")
    group.add_argument("--save-every", type=_non_negative_float, default=30.0, metavar="MINUTES",
                       help="also write checkpoint.pth.tar inside an epoch every MINUTES minutes (0: off)")
    group.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                       help="also write checkpoint.pth.tar inside an epoch every N steps (0: off)")
    group.add_argument("-e", "--evaluate", action="store_true",
                       help="validate only (with --resume FILE or --pretrained) and print Acc@1/Acc@5")
    group.add_argument("-p", "--print-freq", type=_positive_int, default=None, metavar="N",
                       help="log every N steps (recipe: 10)")
    group.add_argument("--fps-warmup-steps", type=int, default=5, metavar="N",
                       help="steps of each epoch left out of the FPS figure")
    group.add_argument("--seed", type=int, default=None,
                       help="seed for a reproducible run (default: drawn at start and saved in checkpoints)")
    group.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                       help="progress bar on a terminal, plain log lines otherwise")


def _add_improvement_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "recipe, optimizer, averaging and augmentation (ours: the ModelZoo recipes leave them at these defaults)")
    group.add_argument("--recipe", choices=RECIPES, default="modelzoo",
                       help="the ModelZoo scripts' values, or the papers' (RMSProp/SGD, lr 0.045 x 0.94 every 2 "
                            "epochs, averaged weights; every value is printed at start)")
    group.add_argument("--opt", choices=OPTIMIZERS, default=None,
                       help="optimizer, torch's own (recipe: sgd; paper: rmsprop for inception_v3)")
    group.add_argument("--opt-eps", type=_positive_float, default=None, metavar="EPS",
                       help="optimizer epsilon (rmsprop, adamw; default: the recipe's, else torch's)")
    group.add_argument("--model-ema", dest="model_ema", action="store_true", default=None,
                       help="keep an exponential moving average of the weights (BatchNorm buffers included), "
                            "validated every epoch (recipe: off; paper: on)")
    group.add_argument("--no-model-ema", dest="model_ema", action="store_false", default=None,
                       help="no weight averaging, even with --recipe paper")
    group.add_argument("--model-ema-decay", type=_open_fraction, default=None, metavar="D",
                       help="EMA decay per optimizer step (default 0.9998)")
    group.add_argument("--model-ema-warmup", action="store_true",
                       help="ramp the EMA decay up: min(D, (1 + t) / (10 + t)) after t updates")
    group.add_argument("--no-ema", dest="eval_ema", action="store_false",
                       help="-e: evaluate the raw weights even when the checkpoint holds averaged (EMA) ones")
    group.add_argument("--accum-steps", type=_positive_int, default=1, metavar="N",
                       help="accumulate the gradients of N batches per optimizer step (the global batch is "
                            "N times larger; the learning rate follows optimizer steps)")
    group.add_argument("--drop-rate", type=_probability, default=None, metavar="P",
                       help="dropout before the classifier (default: the model's, 0.5 inception_v3, 0 xception; "
                            "paper: 0.5 xception)")
    group.add_argument("--scale", type=_fraction, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                       help="RandomResizedCrop area range")
    group.add_argument("--ratio", type=_positive_float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
                       help="RandomResizedCrop aspect-ratio range")
    group.add_argument("--hflip", type=_probability, default=0.5, metavar="P", help="horizontal flip probability")
    group.add_argument("--interpolation", choices=("bilinear", "bicubic", "lanczos", "nearest"), default=None,
                       help="resize filter (default: the model's, bilinear)")
    group.add_argument("--crop-pct", type=_fraction, default=None, metavar="F",
                       help="evaluation centre crop: resize the short side to size / F first "
                            "(default 0.875: 342 for 299)")
    group.add_argument("--auto-augment", choices=AUTO_AUGMENT, default=None,
                       help="torchvision v2 policy in the loader workers: RandAugment, TrivialAugmentWide, AugMix, "
                            "AutoAugment(ImageNet)")
    group.add_argument("--random-erase", type=_probability, default=0.0, metavar="P",
                       help="RandomErasing probability (torchvision v2, in the workers)")
    group.add_argument("--mixup", type=_non_negative_float, default=0.0, metavar="ALPHA",
                       help="MixUp on the device batch with Beta(ALPHA, ALPHA) (0: off; soft-target loss)")
    group.add_argument("--cutmix", type=_non_negative_float, default=0.0, metavar="ALPHA",
                       help="CutMix on the device batch (0: off; with --mixup, one of the two per batch)")


def _add_ignored_upstream_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for ModelZoo command lines, ignored with a warning")
    for dest, flags in IGNORED_UPSTREAM.items():
        if dest in ("prof", "fine_tuning"):
            group.add_argument(*flags, dest=dest, action="store_true", default=None, help="no effect")
        else:
            group.add_argument(*flags, dest=dest, default=None, metavar="X", help="no effect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", formatter_class=_Formatter,
        description="Train or evaluate Inception v3 / Xception on an ImageFolder data set "
                    "(Ascend NPU, NVIDIA GPU, Apple MPS or CPU, picked automatically).",
        epilog="examples:\n"
               "  python main.py -a xception --dummy --epochs 2\n"
               "  python main.py -a inception_v3 --data /data/imagenet --amp\n"
               "  torchrun --nproc_per_node 8 main.py -a inception_v3 --data /data/imagenet --amp\n"
               "  python main.py -a inception_v3 --data /data/imagenet -e --resume output/model_best.pth.tar")
    for add in (_add_data_options, _add_model_options, _add_optimisation_options, _add_precision_options,
                _add_device_options, _add_distributed_options, _add_run_options, _add_improvement_options,
                _add_ignored_upstream_options):
        add(parser)
    return parser


@dataclass(frozen=True)
class CommandLine:
    """Parsed options and the destinations the user set explicitly."""

    args: argparse.Namespace
    explicit: frozenset[str]


def explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """The option destinations present on the command line (whatever their value)."""
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def parse_command_line(argv: list[str] | None = None) -> CommandLine:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    explicit = explicit_options(build_parser(), argv)
    if "data_dir" in explicit:
        explicit = explicit | {"data"}
    return CommandLine(args, explicit)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_command_line(argv).args


def warn_ignored_options(args: argparse.Namespace) -> None:
    """One warning line per ignored ModelZoo option the user gave."""
    for dest, flags in IGNORED_UPSTREAM.items():
        if getattr(args, dest, None) is not None:
            log.warning("warning: %s is accepted for ModelZoo command lines but has no effect here; ignored",
                        "/".join(flags))


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.pretrained not in (None, PUBLISHED) and args.data_dir is None and Path(args.pretrained).is_dir():
        # pytorch/examples: `main.py --pretrained /data/imagenet` is the bare flag, then the data set.
        args.data_dir, args.pretrained = args.pretrained, PUBLISHED
    if args.data_dir is not None:
        if args.data is not None and args.data != args.data_dir:
            parser.error(f"two data sets given: {args.data_dir} and --data {args.data}")
        args.data = args.data_dir
    sources = [name for name, given in (("--data", args.data is not None), ("--dummy", args.dummy),
                                        ("--synthetic", args.synthetic)) if given]
    if not sources:
        parser.error("give the data set with --data DIR (train/ and val/ inside), or --dummy")
    if len(sources) > 1:
        parser.error(f"{' and '.join(sources)} exclude each other")
    if args.evaluate and not (args.resume or args.pretrained):
        parser.error("--evaluate needs weights: --resume FILE or --pretrained [FILE]")
    if args.evaluate and args.resume == "auto":
        parser.error("--evaluate needs an explicit --resume FILE, not 'auto'")
    if args.overwrite and (args.evaluate or args.resume == "auto"):
        parser.error(f"--overwrite replaces a run; it does not go with {'-e' if args.evaluate else '--resume auto'}")
    if args.device_list is not None:
        try:
            args.device_list = [int(part) for part in args.device_list.split(",") if part.strip()]
        except ValueError:
            parser.error(f"--device_list must be comma-separated integers, got {args.device_list!r}")
        if not args.device_list:
            parser.error("--device_list is empty")
    for name, value in (("--workers", args.workers), ("--fps-warmup-steps", args.fps_warmup_steps),
                        ("--save-every-steps", args.save_every_steps)):
        if value is not None and value < 0:
            parser.error(f"{name} must be >= 0, got {value}")
    if args.nodes == 0 or args.nodes < -1:
        parser.error(f"--world-size (nodes) must be positive, or -1 for one node; got {args.nodes}")
    if args.node_rank < -1 or (args.nodes > 0 and args.node_rank >= args.nodes):
        parser.error(f"--rank (this node) must be in 0..{max(args.nodes, 1) - 1}, got {args.node_rank}")
    for name, (low, high) in (("--scale", args.scale), ("--ratio", args.ratio)):
        if low > high:
            parser.error(f"{name} MIN MAX: MIN must not exceed MAX, got {low:g} {high:g}")
    minimum = models.model_spec(args.arch).min_input_size
    if args.image_size is not None and args.image_size < minimum:
        parser.error(f"--image-size {args.image_size} is below {args.arch}'s minimum input size {minimum}")
