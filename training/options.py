"""Command-line options: the parser, its groups, and the checks on their combinations.

Option names follow the ModelZoo scripts (``-a``, ``--data``, ``--data_path``,
``--warm_up_epochs``, ``--loss_scale``, ``--device_list``...) so their command lines run as
written; options that were dead upstream are accepted and ignored with a warning. Recipe
options default to ``None`` and are filled by :mod:`training.config`.

Each option is added with ``resumed=``: whether a resumed run takes it from the checkpoint
(``training.config.RESUMED_OPTIONS`` is derived from it, so no option can be left out of the
resume policy), and with a ``type`` that checks its range, so a value out of range stops at
parse time with one line. ``parse_command_line`` also reports which options the user typed
(``explicit``): on resume those win over the checkpoint's values (see ``training.config``).
"""
from __future__ import annotations

import argparse
import math
import logging
from dataclasses import dataclass
from pathlib import Path

import models
from training.device import CAPABILITIES, DEVICE_ALIASES, DEVICE_CHOICES, canonical_type
from training.optim import OPTIMIZERS
from training.progress import MODES as PROGRESS_MODES
from training.recipes import RECIPES
from training.data.transforms import AUTO_AUGMENT

log = logging.getLogger(__name__)

OPT_LEVELS = ("O0", "O1", "O2", "O3")
PUBLISHED = "published"  # --pretrained without a file: the architecture's published weights
DIST_BACKENDS = tuple(sorted({row.dist_backend for row in CAPABILITIES.values()}))

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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where it tells something: never for flags, never ``None`` (an unset
    option takes the recipe's value or a computed one, which its help text names)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _default_worth_showing(action) and "default" not in text:
            text += f" (default: {_default_text(action.default)})".replace("%", "%%")
        return text


def _default_worth_showing(action: argparse.Action) -> bool:
    return (bool(action.option_strings) and action.nargs != 0 and action.default is not None
            and action.default is not argparse.SUPPRESS)


def _default_text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_default_text(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def checked_number(convert, accepts, requirement: str, name: str):
    """An argparse ``type`` that converts with ``convert`` and rejects values outside a range
    (argparse then ends with one line naming the option, the value and the range)."""
    def parse(text: str):
        value = convert(text)
        if not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = name  # argparse names it in "invalid <name> value"
    return parse


positive_int = checked_number(int, lambda v: v > 0, "a positive integer", "int")
non_negative_int = checked_number(int, lambda v: v >= 0, "an integer >= 0", "int")
non_negative_float = checked_number(float, lambda v: v >= 0, ">= 0", "float")
positive_float = checked_number(float, lambda v: v > 0, "positive", "float")
probability = checked_number(float, lambda v: 0.0 <= v <= 1.0, "between 0 and 1", "float")
fraction = checked_number(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]", "float")
open_fraction = checked_number(float, lambda v: 0.0 < v < 1.0, "in (0, 1)", "float")
below_one = checked_number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "float")
_port = checked_number(int, lambda v: 1 <= v <= 65535, "a TCP port, 1 to 65535", "int")
_seed = checked_number(int, lambda v: 0 <= v < 2**64, "an integer in 0 .. 2^64-1", "int")
_nodes = checked_number(int, lambda v: v >= 1 or v == -1, "positive, or -1 for one node", "int")
_node_rank = checked_number(int, lambda v: v >= -1, ">= 0, or -1 for 0", "int")


def _loss_scale(text: str) -> str:
    if text in ("dynamic", "-1"):  # ModelZoo: "default -1 means dynamic"
        return "dynamic"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'dynamic', got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return text


def folder(text: str) -> str:
    """A folder path: an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a folder (\".\" for the current one)")
    return text


def architecture(text: str) -> str:
    """An argparse ``type``: the registry's name for ``text`` (aliases accepted), or the choices."""
    try:
        return models.resolve_arch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device(text: str) -> str:
    name = canonical_type(text.strip().lower())
    if name not in DEVICE_CHOICES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DEVICE_CHOICES)} (or gpu for cuda), got {text!r}")
    return name


