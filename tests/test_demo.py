"""demo.py: top-k on a real checkpoint, checkpoint discovery, ModelZoo and bare files, errors."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import demo
import models

TOP_LINE = re.compile(r"^\s*(\d+)\.\s+([\d.]+)%\s+(.+) \((\d+)\)$")


def top_lines(output: str) -> list[tuple[int, float, str, int]]:
    matches = (TOP_LINE.match(line) for line in output.splitlines())
    return [(int(m[1]), float(m[2]), m[3], int(m[4])) for m in matches if m]


def test_top_k_of_a_trained_checkpoint(trained_checkpoint, capsys):
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--topk", "2"]) == 0
    output = capsys.readouterr().out
    rows = top_lines(output)
    assert [row[0] for row in rows] == [1, 2]
    assert all(name == f"class_{index:02d}" for _, _, name, index in rows)  # the checkpoint's class names
    assert rows[0][1] >= rows[1][1] and sum(row[1] for row in rows) <= 100.01
    assert "inception_v3, epoch 1, 3 classes" in output
    assert "75x75 crop" in output  # the checkpoint's training size
    assert "sample.jpg" in output


def test_topk_is_capped_at_the_class_count(trained_checkpoint, capsys):
    assert demo.main(["--checkpoint", str(trained_checkpoint)]) == 0  # default 5, only 3 classes
    assert len(top_lines(capsys.readouterr().out)) == 3


def test_newest_checkpoint_under_output_is_found(trained_checkpoint, tmp_path, monkeypatch, capsys):
    older = tmp_path / "output" / "old" / "checkpoint.pth.tar"
    newer = tmp_path / "output" / "new" / "model_best.pth.tar"
    for target in (older, newer):
        target.parent.mkdir(parents=True)
        shutil.copy(trained_checkpoint, target)
    os.utime(older, (1, 1))  # modified in 1970
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEST_OUTPUT_DIR", raising=False)
    assert demo.main([]) == 0
    assert f"checkpoint: {tmp_path / 'output/new/model_best.pth.tar'}" in capsys.readouterr().out


def test_upstream_spellings(trained_checkpoint, capsys):
    assert demo.main(["--model-path", str(trained_checkpoint), "--device", "cpu", "--device-list", "0"]) == 0
    captured = capsys.readouterr()
    assert "--device-list is accepted for ModelZoo command lines but has no effect" in captured.err
    assert len(top_lines(captured.out)) == 3


def test_missing_checkpoint_gives_the_training_hint(fresh_checkout, tmp_path):
    # The real command line, in a checkout where nothing was trained yet.
    env = {key: value for key, value in os.environ.items() if key != "TEST_OUTPUT_DIR"}
    result = subprocess.run([sys.executable, str(fresh_checkout / "demo.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no checkpoint found under output, ")
    assert "train one first (bash quickstart.sh), or give --checkpoint FILE" in result.stderr


def test_bad_image_path_is_one_line(trained_checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image", str(missing)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"error: image not found: {missing}"
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image", str(not_an_image)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: cannot read image {not_an_image}") and "\n" not in error


def test_modelzoo_checkpoint_gets_imagenet_names(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.create_model("xception", num_classes=1000)
    # ModelZoo's layout: DataParallel prefixes, an arch key, no class names or image size.
    state = {"epoch": 150, "arch": "xception", "best_acc1": 78.8,
             "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()}}
    path = tmp_path / "xception_modelzoo.pth.tar"
    torch.save(state, path)
    assert demo.main(["--checkpoint", str(path), "--image-size", "64", "--topk", "3"]) == 0
    rows = top_lines(capsys.readouterr().out)
    from torchvision.models import Inception_V3_Weights
    categories = Inception_V3_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(rows) == 3 and all(name == categories[index] for _, _, name, index in rows)


def test_bare_state_dict_needs_the_arch(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=4).state_dict(), path)
    assert demo.main(["--checkpoint", str(path)]) == 1
    assert "give it with -a" in capsys.readouterr().err
    assert demo.main(["--checkpoint", str(path), "-a", "xception", "--image-size", "64"]) == 0
    output = capsys.readouterr().out
    assert "xception, 4 classes" in output
    assert {row[2] for row in top_lines(output)} <= {f"class {i}" for i in range(4)}


def test_wrong_arch_is_refused(trained_checkpoint, capsys):
    assert demo.main(["--checkpoint", str(trained_checkpoint), "-a", "xception"]) == 1
    assert "is a checkpoint of inception_v3, but -a is xception" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--topk", "0"], "argument --topk: must be a positive integer, got 0"),
    (["--image-size", "-5"], "argument --image-size: must be a positive integer, got -5"),
    (["--image-size", "0"], "argument --image-size: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument -b/--batch-size: must be a positive integer, got 0"),
    (["--workers", "-1"], "argument -j/--workers: must be an integer >= 0, got -1"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["-a", "resnet50"], "argument -a/--arch: unknown architecture 'resnet50'"),
])
def test_options_are_checked_at_parse_time(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"demo.py: error: {expected}")


def test_an_image_size_below_the_models_minimum_is_one_line(trained_checkpoint, capsys):
    assert demo.main(["--checkpoint", str(trained_checkpoint), "--image-size", "40"]) == 1
    assert capsys.readouterr().err.strip() == "error: --image-size 40 is below inception_v3's minimum input size 75"


def test_a_model_of_the_quick_start_says_it_knows_only_the_synthetic_classes(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.create_model("xception", num_classes=demo.DUMMY_NUM_CLASSES)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"arch": "xception", "epoch": 5, "state_dict": model.state_dict(), "image_size": 48,
                "num_classes": demo.DUMMY_NUM_CLASSES, "class_names": demo.DUMMY_CLASS_NAMES}, path)
    assert demo.main(["--checkpoint", str(path), "--topk", "2", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("note: this model was trained on the generated --dummy data set: it knows only its "
                           "10 synthetic classes")
