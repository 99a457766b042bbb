"""Training-step benchmark: synthetic batches already on the device, no input pipeline.

For each architecture it builds, in one process:

* ``baseline``: the reference scripts' loop (pytorch/examples ``imagenet/main.py``, the
  ModelZoo ``main.py``): NCHW fp32 model, ``torch.optim.SGD(foreach=False)``, plain
  ``loss.backward(); optimizer.step()``, and ``loss.item()`` + top-1/top-5 accuracy read
  every step, as those scripts log them; torch's default backend flags;
* ``ours`` variants: the model, optimizer, precision, loss and loop that ``main.py``
  builds for the same flags (``ours`` = no flags, ``ours-amp`` = ``--amp``,
  ``ours-nchw`` = ``--no-channels-last``, ``-compile`` adds ``--compile``), through the
  public building steps main.py uses (``training.setup``: ``decide``, ``build_model``,
  ``choose_precision``, ``build_optimization``, ``prepare_for_precision``,
  ``wrap_for_training``; then ``train_one_epoch``), so the benchmark measures the real
  configuration.

After warm-up, rounds alternate between the configurations (the order rotates each round)
and each round times ``--steps`` steps; images/s is the median over rounds. FLOPs per image
come from ``torch.utils.flop_counter`` (one forward + backward), achieved FLOP/s is that
times images/s, and MFU divides it by the best dense matmul rate measured on the device
(fp32, and the autocast dtype when a configuration uses one). ``--profile`` adds where one
step's time goes, by operator category.

    python bench/train_step.py --arch all --image-size 299 --batch-size 8 --steps 2 --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count  # noqa: E402

import models  # noqa: E402
from bench import common  # noqa: E402
from training import device as devices  # noqa: E402
from training.config import resolve_options  # noqa: E402
from training.distributed import Topology  # noqa: E402
from training.engine import EpochPosition, LoopSettings, TrainingLoss, train_one_epoch  # noqa: E402
from training.options import parse_command_line  # noqa: E402
from training.precision import resolve_dtype  # noqa: E402
from training.recipes import recipe_for  # noqa: E402
from training.schedule import LrSchedule  # noqa: E402
from training.setup import (agree_on_seed, build_model, build_optimization, choose_precision, decide,  # noqa: E402
                            prepare_for_precision, wrap_for_training)
from training.data.synthetic import SYNTHETIC_NUM_CLASSES, SyntheticBatches  # noqa: E402

# main.py flags behind each configuration name (any name: "ours" + "-amp", "-nchw", "-compile").
_FLAG_OF_SUFFIX = {"amp": "--amp", "nchw": "--no-channels-last", "compile": "--compile"}
# bf16 autocast on a CPU without native bf16 is >10x slower (docs/PERFORMANCE.md): measure it
# on CPUs with --configs baseline,ours-amp, not by default.
DEFAULT_CONFIGS = {"cpu": "baseline,ours,ours-nchw", "cuda": "baseline,ours,ours-amp"}
FALLBACK_CONFIGS = "baseline,ours,ours-amp"
AUX_WEIGHT = 0.4  # the reference Inception v3 loss: main + 0.4 x auxiliary
SEED = 0


def main_flags(name: str) -> list[str]:
    """``ours-amp-compile`` -> ``["--amp", "--compile"]``."""
    parts = name.split("-")
    if parts[0] != "ours" or any(part not in _FLAG_OF_SUFFIX for part in parts[1:]):
        raise ValueError(f"unknown configuration {name!r}: use baseline, or ours with any of "
                         f"{', '.join('-' + s for s in _FLAG_OF_SUFFIX)} (e.g. ours-amp-compile)")
    return [_FLAG_OF_SUFFIX[part] for part in parts[1:]]


@dataclass
class Config:
    """One way of training; ``run_steps(n)`` trains ``n`` steps (queued, not synchronised)."""

    name: str
    description: str
    compute_dtype: torch.dtype
    run_steps: Callable[[int], None]
    rounds: list[float] = field(default_factory=list)  # seconds per timed round
    warmup_seconds: float = 0.0
    peak_host: int = 0
    peak_device: int | None = None
    backend_flags: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@contextlib.contextmanager
def reference_backend_flags():
    """torch's default backend flags (what the reference scripts run with), restored after.

    main.py turns on cudnn.benchmark and TF32 matmuls (``training.device.bind``); the
    baseline rounds run without them, as the reference scripts do.
    """
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def synthetic(batch_size: int, image_size: int, steps: int, device: torch.device,
              channels_last: bool) -> SyntheticBatches:
    return SyntheticBatches(batch_size=batch_size, image_size=image_size, num_classes=SYNTHETIC_NUM_CLASSES,
                            steps=steps, device=device, channels_last=channels_last, seed=SEED)


def model_options(arch: str) -> dict[str, Any]:
    return {"aux_logits": True} if models.model_spec(arch).aux_head else {}


def build_baseline(arch: str, image_size: int, batch_size: int, device: torch.device, lr: float,
                   weight_decay: float) -> tuple[Config, nn.Module]:
    torch.manual_seed(SEED)
    model = models.create_model(arch, num_classes=SYNTHETIC_NUM_CLASSES, **model_options(arch)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=False)
    criterion = nn.CrossEntropyLoss()
    data = synthetic(batch_size, image_size, 1, device, channels_last=False)
    images, target = data.images, data.labels

    def run_steps(steps: int) -> None:
        model.train()
        for _ in range(steps):
            output = model(images)
            if isinstance(output, tuple):
                output, aux = output
                loss = criterion(output, target) + AUX_WEIGHT * criterion(aux, target)
            else:
                loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # The reference loops log the loss and accuracy of every step (a host sync each).
            top5 = output.topk(5, dim=1).indices.eq(target.unsqueeze(1))
            _ = (loss.item(), top5[:, :1].sum().item(), top5.sum().item())

    config = Config("baseline", "NCHW fp32, SGD(foreach=False), per-step loss.item()/accuracy",
                    torch.float32, run_steps, backend_flags=reference_backend_flags)
    return config, model


def build_ours(name: str, arch: str, image_size: int, batch_size: int, device: torch.device) -> Config:
    """The configuration main.py builds for ``name``'s flags, through main.py's own code."""
    flags = main_flags(name)
    command = parse_command_line(["-a", arch, "--synthetic", "-b", str(batch_size), "--image-size", str(image_size),
                                  "--seed", str(SEED), "--device", device.type, *flags])
    args = resolve_options(command.args, command.explicit, process_count=1).args
    args.seed = agree_on_seed(args.seed)
    caps, topology = devices.capabilities(device.type), Topology()
    decisions = decide(args, caps, topology)
    built = build_model(args, models.model_spec(arch), SYNTHETIC_NUM_CLASSES, device, decisions, topology)
    precision = choose_precision(args, caps)
    optimization = prepare_for_precision(build_optimization(args, built.model, caps, decisions), precision)
    optimizer = optimization.optimizer
    # A schedule long enough that the learning rate stays near its peak while we measure.
    schedule = LrSchedule(args.lr, epochs=1000, warmup_epochs=args.warm_up_epochs, kind=args.lr_schedule)
    trained = wrap_for_training(optimization.model, topology, device, decisions.compile_backend)
    loss_fn = TrainingLoss(args.label_smoothing, args.aux_loss_weight)
    settings = LoopSettings(device=device, seed=args.seed, print_freq=10**9, fps_warmup_steps=0,
                            clip_grad=args.clip_grad, progress="lines", show_progress=False)
    loaders: dict[int, SyntheticBatches] = {}

    def run_steps(steps: int) -> None:
        if steps not in loaders:
            loaders[steps] = synthetic(batch_size, image_size, steps, device, decisions.channels_last)
        train_one_epoch(trained.module, loaders[steps], loss_fn, optimizer, schedule, precision,
                        EpochPosition(epoch=0, steps=steps), settings)

    dtype = resolve_dtype(device.type, args.amp_dtype) if args.amp else torch.float32
    layout = "channels_last" if decisions.channels_last else "NCHW"
    description = (f"main.py {' '.join(flags) or '(defaults)'}: {layout}, {precision.description}, "
                   f"SGD({'fused' if optimizer.defaults.get('fused') else 'foreach'})")
    return Config(name, description, dtype, run_steps)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward's count for each gradient asked for.

    torch 2.14's own formula leaves ``groups`` out of the backward count, which counts a
    depthwise convolution's backward as if it were dense (Xception's separable convolutions
    come out ~10x too large; pytorch/pytorch#183405 touches the same code). grad_input and
    grad_weight each take exactly the multiply-adds of the forward, groups included.
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flops_per_image(model: nn.Module, image_size: int, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by FlopCounterMode
    (matmuls and convolutions; elementwise work is not counted)."""
    batch = 2  # BatchNorm needs more than one sample in training mode; FLOPs are linear in batch
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    target = torch.zeros(batch, dtype=torch.int64, device=device)
    criterion = nn.CrossEntropyLoss()
    model.train()
    corrected = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        output = model(images)
        if isinstance(output, tuple):
            loss = criterion(output[0], target) + AUX_WEIGHT * criterion(output[1], target)
        else:
            loss = criterion(output, target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def measure(configs: list[Config], device: torch.device, steps: int, warmup: int, rounds: int) -> None:
    for config in configs:
        with config.backend_flags():
            config.warmup_seconds = common.timed(lambda: config.run_steps(warmup), device) if warmup else 0.0
    for round_index in range(rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:  # rotate: no config always goes first
            common.reset_device_peak(device)
            with config.backend_flags(), common.MemorySampler() as host:
                config.rounds.append(common.timed(lambda: config.run_steps(steps), device))
            config.peak_host = max(config.peak_host, host.peak)
            peak = devices.peak_memory_bytes(device)
            if peak is not None:
                config.peak_device = max(config.peak_device or 0, peak)


# Where a step's time goes: leaf operators (self time) grouped by what they do.
_CATEGORIES = (
    ("convolution", ("conv",)),
    ("batch norm", ("batch_norm",)),
    ("pooling", ("pool",)),
    ("matmul (fc)", ("addmm", "aten::mm", "linear")),
    ("optimizer (foreach)", ("_foreach",)),
    ("concat / copy", ("cat", "copy_", "clone", "contiguous", "to_copy")),
    ("elementwise", ("relu", "threshold", "add", "mul", "fill", "zero", "clamp", "div", "sub", "lerp", "where")),
    ("loss / softmax", ("softmax", "nll", "cross_entropy", "topk")),
)


def categorise(name: str) -> str:
    for category, needles in _CATEGORIES:
        if any(needle in name for needle in needles):
            return category
    return "other"


def profile_step(config: Config, device: torch.device) -> dict[str, Any]:
    """One step of ``config`` under torch.profiler: self time per category and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with config.backend_flags(), profile(activities=activities) as prof:
        config.run_steps(1)
        devices.synchronize(device)
    use_device = device.type == "cuda"
    events = [e for e in prof.key_averages() if not e.key.startswith(("ProfilerStep", "autograd::", "Optimizer."))]

    def self_time(event) -> float:  # microseconds on the device that bounds the step
        return float(event.self_device_time_total if use_device else event.self_cpu_time_total)

    total = sum(self_time(e) for e in events) or 1.0
    categories: dict[str, float] = {}
    for event in events:
        categories[categorise(event.key)] = categories.get(categorise(event.key), 0.0) + self_time(event)
    top = sorted(events, key=self_time, reverse=True)[:12]
    return {"clock": "device" if use_device else "cpu", "total_ms": total / 1000,
            "categories": {k: v / total for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"name": e.key, "ms": self_time(e) / 1000, "calls": e.count, "share": self_time(e) / total}
                        for e in top]}


def print_profiles(arch: str, profiles: dict[str, dict[str, Any]]) -> None:
    names = list(profiles)
    categories = sorted({c for p in profiles.values() for c in p["categories"]},
                        key=lambda c: -max(p["categories"].get(c, 0.0) for p in profiles.values()))
    rows = [[c, *[f"{100 * profiles[n]['categories'].get(c, 0.0):.1f}%" for n in names]] for c in categories]
    rows.append(["total self time ms", *[f"{profiles[n]['total_ms']:.0f}" for n in names]])
    common.print_table(f"{arch}: where one step's time goes (torch.profiler, self time)", ["category", *names], rows)
    for name in names:
        ops = ", ".join(f"{op['name']} {100 * op['share']:.0f}%" for op in profiles[name]["top_ops"][:6])
        print(f"  {name} top ops: {ops}")


def matmul_peaks(device: torch.device, dtypes: set[torch.dtype], size: int) -> dict[torch.dtype, tuple[float, int]]:
    """{dtype: (measured dense matmul FLOP/s, matrix side used)}."""
    return {dtype: common.matmul_peak(device, dtype, size) for dtype in sorted(dtypes, key=str)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def benchmark_arch(arch: str, names: list[str], args: argparse.Namespace, device: torch.device,
                   peaks: dict[torch.dtype, float]) -> dict[str, Any]:
    """Build every configuration for ``arch``, measure them alternating, return the results."""
    reference = recipe_for(arch)  # the baseline trains with the same learning rate and decay
    configs: list[Config] = []
    baseline_model = None
    for name in names:
        if name == "baseline":
            config, baseline_model = build_baseline(arch, args.image_size, args.batch_size, device, reference.lr,
                                                    reference.weight_decay)
        else:
            config = build_ours(name, arch, args.image_size, args.batch_size, device)
        configs.append(config)
    flop_model = baseline_model or models.create_model(arch, num_classes=SYNTHETIC_NUM_CLASSES,
                                                       **model_options(arch)).to(device)
    flops = flops_per_image(flop_model, args.image_size, device)
    measure(configs, device, args.steps, args.warmup, args.rounds)

    images_per_round = args.steps * args.batch_size
    speeds = {c.name: common.median([images_per_round / s for s in c.rounds]) for c in configs}
    reference_speed = speeds.get("baseline")
    results: dict[str, Any] = {}
    for config in configs:
        speed = speeds[config.name]
        steady = args.batch_size / speed if speed else 0.0
        achieved = flops * speed
        results[config.name] = {
            "description": config.description,
            "images_per_second": speed,
            "images_per_second_rounds": [images_per_round / s for s in config.rounds],
            "step_seconds": steady,
            "ratio_vs_baseline": speed / reference_speed if reference_speed else None,
            "achieved_flops": achieved,
            "compute_dtype": dtype_name(config.compute_dtype),
            # MFU: against the device's best measured matmul rate (any dtype), i.e. the
            # share of what this hardware can do; also against the config's own dtype.
            "mfu": achieved / max(peaks.values()),
            "mfu_own_dtype": achieved / peaks[config.compute_dtype] if config.compute_dtype in peaks else None,
            "warmup_seconds": config.warmup_seconds,
            # With --compile the first steps compile; the rest of the warm-up is ordinary steps.
            "compile_seconds": (max(0.0, config.warmup_seconds - args.warmup * steady)
                                if "compile" in config.name.split("-") else None),
            "peak_host_rss_bytes": config.peak_host,
            "peak_device_bytes": config.peak_device,
        }
    result: dict[str, Any] = {"flops_per_image": flops, "configs": results}
    if args.profile:
        result["profile"] = {config.name: profile_step(config, device) for config in configs}
    return result


def print_results(arch: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    gflop = result["flops_per_image"] / 1e9
    rows = []
    for name, r in result["configs"].items():
        rounds = r["images_per_second_rounds"]
        rows.append([name, f"{r['images_per_second']:.2f}", f"{min(rounds):.2f}-{max(rounds):.2f}",
                     f"{r['step_seconds'] * 1000:.0f}",
                     f"{r['ratio_vs_baseline']:.3f}x" if r["ratio_vs_baseline"] else "-",
                     f"{r['achieved_flops'] / 1e9:.1f}", r["compute_dtype"],
                     f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
                     f"{r['peak_host_rss_bytes'] / common.MIB:.0f}",
                     f"{r['peak_device_bytes'] / common.MIB:.0f}" if r["peak_device_bytes"] else "-",
                     f"{r['compile_seconds']:.1f}" if r["compile_seconds"] is not None else "-"])
    common.print_table(
        f"{arch}  {args.image_size}x{args.image_size}  batch {args.batch_size}  {args.steps} steps x "
        f"{args.rounds} rounds  {gflop:.2f} GFLOP/image (train step)",
        ["config", "img/s", "range", "step ms", "vs base", "GFLOP/s", "dtype", "MFU", "host MiB",
         "dev MiB", "compile s"], rows)
    for name, r in result["configs"].items():
        print(f"  {name}: {r['description']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="all", choices=(*models.list_models(), "all"))
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; images/s is their median")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated: baseline, ours[-amp][-nchw][-compile] "
                             f"(default on cpu: {DEFAULT_CONFIGS['cpu']}; cuda: {DEFAULT_CONFIGS['cuda']})")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the square matmul timed for the peak (default 2048 on cpu, 8192 else)")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, profile one step of each configuration (where the time goes)")
    common.add_common_options(parser)
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = common.resolve_device(args.device)
    names = [n.strip() for n in (args.configs or DEFAULT_CONFIGS.get(device.type, FALLBACK_CONFIGS)).split(",")
             if n.strip()]
    for name in names:
        if name != "baseline":
            main_flags(name)  # reject unknown names before any work
    archs = models.list_models() if args.arch == "all" else [args.arch]
    load = common.wait_for_quiet(args.max_load, args.max_wait)
    env = common.environment(device)
    matmul_size = args.matmul_size or (2048 if device.type == "cpu" else 8192)
    dtypes = {torch.float32} | {resolve_dtype(device.type, "auto") for n in names if "amp" in n.split("-")}
    measured = matmul_peaks(device, dtypes, matmul_size)
    peaks = {dtype: rate for dtype, (rate, _) in measured.items()}
    print(f"device {env.get('device')}  cpu {env['host_cpu']} ({env['cpus']} cpus, {env['torch_threads']} "
          f"torch threads)  torch {torch.__version__}  load {load}")
    print("dense matmul peak: " + ", ".join(f"{dtype_name(d)} {rate / 1e9:,.1f} GFLOP/s ({side}^3)"
                                            for d, (rate, side) in measured.items()) +
          "; MFU is against the best of these")
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for arch in archs:
        results[arch] = benchmark_arch(arch, names, args, device, peaks)
        print_results(arch, results[arch], args)
        if args.profile:
            print_profiles(arch, results[arch]["profile"])
    env["load_average_at_end"] = common.load_average()
    payload = {"benchmark": "train_step", "env": env, "settings": {
        "archs": archs, "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "configs": names, "matmul_size": matmul_size},
        "matmul_peak_flops": {dtype_name(d): p for d, p in peaks.items()},
        "matmul_peak_size": {dtype_name(d): side for d, (_, side) in measured.items()},
        "archs": results, "process_peak_rss_bytes": common.process_peak_rss(),
        "seconds": time.perf_counter() - started}
    return common.finish(args.json, payload, env["load_average_at_end"])


if __name__ == "__main__":
    sys.exit(main())