class _Topic:
    """One group of ``-h``, whose every option says whether it defines the training: a resumed run
    takes such an option from its checkpoint unless it is typed again (``training.config``)."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, description: str | None = None):
        self.group = parser.add_argument_group(title, description)

    def add(self, *flags: str, resumed: bool, **kwargs) -> argparse.Action:
        action = self.group.add_argument(*flags, **kwargs)
        action.resumed = resumed
        return action


def resumed_options(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The destinations of ``parser``'s options that a resumed run takes from its checkpoint."""
    return tuple(dict.fromkeys(action.dest for action in parser._actions if getattr(action, "resumed", False)))


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "data")
    topic.add("data_dir", nargs="?", default=None, metavar="DIR", resumed=False,
              help="the data set, as pytorch/examples takes it (same as --data)")
    topic.add("--data", "--data_path", dest="data", metavar="DIR", resumed=False,
              help="ImageFolder root holding train/<class>/* and val/<class>/*")
    topic.add("--dummy", action="store_true", resumed=False,
              help="train on the embedded synthetic JPEG data set (made once in a cache folder), with a quick "
                   "low-resolution recipe")
    topic.add("--synthetic", action="store_true", resumed=False,
              help="random batches already on the device instead of a data set (measures the training step "
                   "alone; 1000 classes unless --num-classes)")
    topic.add("--dummy-dir", metavar="DIR", default=None, resumed=False,
              help="where --dummy keeps its data set (default: $XDG_CACHE_HOME/inception-xception)")
    topic.add("-j", "--workers", type=non_negative_int, default=None, metavar="N", resumed=False,
              help="data loading processes per device; with --multiprocessing-distributed per node, divided "
                   "between its devices as ModelZoo does (default: from the CPU count)")
    topic.add("--image-size", type=positive_int, default=None, metavar="N", resumed=True,
              help="training crop size; validation uses Resize(N/0.875)+CenterCrop(N) (default: the model's "
                   "input size, 299)")
    topic.add("--num-classes", type=positive_int, default=None, metavar="N", resumed=True,
              help="classifier size (default: the number of class folders)")
    topic.add("--strict-data", action="store_true", resumed=False,
              help="stop at the first unreadable image instead of replacing and counting it")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "model")
    topic.add("-a", "--arch", type=architecture, default="inception_v3", metavar="ARCH", resumed=False,
              help="architecture: " + ", ".join(models.list_models()))
    topic.add("--pretrained", nargs="?", const=PUBLISHED, default=None, metavar="FILE", resumed=False,
              help="initial weights: alone, the architecture's published ImageNet weights (torchvision "
                   "inception_v3 IMAGENET1K_V1, timm legacy_xception); with FILE, a local state dict or "
                   "checkpoint (ours or ModelZoo's). Heads are re-initialised when the class count differs")
    topic.add("--aux-loss-weight", type=non_negative_float, default=None, metavar="W", resumed=True,
              help="weight of Inception's auxiliary loss; 0 turns the aux head off (recipe: 0.4)")
    topic.add("--drop-rate", type=below_one, default=None, metavar="P", resumed=True,
              help="dropout before the classifier, in [0, 1) (default: the model's, 0.5 inception_v3, "
                   "0 xception; paper: 0.5 xception)")
    topic.add("--no-channels-last", dest="channels_last", action="store_false", resumed=False,
              help="keep the contiguous NCHW memory format; without it, models and batches are channels-last "
                   "where the device allows it (faster on GPUs and CPUs; NPUs take NCHW only)")
    topic.add("--compile", action="store_true", resumed=False,
              help="torch.compile the model (compile time is reported separately)")


