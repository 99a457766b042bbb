"""Shared fixtures: tiny generated ImageFolders and a way to run main.py in-process."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.data.embedded import make_imagefolder  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

# Small enough for seconds per run on two CPU cores, big enough for Inception's minimum.
TINY_IMAGE_SIZE = 75


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Caches in temporary folders, never the user's; no downloads; HCCL's collective rules.

    Subprocesses (torchrun, the test/ scripts) inherit all of it.
    """
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Every collective checked against what HCCL accepts, as on an NPU (training.distributed).
    os.environ["STRICT_COLLECTIVES"] = "hccl"
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes, 8 train + 5 val images each (15 val images: not divisible by 2 or 4)."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny") / "data", num_classes=3, train_per_class=8,
                            val_per_class=5, image_size=(88, 80), seed=1)


@dataclass
class Result:
    code: int
    output: str


def run_main(*argv: str) -> Result:
    """Run ``main.py argv`` in this process; returns the exit code and everything printed."""
    from training.run import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse errors
            code = stop.code if isinstance(stop.code, int) else 1
    return Result(code, buffer.getvalue())


def quick_args(data: Path, output: Path, arch: str = "inception_v3", *extra: str) -> list[str]:
    """A run of a few seconds: tiny images, small batches, no worker processes."""
    return ["-a", arch, "--data", str(data), "--output_dir", str(output), "--image-size", str(TINY_IMAGE_SIZE),
            "-b", "4", "--workers", "0", "--epochs", "1", "--seed", "0", "--print-freq", "2", *extra]


def metrics_of(output: Path) -> list[dict]:
    """The epoch (and evaluation) records of a run's metrics.jsonl."""
    return [record for record in read_metrics(output / "metrics.jsonl") if record["mode"] != "step"]


def step_records(output: Path) -> list[dict]:
    """The per-print-step records of a run's metrics.jsonl."""
    return [record for record in read_metrics(output / "metrics.jsonl") if record["mode"] == "step"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fresh_checkout(tmp_path_factory) -> Path:
    """A copy of the repository as a fresh clone has it: tracked files, nothing trained or built.
    One per test (0.7 MB): a test that trains in it must not leave checkpoints for the next."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, text=True, check=True)
    root = tmp_path_factory.mktemp("checkout") / "repo"
    for name in filter(None, listing.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A real checkpoint of one short Inception v3 epoch on the tiny data."""
    output = tmp_path_factory.mktemp("trained")
    result = run_main(*quick_args(tiny_data, output, "inception_v3", "--max-steps", "2"))
    assert result.code == 0, result.output
    return output / "checkpoint.pth.tar"


@pytest.fixture(scope="session")
def trained_state(trained_checkpoint) -> dict:
    """``trained_checkpoint`` as loaded, without its optimizer state (for tests that damage copies
    of it: read once, not once per copy)."""
    import torch

    state = torch.load(trained_checkpoint, weights_only=True)
    state.pop("optimizer")
    return state
