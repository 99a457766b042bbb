"""Folder inference (demo.py --image DIR --csv, training/predict.py): batched, with validation's
preprocessing, the classes one image at a time gives and the exported ONNX model gives; inputs in
the memory format of the device's capability row."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

import demo
import models
import pthtar2onnx
from test_demo import top_lines
from training import device as devices
from training.data.transforms import read_eval_image
from training.predict import TorchClassifier


@pytest.fixture(scope="module")
def photo_folder(tiny_data, tmp_path_factory) -> Path:
    """Six validation images (two in a sub-folder), a broken .jpg and a text file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    images = sorted((tiny_data / "val").rglob("*.jpg"))[::2][:6]
    for index, image in enumerate(images):
        shutil.copy(image, (folder / "more" if index >= 4 else folder) / image.name)
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "readme.txt").write_text("not an image file name either")
    return folder


def read_rows(path: Path) -> dict[str, list[str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    return {row[0]: row[1:] for row in rows[1:]}


@pytest.mark.slow
def test_folder_csv_agrees_with_single_images_and_onnx(trained_checkpoint, photo_folder, tmp_path, capsys):
    checkpoint = ["--checkpoint", str(trained_checkpoint), "--topk", "2"]
    by_torch = tmp_path / "torch.csv"
    assert demo.main([*checkpoint, "--image", str(photo_folder), "--csv", str(by_torch), "-b", "4", "-j", "0"]) == 0
    captured = capsys.readouterr()
    rows = read_rows(by_torch)
    assert len(rows) == 6 and not any(name.endswith((".txt", "notes.jpg")) for name in rows)
    assert f"warning: cannot read image {photo_folder / 'notes.jpg'}" in captured.err  # listed, not fatal
    assert "classified 6 image(s), written to" in captured.out and "images/s" in captured.out
    for cells in rows.values():
        assert cells[0] in ("class_00", "class_01", "class_02") and 1.0 >= float(cells[1]) >= float(cells[3])

    for path in list(rows)[:3]:  # one image at a time, demo.py's first use
        assert demo.main([*checkpoint, "--image", path]) == 0
        assert top_lines(capsys.readouterr().out)[0][2] == rows[path][0], path

    # A fixed batch of 2 in the file: the folder's batches of 4 and 2 and a padded single one.
    exported = tmp_path / "model.onnx"
    assert pthtar2onnx.main([str(trained_checkpoint), "-o", str(exported), "--batch-size", "2", "--no-check"]) == 0
    by_onnx = tmp_path / "onnx.csv"
    pattern = str(photo_folder / "**" / "*.jpg")  # a glob: every .jpg, the broken one too
    assert demo.main([*checkpoint, "--image", pattern, "--csv", str(by_onnx), "--onnx", str(exported),
                      "-b", "3", "-j", "1"]) == 0
    assert "onnxruntime on cpu" in capsys.readouterr().out
    onnx_rows = read_rows(by_onnx)
    assert onnx_rows.keys() == rows.keys()
    for path, cells in rows.items():
        assert onnx_rows[path][0] == cells[0], path
        assert float(onnx_rows[path][1]) == pytest.approx(float(cells[1]), abs=1e-3), path
    single = list(rows)[0]
    assert demo.main([*checkpoint, "--image", single, "--onnx", str(exported)]) == 0
    assert top_lines(capsys.readouterr().out)[0][2] == rows[single][0]


def test_nothing_readable_is_an_error(trained_checkpoint, tmp_path, capsys):
    (tmp_path / "a.jpg").write_text("no")
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image", str(tmp_path), "-j", "0"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: none of the 1 file(s) from {tmp_path} could be read")
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image", str(tmp_path / "*.png")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no files match {tmp_path / '*.png'}"


@pytest.mark.parametrize("row", ["cpu", "npu"])
def test_inference_input_follows_the_capability_row(row):
    """An NPU takes contiguous NCHW tensors only: no channels-last pixels or weights are sent to it."""
    caps = devices.CAPABILITIES[row]
    torch.manual_seed(0)
    model = models.create_model("xception", num_classes=3)
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    preprocess = models.preprocess_config("xception")
    pixels = read_eval_image(demo.DEFAULT_IMAGE, 48, preprocess)
    assert pixels.is_contiguous(memory_format=torch.channels_last)  # as the transforms make it
    classifier = TorchClassifier(model, preprocess, torch.device("cpu"), caps)
    logits = classifier.logits(torch.cat([pixels, pixels]))
    assert logits.shape == (2, 3)
    [seen] = inputs
    assert seen.is_contiguous(memory_format=torch.channels_last) == caps.channels_last
    assert seen.is_contiguous() == (not caps.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == caps.channels_last


def test_a_csv_to_stdout_a_pipe_or_a_link_is_written_through_not_replaced(trained_checkpoint, photo_folder,
                                                                          tmp_path):
    """Where the output is not a regular file, writing it as a new file renamed into place
    would replace the device, the pipe or the link itself (as root, /dev/stdout's link too)."""
    import os
    import subprocess
    import sys
    import threading

    command = [sys.executable, str(Path(demo.__file__)), "--checkpoint", str(trained_checkpoint), "--image",
               str(photo_folder), "-b", "4", "-j", "0", "--csv"]
    try:
        to_stdout = subprocess.run([*command, "/dev/stdout"], capture_output=True, text=True, timeout=300)
        assert to_stdout.returncode == 0, to_stdout.stderr
        assert "\npath,class_1,probability_1," in "\n" + to_stdout.stdout, to_stdout.stdout  # among demo's lines
        assert os.path.islink("/dev/stdout")
    finally:  # a failure as root must not leave the machine without its /dev/stdout
        if not os.path.islink("/dev/stdout") and os.geteuid() == 0:
            os.remove("/dev/stdout")
            os.symlink("/proc/self/fd/1", "/dev/stdout")

    fifo = tmp_path / "predictions.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    through_fifo = subprocess.run([*command, str(fifo)], capture_output=True, text=True, timeout=300)
    reader.join(timeout=60)
    assert through_fifo.returncode == 0, through_fifo.stderr
    assert received and received[0].decode().startswith("path,class_1,")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["predictions.fifo"]

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "predictions.csv").write_text("old")
    link = tmp_path / "latest.csv"
    link.symlink_to(kept / "predictions.csv")
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image", str(photo_folder), "-b", "4", "-j", "0",
                      "--csv", str(link)]) == 0
    assert link.is_symlink() and (kept / "predictions.csv").read_text().startswith("path,class_1,")
    assert sorted(p.name for p in kept.iterdir()) == ["predictions.csv"]