def _add_optimisation_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "optimisation", "Unset values come from the recipe of -a (--recipe).")
    topic.add("--recipe", choices=RECIPES, default="modelzoo", resumed=True,
              help="the ModelZoo scripts' values, or the papers' (RMSProp/SGD, lr 0.045 x 0.94 every 2 epochs, "
                   "averaged weights; every value is printed at start)")
    topic.add("--epochs", type=positive_int, default=None, metavar="N", resumed=True,
              help="total epochs (recipe: 240 inception_v3, 150 xception)")
    topic.add("--start-epoch", type=non_negative_int, default=None, metavar="N", resumed=False,
              help="epoch to start at (default 0, or the resumed checkpoint's; given, it overrides the "
                   "checkpoint's)")
    topic.add("-b", "--batch-size", type=positive_int, default=None, metavar="N", resumed=True,
              help="batch size per device; with --multiprocessing-distributed per node, divided between its "
                   "devices as ModelZoo does (recipe: 256 inception_v3, 128 xception)")
    topic.add("--accum-steps", type=positive_int, default=1, metavar="N", resumed=True,
              help="accumulate the gradients of N batches per optimizer step (the global batch is N times "
                   "larger; the learning rate follows optimizer steps)")
    topic.add("--opt", choices=OPTIMIZERS, default=None, resumed=True,
              help="optimizer, torch's own (recipe: sgd; paper: rmsprop for inception_v3)")
    topic.add("--lr", "--learning-rate", dest="lr", type=non_negative_float, default=None, metavar="LR",
              resumed=True, help="peak learning rate, not rescaled for the world size "
                                 "(recipe: 0.045/1.2 inception_v3, 0.1/0.8 xception on 1/8 devices)")
    topic.add("--momentum", type=below_one, default=None, metavar="M", resumed=True,
              help="SGD and RMSProp momentum, in [0, 1) (recipe: 0.9)")
    topic.add("--nesterov", action="store_true", resumed=True, help="Nesterov momentum")
    topic.add("--opt-eps", type=positive_float, default=None, metavar="EPS", resumed=True,
              help="optimizer epsilon (rmsprop, adamw; default: the recipe's, else torch's)")
    topic.add("--wd", "--weight-decay", dest="weight_decay", type=non_negative_float, default=None, metavar="WD",
              resumed=True, help="weight decay (recipe: 2e-4/1e-4 inception_v3, 1e-4 xception on 1/several "
                                 "devices)")
    topic.add("--no-bn-weight-decay", action="store_true", resumed=True,
              help="no weight decay on BatchNorm parameters and biases")
    topic.add("--label-smoothing", type=below_one, default=None, metavar="E", resumed=True,
              help="label smoothing epsilon, in [0, 1) (recipe: 0.1; 0 for xception on 1 device)")
    topic.add("--warm_up_epochs", "--warmup-epochs", dest="warm_up_epochs", type=non_negative_float,
              default=None, metavar="N", resumed=True,
              help="linear warm-up epochs before the schedule (recipe: 5 for xception on several devices, "
                   "else 0; scaled down with a shorter --epochs)")
    topic.add("--lr-schedule", choices=("cosine", "step"), default=None, resumed=True,
              help="decay after warm-up (recipe: cosine)")
    topic.add("--lr-step-epochs", type=positive_int, default=None, metavar="N", resumed=True,
              help="step schedule: decay every N epochs (recipe: 30)")
    topic.add("--lr-gamma", type=fraction, default=None, metavar="G", resumed=True,
              help="step schedule: decay factor, in (0, 1] (recipe: 0.1)")
    topic.add("--clip-grad", type=non_negative_float, default=None, metavar="NORM", resumed=True,
              help="clip the gradient norm to NORM (0: no clipping; recipe: none; paper: 2 inception_v3)")
    topic.add("--max-steps", type=positive_int, default=None, metavar="N", resumed=True,
              help="stop each training epoch after N steps (performance runs)")
    topic.add("--npu-fused-sgd", action="store_true", resumed=False,
              help="NPU: torch_npu's NpuFusedSGD (one kernel for all parameters, as ModelZoo's apex "
                   "combine_grad)")


def _add_augmentation_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "augmentation", "In the loader workers (--mixup, --cutmix: on the device batch);\n"
                                           "the ModelZoo recipes use these defaults.")
    topic.add("--scale", type=fraction, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"), resumed=True,
              help="RandomResizedCrop area range")
    topic.add("--ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
              resumed=True, help="RandomResizedCrop aspect-ratio range")
    topic.add("--hflip", type=probability, default=0.5, metavar="P", resumed=True,
              help="horizontal flip probability")
    topic.add("--interpolation", choices=("bilinear", "bicubic", "lanczos", "nearest"), default=None,
              resumed=True, help="resize filter (default: the model's, bilinear)")
    topic.add("--crop-pct", type=fraction, default=None, metavar="F", resumed=True,
              help="evaluation centre crop: resize the short side to size / F first (default 0.875: 342 for 299)")
    topic.add("--auto-augment", choices=AUTO_AUGMENT, default=None, resumed=True,
              help="torchvision v2 policy: RandAugment, TrivialAugmentWide, AugMix, AutoAugment(ImageNet) "
                   "(default: none)")
    topic.add("--random-erase", type=probability, default=0.0, metavar="P", resumed=True,
              help="RandomErasing probability (torchvision v2)")
    topic.add("--mixup", type=non_negative_float, default=0.0, metavar="ALPHA", resumed=True,
              help="MixUp with Beta(ALPHA, ALPHA), soft-target loss (0: off)")
    topic.add("--cutmix", type=non_negative_float, default=0.0, metavar="ALPHA", resumed=True,
              help="CutMix (0: off; with --mixup, one of the two per batch)")


