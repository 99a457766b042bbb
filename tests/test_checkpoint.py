"""Checkpoint files: atomic writes that survive crashes, safe reads, finding the newest, and
damaged files refused with one line by every entry point that reads them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import demo
import pthtar2onnx
from conftest import REPO, quick_args, run_main
from training.checkpoint import (Checkpoint, CheckpointError, find_newest_run_checkpoint, find_resume_checkpoint,
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
    broken = Checkpoint(weights={"w": torch.zeros(100_000)}, options={"extra": ExplodesWhenPickled()})
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


def test_resume_auto_never_skips_an_unreadable_last_checkpoint(tmp_path, caplog):
    assert find_resume_checkpoint(tmp_path) is None  # no checkpoint file: the one case of a fresh start
    save_checkpoint(_state(3.0), tmp_path / "model_best.pth.tar")
    found, checkpoint = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "model_best.pth.tar" and checkpoint.epoch == 1
    assert "has no checkpoint.pth.tar; resuming from" in caplog.text  # announced: it may be older
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {tmp_path / 'checkpoint.pth.tar'}.*"
                                              f"give --resume {tmp_path / 'model_best.pth.tar'}"):
        find_resume_checkpoint(tmp_path)


def test_the_newest_run_skips_unreadable_files_and_says_so(tmp_path, caplog):
    assert find_newest_run_checkpoint([tmp_path / "none"]) is None
    (tmp_path / "run1" / "model_best.pth.tar").parent.mkdir()
    (tmp_path / "run1" / "model_best.pth.tar").write_bytes(b"not a checkpoint")
    save_checkpoint(_state(4.0), tmp_path / "run1" / "checkpoint.pth.tar")
    assert find_newest_run_checkpoint([tmp_path]) == (tmp_path / "run1" / "checkpoint.pth.tar").resolve()
    assert "skipped cannot read checkpoint" in caplog.text and "model_best.pth.tar" in caplog.text


def test_the_newest_run_gives_its_best_model(tmp_path):
    old, new = tmp_path / "a" / "old", tmp_path / "b" / "new"
    save_checkpoint(_state(1.0), old / "checkpoint.pth.tar")
    os.utime(old / "checkpoint.pth.tar", (1, 1))
    save_checkpoint(_state(2.0), new / "model_best.pth.tar")
    save_checkpoint(_state(3.0), new / "checkpoint.pth.tar")
    assert find_newest_run_checkpoint([tmp_path / "a", tmp_path / "b"]) == (new / "model_best.pth.tar").resolve()


# -- damaged files, through the real entry points ----------------------------------------------------

def damaged_copy(state, folder, name, **changes):
    """The trained checkpoint (without its optimizer state: none of these gets that far) with
    ``changes``, saved as ``folder/name``."""
    path = folder / name
    torch.save({**state, **changes}, path)
    return path


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def test_nan_weights_are_refused_by_evaluation_resume_demo_and_export(trained_state, tiny_data, tmp_path, capsys):
    weights = trained_state["state_dict"]
    name = "Mixed_6a.branch3x3.conv.weight"
    damaged = {**weights, name: torch.full_like(weights[name], float("nan"))}
    path = damaged_copy(trained_state, tmp_path, "nan.pth.tar", state_dict=damaged)
    expected = (f"error: {path}: the weights are damaged: {name} holds NaN or infinite values (a diverged run, or "
                f"a corrupted file); use another checkpoint")
    for extra in (["-e", "--resume", path], ["--resume", path, "--epochs", "2"]):
        result = run_main(*quick_args(tiny_data, tmp_path / "out", "inception_v3", *extra))
        assert result.code == 1 and one_error_line(result.output) == expected
    assert demo.main(["--checkpoint", str(path)]) == 1
    assert pthtar2onnx.main([str(path), "--no-check"]) == 1
    assert capsys.readouterr().err.splitlines() == [expected] * 2
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("field, value, expected", [
    ("epoch", -1, "'epoch' is -1, expected a whole number from 0"),
    ("epoch", "three", "'epoch' is 'three', expected a whole number from 0"),
    ("step", 7, "'step' is 7, expected at most steps_per_epoch (2)"),
    ("num_classes", "three", "'num_classes' is 'three', expected a whole number from 1 to 1000000"),
    ("image_size", 10**6, "'image_size' is 1000000, expected a whole number from 1 to 2048"),
    ("best_weights", "both", "'best_weights' is 'both', expected one of model, ema"),
    ("args", {"epochs": "ten"}, "its option epochs is 'ten', expected a whole number"),
])
def test_metadata_out_of_range_is_one_line(field, value, expected, trained_state, tiny_data, tmp_path, capsys):
    """Each through the entry point that would have acted on it: resume for the position, the
    demo for what it allocates and shows."""
    if field == "args":  # one resumed option of the wrong kind among the run's own
        value = {**trained_state["args"], **value}
    path = damaged_copy(trained_state, tmp_path, "damaged.pth.tar", **{field: value})
    line = f"error: {path}: {expected}; the file is damaged or was not written by this code"
    if field in ("epoch", "step", "args"):
        result = run_main(*quick_args(tiny_data, tmp_path / "out", "inception_v3", "--resume", path, "--epochs", "3"))
        assert result.code == 1 and one_error_line(result.output) == line
    else:
        assert demo.main(["--checkpoint", str(path)]) == 1
        assert one_error_line(capsys.readouterr().err) == line
