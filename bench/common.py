"""Shared helpers of the benchmarks: environment facts, timing, memory, matmul peak, output.

Every benchmark prints a table for people and, with ``--json PATH``, writes the same
numbers (plus the environment they were measured in) for scripts and docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports the project
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

from training import device as devices  # noqa: E402

GIB = 1024 ** 3
MIB = 1024 ** 2


# --- environment -------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on: hardware, software versions, load."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "PIL", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    env: dict[str, Any] = {
        "host_cpu": cpu_model(), "cpus": usable_cpus(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1), "versions": versions,
        "load_average_at_start": load_average(),
    }
    if device is not None:
        env["device"] = devices.describe(device)
        if device.type == "cuda":
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
    return env


def wait_for_quiet(max_load: float | None, timeout_s: float, poll_s: float = 30.0) -> list[float] | None:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``timeout_s``).

    Other processes on the machine slow every number down; waiting for a quiet moment is
    cheaper than explaining noisy results. Returns the load average when it gave up or
    succeeded (None where the OS has none).
    """
    load = load_average()
    if max_load is None or load is None:
        return load
    deadline = time.monotonic() + timeout_s
    while load[0] >= max_load and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: 1-min load {load[0]:.2f} >= {max_load}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        load = load_average()
    if load[0] >= max_load:
        print(f"warning: measuring under load {load[0]:.2f} (gave up waiting after {timeout_s:.0f}s)",
              file=sys.stderr, flush=True)
    return load


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON here")
    parser.add_argument("--max-load", type=float, default=None, metavar="L",
                        help="before measuring, wait until the 1-minute load average is below L")
    parser.add_argument("--max-wait", type=float, default=600.0, metavar="SEC",
                        help="give up waiting for --max-load after this long (then measure anyway)")


def resolve_device(name: str) -> torch.device:
    """The device main.py would use for ``--device name``, bound the way main.py binds it
    (cudnn.benchmark and TF32 on CUDA)."""
    return devices.bind(devices.select_device(name))


# --- timing ------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes including the device work it queued."""
    devices.synchronize(device)
    started = time.perf_counter()
    fn()
    devices.synchronize(device)
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float = 0.5,
                min_repeats: int = 3, max_product_seconds: float = 1.0) -> tuple[float, int]:
    """Dense matmul FLOP/s measured on ``device`` in ``dtype``: best of several timed
    ``size x size @ size x size`` products (``2 size^3`` FLOPs each); returns (FLOP/s, size).

    A dtype without fast kernels on the device (bf16 on a CPU without AVX512-BF16/AMX runs
    a reference loop, ~1000x slower) would take minutes at full size: a 256^3 probe first
    shrinks ``size`` so that one product takes about ``max_product_seconds``.
    """
    probe = _matmul_rate(device, dtype, 256, 0.0, 1)
    affordable = int((max_product_seconds * probe / 2.0) ** (1.0 / 3.0))
    size = max(256, min(size, affordable))
    return _matmul_rate(device, dtype, size, min_seconds, min_repeats), size


def _matmul_rate(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float, min_repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * size ** 3
    torch.mm(a, b)  # warm-up: library initialisation, kernel selection
    best = float("inf")
    spent, repeats = 0.0, 0
    while repeats < min_repeats or spent < min_seconds:
        # On fast devices one product is microseconds: time a burst so launch gaps do not count.
        burst = 1 if device.type == "cpu" else 20
        seconds = timed(lambda: [torch.mm(a, b) for _ in range(burst)], device) / burst
        best = min(best, seconds)
        spent += seconds * burst
        repeats += 1
    return flops / best


# --- memory ------------------------------------------------------------------------------

def process_peak_rss() -> int:
    """This process's peak resident set size in bytes (whole life so far)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemorySampler:
    """Peak memory of a process tree while a block runs, sampled by a thread.

    ``tree=False`` samples this process's RSS; ``tree=True`` sums the proportional set
    size (PSS: shared pages split between the processes sharing them, so DataLoader
    workers are not counted several times) of ``pid`` and all its descendants.
    """

    def __init__(self, pid: int | None = None, tree: bool = False, interval_s: float = 0.05):
        self.process = psutil.Process(pid)
        self.tree = tree
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        if not self.tree:
            return self.process.memory_info().rss
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        try:
            self.peak = self._sample()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, self._sample())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass


def reset_device_peak(device: torch.device) -> None:
    api = devices.device_api(device.type)
    reset = getattr(api, "reset_peak_memory_stats", None)
    if callable(reset):
        reset(device)


# --- output ------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [[fmt(cell) if not isinstance(cell, str) else cell for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    sys.stdout.flush()


def write_json(path: str | os.PathLike | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def finish(path: str | os.PathLike | None, payload: dict[str, Any], load_at_end: list[float] | None) -> int:
    """Print the closing memory/load line, write the JSON report, return the exit status."""
    print(f"\nprocess peak RSS {payload['process_peak_rss_bytes'] / MIB:.0f} MiB; "
          f"load average at end {load_at_end}")
    write_json(path, payload)
    return 0
