"""pthtar2onnx.py: both architectures export and match onnxruntime; ModelZoo and bare files."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import models
import pthtar2onnx
from training.data.transforms import read_eval_image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 80
DIFFERENCE = re.compile(r"max abs difference ([0-9.e+-]+) \(allowed ([0-9.e+-]+); largest \|logit\| ([0-9.e+-]+)\)")


def calibrated_model(arch: str, num_classes: int = 3) -> nn.Module:
    """A fresh model whose BatchNorm statistics fit its activations, so that eval-mode logits
    are of ordinary size and the 1e-3 tolerance is tested as an absolute one."""
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics: the average over the calibration batches
    model.train()
    preprocess = models.preprocess_config(arch)
    normalize = models.Normalizer(preprocess.mean, preprocess.std)
    sample = read_eval_image(pthtar2onnx.SAMPLE_IMAGE, SIZE, preprocess)
    with torch.no_grad():
        for _ in range(2):  # images like the ones the export is checked on: the sample and random pixels
            noise = torch.randint(0, 256, (7, 3, SIZE, SIZE), dtype=torch.uint8)
            model(normalize(torch.cat([sample, noise])))
    return model.eval()


def input_dims(path) -> list:
    graph = onnx.load(str(path)).graph
    (tensor,) = graph.input
    assert tensor.name == "actual_input_1" and [o.name for o in graph.output] == ["output1"]
    return [dim.dim_param or dim.dim_value for dim in tensor.type.tensor_type.shape.dim]


def reported_difference(output: str) -> tuple[float, float, float]:
    match = DIFFERENCE.search(output)
    assert match, output
    return float(match[1]), float(match[2]), float(match[3])


@pytest.mark.parametrize("arch", ["inception_v3", "xception"])
def test_our_checkpoint_exports_and_matches(arch, tmp_path, capsys):
    model = calibrated_model(arch)
    # Our schema; Inception's weights include the aux head, which the export must leave out.
    checkpoint = {"format_version": 1, "arch": arch, "epoch": 1, "state_dict": model.state_dict(),
                  "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": SIZE, "best_acc1": 0.0}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    assert pthtar2onnx.main([str(path)]) == 0
    output = capsys.readouterr().out
    onnx_path = tmp_path / f"{arch}.onnx"
    assert onnx_path.is_file()
    assert input_dims(onnx_path) == ["batch", 3, SIZE, SIZE]  # dynamic batch by default
    assert onnx.load(str(onnx_path)).opset_import[0].version == 11
    difference, allowed, largest = reported_difference(output)
    assert largest < 100 and allowed == pytest.approx(1e-3 * max(1.0, largest), rel=0.1)
    assert difference <= 1e-3
    assert "batch of 2" in output  # checked at another batch size than the traced one


def test_modelzoo_checkpoint_with_fixed_batch(tmp_path, capsys):
    model = calibrated_model("xception", num_classes=5)
    state = {"epoch": 150, "arch": "xception", "best_acc1": 78.8, "optimizer": {},
             "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()}}
    path = tmp_path / "model_best.pth.tar"
    torch.save(state, path)
    target = tmp_path / "exported" / "xc.onnx"
    assert pthtar2onnx.main(["--checkpoint", str(path), "--output", str(target), "--batch-size", "1",
                             "--opset", "13", "--image-size", str(SIZE)]) == 0
    assert input_dims(target) == [1, 3, SIZE, SIZE]
    assert onnx.load(str(target)).opset_import[0].version == 13
    assert reported_difference(capsys.readouterr().out)[0] <= 1e-3


def test_bare_state_dict_needs_the_arch(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=3).state_dict(), path)
    assert pthtar2onnx.main([str(path)]) == 1
    assert "give it with -a" in capsys.readouterr().err
    assert pthtar2onnx.main([str(path), "-a", "xception", "--image-size", str(SIZE), "--no-check"]) == 0
    assert (tmp_path / "xception.onnx").is_file()


def test_a_large_difference_fails(tmp_path, monkeypatch, capsys):
    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=3).state_dict(), path)
    monkeypatch.setattr(pthtar2onnx, "export", lambda *args, **kwargs: None)
    monkeypatch.setattr(pthtar2onnx, "verify", lambda *args, **kwargs: (0.5, 2.0))
    assert pthtar2onnx.main([str(path), "-a", "xception", "--image-size", str(SIZE)]) == 1
    assert "differs from PyTorch by 5.00e-01" in capsys.readouterr().err


def test_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        pthtar2onnx.main(["x.pth", "--dynamo", "--opset", "11"])
    assert stop.value.code == 2 and "--dynamo writes opset 18 or newer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pthtar2onnx.main(["x.pth", "--checkpoint", "y.pth"])
    assert "give the checkpoint once" in capsys.readouterr().err


def test_no_checkpoint_gives_the_hint(fresh_checkout, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TEST_OUTPUT_DIR"}
    result = subprocess.run([sys.executable, str(fresh_checkout / "pthtar2onnx.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: no checkpoint found under output, ")


def test_ema_weights_are_exported_unless_asked_not_to(tmp_path, capsys):
    raw, averaged = calibrated_model("xception"), calibrated_model("xception")
    with torch.no_grad():
        averaged.fc.bias.add_(1.0)
    checkpoint = {"arch": "xception", "epoch": 1, "state_dict": raw.state_dict(), "num_classes": 3,
                  "ema_state_dict": averaged.state_dict(), "image_size": SIZE}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    assert pthtar2onnx.main([str(path), "-o", str(tmp_path / "ema.onnx")]) == 0
    assert "EMA weights" in capsys.readouterr().out
    assert pthtar2onnx.main([str(path), "-o", str(tmp_path / "raw.onnx"), "--no-ema"]) == 0
    assert "EMA weights" not in capsys.readouterr().out
    session = {name: __import__("onnxruntime").InferenceSession(str(tmp_path / f"{name}.onnx"))
               for name in ("ema", "raw")}
    batch = torch.randn(1, 3, SIZE, SIZE).numpy()
    (ema_out,), (raw_out,) = (session[name].run(None, {"actual_input_1": batch}) for name in ("ema", "raw"))
    assert abs((ema_out - raw_out).mean() - 1.0) < 1e-4  # the averaged head's bias, +1
