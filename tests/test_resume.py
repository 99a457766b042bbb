"""Long runs you can trust: step-exact resume after kill -9, SIGTERM/SIGUSR1 preemption, the
resume policy for options, and a position that follows training progress, not a step count."""
from __future__ import annotations

import json
import math
import os
import signal
import socket

import pytest
import torch

from conftest import metrics_of, run_main, step_records
from processes import finish, launch, launch_with, main_command, run_to_end, wait_for_line
from training.checkpoint import load_checkpoint
from training.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, StopNow, StopSignals

LR = 0.01
SIZE = 48  # Xception takes small inputs: fast steps


def run_args(data, output, *extra) -> list[str]:
    """2 epochs of 4 steps of 2 images, printed every step."""
    return ["-a", "xception", "--data", str(data), "--output_dir", str(output), "--image-size", str(SIZE),
            "-b", "2", "--max-steps", "4", "--epochs", "2", "--seed", "0", "--lr", str(LR), "--print-freq", "1",
            "--progress", "lines", "-j", "0", *extra]


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce, bit for bit (a process of its
    own, like them: the same threads, the same floating-point order)."""
    output = tmp_path_factory.mktemp("straight")
    code, text = run_to_end(main_command(*run_args(tiny_data, output)), output / "log")
    assert code == 0, text
    return output


@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_mid_epoch_then_resume_gives_identical_weights(workers, tiny_data, straight, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = run_args(tiny_data, output, "--save-every-steps", "2", "-j", workers)
    process = launch(main_command(*args), log)
    wait_for_line(r"saved .*checkpoint\.pth\.tar at epoch 1 step 2 of 4", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = load_checkpoint(output / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step"]) == (1, 2)  # killed in the middle of the second epoch
    code, text = run_to_end(main_command(*args, "--resume", "auto"), tmp_path / "resumed.log")
    assert code == 0, text
    assert "resumed from" in text and "epoch 1, step 2 of 4" in text
    assert_same_weights(weights(output / "checkpoint.pth.tar"), weights(straight / "checkpoint.pth.tar"))
    # The resumed epoch's metrics cover the whole epoch, steps before the kill included.
    assert metrics_of(output)[-1]["train_images"] == metrics_of(straight)[-1]["train_images"] == 8
    assert metrics_of(output)[-1]["train_loss"] == pytest.approx(metrics_of(straight)[-1]["train_loss"], rel=1e-6)


def test_sigterm_writes_a_checkpoint_and_resume_auto_finishes(tiny_data, straight, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = run_args(tiny_data, output, "--save-every", "0")
    process = launch(main_command(*args), log)
    wait_for_line(r"^Epoch: \[1\]\[1/4\]", process, log)
    process.send_signal(signal.SIGTERM)
    wait_for_line("SIGTERM received: stopping after this step", process, log)
    still_running = process.poll() is None
    process.send_signal(signal.SIGTERM)  # a second one, while it finishes the step and saves: ignored
    text = finish(process, log)
    assert process.returncode == PREEMPTED_EXIT_CODE, text
    assert not still_running or "received while stopping: ignored" in text
    saved = load_checkpoint(output / "checkpoint.pth.tar")
    assert saved["epoch"] == 1 and 1 <= saved["step"] < 4
    code, text = run_to_end(main_command(*args, "--resume", "auto"), tmp_path / "resumed.log")
    assert code == 0, text
    assert [r["epoch"] for r in metrics_of(output)] == [1, 2]
    assert_same_weights(weights(output / "checkpoint.pth.tar"), weights(straight / "checkpoint.pth.tar"))


def test_sigusr1_stops_at_the_next_step_too(tiny_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    process = launch(main_command(*run_args(tiny_data, output, "--save-every", "0")), log)
    wait_for_line(r"^Epoch: \[0\]\[2/4\]", process, log)
    process.send_signal(signal.SIGUSR1)
    text = finish(process, log)
    assert process.returncode == PREEMPTED_EXIT_CODE and "SIGUSR1 received" in text
    assert load_checkpoint(output / "checkpoint.pth.tar")["step"] >= 2


def test_an_explicit_option_on_resume_wins_and_the_rest_comes_from_the_checkpoint(straight, tiny_data, tmp_path):
    checkpoint = straight / "checkpoint.pth.tar"
    # No -b: the checkpoint's 2 is used (the recipe's 128 would not even fit the 24 images).
    result = run_main("-a", "xception", "--data", tiny_data, "--output_dir", tmp_path, "--resume", checkpoint,
                      "--epochs", "3", "--lr", "0.5", "--lr-schedule", "step", "-j", "0")
    assert result.code == 0, result.output
    assert "options changed from the checkpoint: epochs 2 -> 3, lr 0.01 -> 0.5, lr_schedule cosine -> step" \
        in result.output
    used = json.loads((tmp_path / "args.json").read_text())
    assert (used["lr"], used["batch_size"], used["image_size"], used["seed"]) == (0.5, 2, SIZE, 0)
    assert {record["lr"] for record in step_records(tmp_path)} == {0.5}
    saved = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert {group["lr"] for group in saved["optimizer"]["param_groups"]} == {0.5}


def test_an_explicit_start_epoch_overrides_the_checkpoint(straight, tiny_data, tmp_path):
    result = run_main("-a", "xception", "--data", tiny_data, "--output_dir", tmp_path, "-j", "0",
                      "--resume", straight / "checkpoint.pth.tar", "--start-epoch", "1")
    assert result.code == 0, result.output
    assert "resumed from" in result.output and ": epoch 1, best" in result.output
    assert [record["epoch"] for record in metrics_of(tmp_path)] == [2]


def test_another_batch_size_resumes_at_the_same_point_of_the_curve(straight, tiny_data, tmp_path):
    """At the end of epoch 2 of now 4, cosine: lr = 0.01 x (1 + cos(pi x 2/4)) / 2, whatever the
    steps per epoch (4 before, 3 now)."""
    result = run_main("-a", "xception", "--data", tiny_data, "--output_dir", tmp_path, "-j", "0",
                      "--resume", straight / "checkpoint.pth.tar", "--epochs", "4", "-b", "4", "--max-steps", "3")
    assert result.code == 0, result.output
    first = step_records(tmp_path)[0]
    assert (first["epoch"], first["step"]) == (2, 1)
    assert first["lr"] == pytest.approx(LR * (1 + math.cos(math.pi * 2 / 4)) / 2)


def test_a_mid_epoch_checkpoint_maps_to_the_same_fraction_of_the_epoch(tiny_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = run_args(tiny_data, output, "--save-every-steps", "2")
    process = launch(main_command(*args), log)
    wait_for_line(r"saved .* at epoch 0 step 2 of 4", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Half of epoch 0 done with 4 steps per epoch; now 8 steps per epoch: resume at step 4 of 8.
    result = run_main(*run_args(tiny_data, output, "--max-steps", "8", "--resume", "auto"))
    assert result.code == 0, result.output
    assert "steps per epoch changed from 4 to 8: resuming at step 4" in result.output
    first = next(record for record in step_records(output) if record["steps"] == 8)
    assert (first["epoch"], first["step"]) == (0, 5)
    assert first["lr"] == pytest.approx(LR * (1 + math.cos(math.pi * 0.5 / 2)) / 2)


# -- Ctrl-C, and the folder a live run holds ---------------------------------------------------

def test_ctrl_c_stops_at_the_step_with_a_checkpoint_and_a_live_run_keeps_its_folder(tiny_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = run_args(tiny_data, output, "--epochs", "50", "--save-every", "0")
    # A team's umask (group-writable): the checkpoint must get it, not a private 0600.
    process = launch_with(main_command(*args), log, preexec_fn=lambda: os.umask(0o002))
    wait_for_line(r"^Epoch: \[0\]\[1/4\]", process, log)
    for second in (args, [*args, "--resume", "auto"]):
        refused = run_main(*second)
        assert refused.code == 1 and "Traceback" not in refused.output
        assert (f"error: {output} is in use by another run (host {socket.gethostname()}, pid {process.pid}, "
                f"started ") in refused.output
    process.send_signal(signal.SIGINT)
    text = finish(process, log)
    assert process.returncode == INTERRUPTED_EXIT_CODE, text
    assert "SIGINT received: stopping after this step and writing a checkpoint" in text and "Traceback" not in text
    saved = load_checkpoint(output / "checkpoint.pth.tar")
    assert saved["epoch"] == 0 and 1 <= saved["step"] <= 4
    assert f"saved {output / 'checkpoint.pth.tar'} at epoch 0 step {saved['step']} of 4" in text
    assert (output / "checkpoint.pth.tar").stat().st_mode & 0o777 == 0o664
    assert not (output / ".run.lock").exists()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    """Steps of a few seconds (Inception v3 at 299 px), so the second Ctrl-C lands in the step
    the first one let finish."""
    output, log = tmp_path / "out", tmp_path / "log"
    args = ["-a", "inception_v3", "--data", tiny_data, "--output_dir", output, "--image-size", "299", "-b", "2",
            "-j", "0", "--max-steps", "6", "--save-every-steps", "1", "--print-freq", "1", "--progress", "lines"]
    process = launch(main_command(*args), log)
    wait_for_line(r"saved .* at epoch 0 step 1 of 6", process, log)
    kept = (output / "checkpoint.pth.tar").read_bytes()
    process.send_signal(signal.SIGINT)
    wait_for_line("SIGINT received: stopping after this step", process, log)
    process.send_signal(signal.SIGINT)
    text = finish(process, log)
    assert process.returncode == INTERRUPTED_EXIT_CODE, text
    assert "SIGINT received again: stopping at once; the last checkpoint written is kept" in text
    assert "Traceback" not in text and "saved" not in text.split("SIGINT received again")[1]
    assert (output / "checkpoint.pth.tar").read_bytes() == kept
    assert not list(output.glob(".*.tmp"))


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])
def test_which_signals_stop_at_once(first):
    """The policy on real signals sent to this process: outside the training loop any stop
    signal stops at once; inside, the first waits for the step's end, a repeated SIGTERM is
    ignored, and a SIGINT (after anything) or anything after a SIGINT stops at once."""
    number = getattr(signal, first)
    code = INTERRUPTED_EXIT_CODE if first == "SIGINT" else PREEMPTED_EXIT_CODE
    signals = StopSignals()
    with signals.installed():
        with pytest.raises(StopNow) as outside:
            signal.raise_signal(number)
        assert outside.value.exit_code == code
    signals = StopSignals()
    with signals.installed(), signals.saving_stop():
        signal.raise_signal(number)
        assert (signals.received, signals.exit_code) == (first, code)
        if first == "SIGTERM":
            signal.raise_signal(signal.SIGTERM)  # while the checkpoint is written: ignored
        with pytest.raises(StopNow) as insisted:
            signal.raise_signal(signal.SIGINT if first == "SIGTERM" else signal.SIGTERM)
        assert insisted.value.exit_code == code
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
