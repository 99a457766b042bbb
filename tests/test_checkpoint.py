"""Checkpoint files: atomic writes that survive crashes, safe reads, finding the newest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO
from training.checkpoint import (CheckpointError, find_newest_run_checkpoint, find_resume_checkpoint,
                                 load_checkpoint, save_checkpoint)


class ExplodesWhenPickled:
    """Stands for a crash in the middle of serialisation (after bytes were written)."""

    def __reduce__(self):
        raise RuntimeError("crash during save")


def _state(value: float, size: int = 1000) -> dict:
    return {"epoch": 1, "arch": "xception", "state_dict": {"w": torch.full((size,), value)}}


def test_failed_save_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(_state(1.0), path)
    broken = {"state_dict": {"w": torch.zeros(100_000)}, "extra": ExplodesWhenPickled()}
    with pytest.raises(RuntimeError, match="crash during save"):
        save_checkpoint(broken, path)
    assert load_checkpoint(path)["state_dict"]["w"][0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar"]


def test_killed_writer_never_leaves_a_broken_file(tmp_path):
    """A process killed at a random moment while rewriting the file: it always loads."""
    path = tmp_path / "checkpoint.pth.tar"
    writer = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from training.checkpoint import save_checkpoint
        step = 0
        print("ready", flush=True)
        while True:
            step += 1
            save_checkpoint({{"epoch": step, "state_dict": {{"w": torch.full((4_000_000,), float(step))}}}},
                            {str(path)!r})
    """)
    for delay in (0.6, 0.9, 1.3):
        process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if path.exists():
            state = load_checkpoint(path)
            assert float(state["state_dict"]["w"][-1]) == float(state["epoch"])


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pth.tar"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
        load_checkpoint(missing)
    truncated = tmp_path / "truncated.pth.tar"
    save_checkpoint(_state(2.0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated"):
        load_checkpoint(truncated)
    weights_only = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, weights_only)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(weights_only)


def test_resume_and_newest_run_skip_unreadable_files(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None and find_newest_run_checkpoint([tmp_path / "none"]) is None
    save_checkpoint(_state(3.0), tmp_path / "model_best.pth.tar")
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"not a checkpoint")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "model_best.pth.tar"
    save_checkpoint(_state(4.0), tmp_path / "run2" / "checkpoint.pth.tar")
    assert find_newest_run_checkpoint([tmp_path]) == (tmp_path / "run2" / "checkpoint.pth.tar").resolve()


def test_the_newest_run_gives_its_best_model(tmp_path):
    old, new = tmp_path / "a" / "old", tmp_path / "b" / "new"
    save_checkpoint(_state(1.0), old / "checkpoint.pth.tar")
    os.utime(old / "checkpoint.pth.tar", (1, 1))
    save_checkpoint(_state(2.0), new / "model_best.pth.tar")
    save_checkpoint(_state(3.0), new / "checkpoint.pth.tar")
    assert find_newest_run_checkpoint([tmp_path / "a", tmp_path / "b"]) == (new / "model_best.pth.tar").resolve()
