"""The papers' recipes as a named choice, the other optimizers, and the curves a run draws."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from matplotlib.colors import to_hex
from PIL import Image

import plot_metrics
from conftest import REPO, metrics_of, quick_args, run_main
from training.checkpoint import load_checkpoint
from training.curves import draw_runs

PAPER = {
    "inception_v3": {"opt": "rmsprop", "opt_eps": "1.0", "lr": "0.045", "lr_schedule": "step", "lr_step_epochs": "2",
                     "lr_gamma": "0.94", "clip_grad": "2.0", "label_smoothing": "0.1", "model_ema": "True"},
    "xception": {"opt": "sgd", "momentum": "0.9", "lr": "0.045", "lr_schedule": "step", "lr_step_epochs": "2",
                 "lr_gamma": "0.94", "weight_decay": "1e-05", "drop_rate": "0.5", "model_ema": "True"},
}


def recipe_line(output: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.startswith("recipe "))
    return dict(item.split(" ", 1) for item in line.split(": ", 1)[1].split(", "))


@pytest.mark.parametrize("arch", sorted(PAPER))
def test_the_paper_recipe_prints_the_papers_values(arch, tiny_data, tmp_path):
    size = "75" if arch == "inception_v3" else "48"
    result = run_main(*quick_args(tiny_data, tmp_path, arch, "--recipe", "paper", "--max-steps", "1",
                                  "--image-size", size, "--lr", "0.001"))
    assert result.code == 0, result.output
    values = recipe_line(result.output)
    expected = {**PAPER[arch], "lr": "0.001"}  # a typed option still wins
    assert {key: values[key] for key in expected} == expected
    saved = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert saved["args"]["recipe"] == "paper" and saved["ema_state_dict"]


@pytest.mark.parametrize("opt", ["rmsprop", "adamw"])
def test_other_optimizers_train_and_resume(opt, tiny_data, tmp_path):
    base = quick_args(tiny_data, tmp_path, "xception", "--max-steps", "1", "--image-size", "48")
    assert run_main(*base, "--opt", opt, "--lr", "0.001").code == 0
    saved = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert ("alpha" in saved["optimizer"]["param_groups"][0]) == (opt == "rmsprop")
    # No --opt on resume: the checkpoint's optimizer, with its state.
    resumed = run_main(*base, "--epochs", "2", "--resume", "auto")
    assert resumed.code == 0, resumed.output
    assert "optimizer changed" not in resumed.output
    assert [r["epoch"] for r in metrics_of(tmp_path)] == [1, 2]


def test_curves_are_drawn_each_epoch_and_runs_can_be_compared(tiny_data, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for output in (first, second):
        result = run_main(*quick_args(tiny_data, output, "xception", "--max-steps", "2", "--epochs", "2",
                                      "--image-size", "48", "--model-ema"))
        assert result.code == 0, result.output
    with Image.open(first / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    umask = os.umask(0)
    os.umask(umask)
    assert (first / "curves.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600
    compare = tmp_path / "compare.png"
    result = subprocess.run([sys.executable, "plot_metrics.py", str(first / "metrics.jsonl"), str(second),
                             "-o", str(compare)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and re.search(r"wrote .*compare\.png", result.stdout), result.stderr
    assert compare.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_records(val_losses: list[float]) -> list[dict]:
    """metrics.jsonl records of a run with one epoch per validation loss."""
    records = []
    for epoch, val_loss in enumerate(val_losses):
        records.append({"mode": "step", "epoch": epoch, "step": 10, "steps": 10, "global_step": 10 * (epoch + 1),
                        "loss": 2.0, "lr": 0.1 / (epoch + 1)})
        records.append({"mode": "train", "epoch": epoch + 1, "train_loss": 2.0 / (epoch + 1), "val_loss": val_loss,
                        "train_acc1": 20.0 + 10 * epoch, "val_acc1": 30.0 + 10 * epoch, "fps": 50.0 + epoch})
    return records


def test_curves_stay_readable_with_a_spike_and_a_one_epoch_run():
    figure = draw_runs({"spiky": run_records([21750.8, 1.9, math.nan, 0.9]), "short": run_records([2.2])})
    loss, accuracy, lr, throughput = figure.axes
    assert loss.get_yscale() == "log"  # the spike takes a few decades, not the whole height
    low, high = loss.get_ylim()
    assert low < 0.5 and high > 21750.8
    spiky_val = next(line for line in loss.get_lines() if line.get_label() == "spiky: val")
    assert list(spiky_val.get_xdata()) == [1, 2, 4]  # the NaN epoch is left out, not drawn as a gap to infinity
    colours: dict[str, set[str]] = {}
    for axis in figure.axes:
        for line in axis.get_lines():
            colours.setdefault(line.get_label().split(":")[0], set()).add(to_hex(line.get_color()))
            assert line.get_marker() not in (None, "", " ", "None"), line.get_label()  # every point visible
    assert colours.keys() == {"spiky", "short"}
    assert all(len(found) == 1 for found in colours.values()) and colours["spiky"] != colours["short"]
    short = [line for axis in figure.axes for line in axis.get_lines() if line.get_label().startswith("short")]
    assert len(short) == 6 and all(len(line.get_xdata()) == 1 for line in short)  # one point each, marked
    styles = {line.get_label(): line.get_linestyle() for line in loss.get_lines()}
    assert styles["spiky: train"] != styles["spiky: val"]  # within a run, the series differ by line and marker


def test_plot_metrics_names_a_file_it_cannot_read(tmp_path, capsys, caplog):
    broken = tmp_path / "metrics.jsonl"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not json\n[1, 2]\n")
    assert plot_metrics.main([str(tmp_path), "-o", str(tmp_path / "curves.png")]) == 1  # a run folder works too
    assert capsys.readouterr().err.strip() == (f'error: {broken} is not a metrics.jsonl file (no JSON object per '
                                               f'line with a "mode" in it)')
    assert plot_metrics.main([str(tmp_path / "missing.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no such metrics file: {tmp_path / 'missing.jsonl'}"
    assert not (tmp_path / "curves.png").exists()


def test_plot_metrics_skips_a_line_cut_short_and_says_so(tmp_path, caplog):
    cut = tmp_path / "metrics.jsonl"
    cut.write_text('{"mode": "train", "epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_acc1": 10.0}\n{"mode": "tr')
    assert plot_metrics.main([str(cut), "-o", str(tmp_path / "curves.png")]) == 0
    assert f"{cut} line 2 is not a JSON record (a write cut short?): skipped" in caplog.text
    assert (tmp_path / "curves.png").stat().st_size > 0
