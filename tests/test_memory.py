"""Memory: a first step that cannot fit is refused before it starts, with what fits; the
estimate never exceeds what a real step takes; an out-of-memory error is one line."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from conftest import quick_args, run_main
from processes import launch, main_command

ESTIMATE = re.compile(r"memory: a training step adds about ([\d.]+) GiB to the ([\d.]+) GiB this process holds")
REFUSAL = re.compile(r"^error: a training step needs about ([\d.]+) GiB \(activations [\d.]+ GiB for a batch of 4 at "
                     r"(\d+) px, gradients and optimizer state [\d.]+ GiB\), but ([\d.]+) GiB is available \(host "
                     r"memory\); what fits: (.*)$")
GiB = 2**30


def host_memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def test_a_step_that_cannot_fit_is_refused_before_it_starts_with_what_fits(tiny_data, tmp_path):
    # Xception keeps about 0.25 GB of activations per 299-px image: an image size whose batch of 4
    # needs about four times this machine's memory.
    size = int(299 * math.sqrt(4 * host_memory_available() / (4 * 0.25e9)))
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--image-size", str(size)))
    assert result.code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    match = REFUSAL.match(line)
    assert match, line
    needed, shown_size, available, fits = float(match[1]), int(match[2]), float(match[3]), match[4]
    assert shown_size == size and needed > available
    suggested = int(re.search(r"--image-size (\d+)", fits)[1])
    assert 7 <= suggested < size
    assert list(tmp_path.iterdir()) == [] and "Epoch:" not in result.output  # refused before writing anything


def test_the_estimate_stays_below_what_a_real_step_takes(tiny_data, tmp_path):
    """The peak resident memory of two real steps (measured by the OS) is at least what the run
    held before them plus its estimate: a run is never refused for memory it would not need."""
    log = tmp_path / "log"
    process = launch(main_command(*quick_args(tiny_data, tmp_path / "out", "xception", "--image-size", "128",
                                              "--max-steps", "2")), log)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    assert process.returncode == 0, text
    added, held = map(float, ESTIMATE.search(text).groups())
    peak = usage.ru_maxrss * 1024 / GiB
    assert peak >= held + added - 0.01, (peak, held, added)


def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path):
    # A batch no machine can hold: its allocation fails at once, whatever the overcommit policy.
    result = run_main("-a", "xception", "--synthetic", "-b", "1000000000", "--image-size", "299", "--epochs", "1",
                      "-j", "0", "--output_dir", tmp_path)
    assert result.code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: out of memory on cpu with a batch of 1000000000 per device at 299 px (")
    assert line.endswith("): use a smaller batch (-b 500000000), a smaller --image-size, or --amp")