def _add_averaging_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "averaging")
    topic.add("--model-ema", dest="model_ema", action="store_true", default=None, resumed=True,
              help="keep an exponential moving average of the weights (BatchNorm buffers included), validated "
                   "every epoch (recipe: off; paper: on)")
    topic.add("--no-model-ema", dest="model_ema", action="store_false", default=None, resumed=True,
              help="no weight averaging, even with --recipe paper")
    topic.add("--model-ema-decay", type=open_fraction, default=None, metavar="D", resumed=True,
              help="EMA decay per optimizer step, in (0, 1) (recipe: 0.9998)")
    topic.add("--model-ema-warmup", action="store_true", resumed=True,
              help="ramp the EMA decay up: min(D, (1 + t) / (10 + t)) after t updates")
    topic.add("--no-ema", dest="eval_ema", action="store_false", resumed=False,
              help="-e: evaluate the raw weights even when the checkpoint holds averaged (EMA) ones")


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "precision")
    topic.add("--amp", action="store_true", resumed=True,
              help="mixed precision: fp16 with loss scaling on NPU/CUDA, bf16 on CPU")
    topic.add("--amp-dtype", choices=("auto", "float16", "bfloat16"), default="auto", resumed=True,
              help="autocast dtype for --amp (auto: the device's)")
    topic.add("--opt-level", choices=OPT_LEVELS, default="O2", resumed=True,
              help="apex-style level: O0 disables --amp; with --apex it goes to amp.initialize")
    topic.add("--loss-scale", "--loss_scale", dest="loss_scale", type=_loss_scale, default=None,
              metavar="S|dynamic", resumed=True,
              help="fp16 loss scale: a fixed number, or 'dynamic' (or -1) (recipe: 1024/128 inception_v3 on "
                   "1/several devices; dynamic/1024 xception)")
    topic.add("--apex", action="store_true", resumed=False,
              help="use apex amp.initialize instead of torch.amp (needs apex installed)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "device")
    topic.add("--device", type=_device, default="auto", metavar="{" + ",".join(DEVICE_CHOICES) + "}",
              resumed=False, help="auto picks npu, then cuda, then mps, then cpu; "
                                  + ", ".join(f"{k} means {v}" for k, v in DEVICE_ALIASES.items()))
    topic.add("--gpu", "--npu", dest="device_id", type=non_negative_int, default=None, metavar="ID",
              resumed=False,
              help="device index for a single-process run (default: the local rank); with "
                   "--multiprocessing-distributed, run only this device's process (ModelZoo's "
                   "one-process-per-device loop)")
    topic.add("--npu-binary-kernels", action="store_true", resumed=False,
              help="NPU: use pre-compiled binary kernels (set_compile_mode(jit_compile=False))")


def _add_distributed_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "distributed", "torchrun sets these through the environment; ModelZoo's\n"
                                          "--multiprocessing-distributed way is kept.")
    topic.add("--dist-backend", choices=DIST_BACKENDS, default=None, resumed=False,
              help="process group backend (default: hccl on NPU, nccl on CUDA, gloo on CPU)")
    topic.add("--dist-timeout", type=positive_int, default=600, metavar="SEC", resumed=False,
              help="a collective that waits longer than this fails the job instead of hanging")
    topic.add("--sync-bn", action="store_true", resumed=False,
              help="synchronise BatchNorm statistics across devices")
    topic.add("--multiprocessing-distributed", action="store_true", resumed=False,
              help="spawn one process per device of this node (--device_list, default: all visible)")
    topic.add("--device_list", "--device-list", dest="device_list", default=None, metavar="IDS", resumed=False,
              help="comma-separated device ids for --multiprocessing-distributed (default: all visible devices "
                   "of the node)")
    topic.add("--world-size", dest="nodes", type=_nodes, default=-1, metavar="NODES", resumed=False,
              help="with --multiprocessing-distributed: number of nodes (-1: one)")
    topic.add("--rank", dest="node_rank", type=_node_rank, default=-1, metavar="NODE", resumed=False,
              help="with --multiprocessing-distributed: this node's rank (-1: 0)")
    topic.add("--dist-url", default=None, metavar="URL", resumed=False,
              help="with --multiprocessing-distributed: rendezvous URL, tcp://HOST:PORT or env://")
    topic.add("--addr", default=None, metavar="HOST", resumed=False,
              help="master address for --multiprocessing-distributed (wins over --dist-url's host, as in "
                   "ModelZoo; default 127.0.0.1)")
    topic.add("--port", type=_port, default=None, resumed=False,
              help="master port for --multiprocessing-distributed (default: --dist-url's, else 29500)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "run")
    topic.add("--output_dir", "--output-dir", dest="output_dir", type=folder, default="output", metavar="DIR",
              resumed=False,
              help="checkpoints, metrics.jsonl, args.json and TensorBoard logs")
    topic.add("--resume", default=None, metavar="FILE|auto", resumed=False,
              help="continue from a checkpoint, at the exact step it was written; 'auto' takes --output_dir's own "
                   "(and starts fresh when it holds no checkpoint file)")
    topic.add("--overwrite", action="store_true", resumed=False,
              help="replace the run already in --output_dir: remove the files main.py writes there "
                   "(a new run into such a folder is refused otherwise)")
    topic.add("--save-every", type=non_negative_float, default=30.0, metavar="MINUTES", resumed=False,
              help="also write checkpoint.pth.tar inside an epoch every MINUTES minutes (0: off)")
    topic.add("--save-every-steps", type=non_negative_int, default=0, metavar="N", resumed=False,
              help="also write checkpoint.pth.tar inside an epoch every N steps (0: off)")
    topic.add("-e", "--evaluate", action="store_true", resumed=False,
              help="validate only (with --resume FILE or --pretrained) and print Acc@1/Acc@5")
    topic.add("-p", "--print-freq", type=positive_int, default=None, metavar="N", resumed=True,
              help="log every N steps (recipe: 10)")
    topic.add("--fps-warmup-steps", type=non_negative_int, default=5, metavar="N", resumed=False,
              help="steps of each epoch left out of the FPS figure")
    topic.add("--seed", type=_seed, default=None, resumed=True,
              help="seed for a reproducible run (default: drawn at start and saved in checkpoints)")
    topic.add("--progress", choices=PROGRESS_MODES, default="auto", resumed=False,
              help="a progress bar (percentage, rate, time left) when stdout is a terminal, else the log lines "
                   "ModelZoo's parsers read; or force one")


def _add_ignored_upstream_options(parser: argparse.ArgumentParser) -> None:
    topic = _Topic(parser, "accepted for ModelZoo command lines, ignored with a warning")
    for dest, flags in IGNORED_UPSTREAM.items():
        if dest in ("prof", "fine_tuning"):
            topic.add(*flags, dest=dest, action="store_true", default=None, help="no effect", resumed=False)
        else:
            topic.add(*flags, dest=dest, default=None, metavar="X", help="no effect", resumed=False)


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
    for add in (_add_data_options, _add_model_options, _add_optimisation_options, _add_augmentation_options,
                _add_averaging_options, _add_precision_options, _add_device_options, _add_distributed_options,
                _add_run_options, _add_ignored_upstream_options):
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
    if args.nodes > 0 and args.node_rank >= args.nodes:
        parser.error(f"--rank (this node) must be in 0..{max(args.nodes, 1) - 1}, got {args.node_rank}")
    for name, (low, high) in (("--scale", args.scale), ("--ratio", args.ratio)):
        if low > high:
            parser.error(f"{name} MIN MAX: MIN must not exceed MAX, got {low:g} {high:g}")
    minimum = models.model_spec(args.arch).min_input_size
    if args.image_size is not None and args.image_size < minimum:
        parser.error(f"--image-size {args.image_size} is below {args.arch}'s minimum input size {minimum}")
