"""pthtar2onnx.py: both architectures export and match onnxruntime; ModelZoo and bare files."""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import models
import pthtar2onnx
from conftest import REPO
from training.data.transforms import read_eval_image


SIZE = 80
REPORT = re.compile(r"on demo/sample.jpg(?: and (\d+) random image\(s\))?: max abs difference ([0-9.e+-]+), "
                    r"([0-9.e+-]+|inf) of the tolerance \(atol ([0-9.e+-]+) \+ rtol ([0-9.e+-]+) x \|logit\|; "
                    r"largest \|logit\| ([0-9.e+-]+)\); "
                    r"top-1 disagreements (\d+)")


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


def reported_check(output: str) -> dict[str, float]:
    match = REPORT.search(output)
    assert match, output
    names = ("images", "difference", "excess", "atol", "rtol", "largest", "disagreements")
    values = {name: float(value or 0) for name, value in zip(names, match.groups())}
    values["images"] += 1  # demo/sample.jpg
    return values


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
    check = reported_check(output)
    assert check["largest"] < 100 and (check["atol"], check["rtol"]) == (1e-2, 1e-3)
    assert check["excess"] <= 1 and check["difference"] <= 1e-2 + 1e-3 * check["largest"]
    assert check["disagreements"] == 0
    assert check["images"] == 2  # checked at another batch size than the traced one


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
    assert reported_check(capsys.readouterr().out)["excess"] <= 1


def test_bare_state_dict_needs_the_arch(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=3).state_dict(), path)
    assert pthtar2onnx.main([str(path)]) == 1
    assert "give it with -a" in capsys.readouterr().err
    assert pthtar2onnx.main([str(path), "-a", "xception", "--image-size", str(SIZE), "--no-check"]) == 0
    assert (tmp_path / "xception.onnx").is_file()


def test_the_tolerance_is_relative_and_absolute_and_top1_must_agree():
    expected = torch.tensor([[10.0, 2.0, 0.0], [1000.0, 999.9999, -5.0]])
    within = expected + torch.tensor([[5e-3, -1e-3, 5e-5], [0.5, -0.5, 4e-3]])  # below atol + rtol |x|
    passed = pthtar2onnx.compare(expected, within, rtol=1e-3, atol=1e-4)
    assert passed.passed and passed.worst_excess <= 1 and passed.largest_logit == 1000
    # The second row's top-1 swapped, but its two logits are within each other's tolerance.
    assert passed.top1_disagreements == 0
    beyond = expected.clone()
    beyond[0, 2] = 2e-4  # an absolute 2e-4 on a zero logit: twice atol
    failed = pthtar2onnx.compare(expected, beyond, rtol=1e-3, atol=1e-4)
    assert not failed.passed and failed.worst_excess == pytest.approx(2.0)
    swapped = expected.clone()
    swapped[0] = torch.tensor([2.0, 10.0, 0.0])  # a clear top-1 swapped
    assert pthtar2onnx.compare(expected, swapped, rtol=1e-3, atol=1e-2).top1_disagreements == 1
    exact = pthtar2onnx.compare(expected, expected.clone(), rtol=0.0, atol=0.0)
    assert exact.passed and exact.worst_excess == 0


def test_the_file_is_replaced_only_by_a_checked_export(tmp_path, capsys):
    model = calibrated_model("xception")
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "xception", "epoch": 1, "state_dict": model.state_dict(), "num_classes": 3,
                "image_size": SIZE}, path)
    target = tmp_path / "deployed.onnx"
    previous = os.umask(0o027)
    try:
        assert pthtar2onnx.main([str(path), "-o", str(target)]) == 0
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o640  # the umask's mode, as a plain open() gives
    written = target.read_bytes()
    capsys.readouterr()
    # A zero tolerance: two runtimes' float32 rounding differs somewhere, so the check fails for real.
    assert pthtar2onnx.main([str(path), "-o", str(target), "--rtol", "0", "--atol", "0"]) == 1
    captured = capsys.readouterr()
    assert reported_check(captured.out)["excess"] > 1
    assert captured.err.strip() == (f"error: the ONNX model differs from PyTorch beyond the tolerance (inf x it, 0 "
                                    f"top-1 disagreements); nothing was written to {target}")
    assert target.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar", "deployed.onnx"]  # no leftovers


def test_a_full_disk_leaves_the_previous_file_and_no_partial_one(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=3).state_dict(), path)
    target = tmp_path / "xception.onnx"
    target.write_bytes(b"the model deployed yesterday")

    def small_disk() -> None:  # writes beyond 1 MB fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    result = subprocess.run([sys.executable, str(REPO / "pthtar2onnx.py"), str(path), "-a", "xception",
                             "--image-size", str(SIZE)], capture_output=True, text=True, timeout=300,
                            preexec_fn=small_disk)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == f"error: cannot write {target}: File too large; nothing was written to it"
    assert target.read_bytes() == b"the model deployed yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth", "xception.onnx"]


def test_an_export_killed_mid_write_leaves_a_temporary_file_the_next_one_removes(tmp_path):
    """kill -9 while the ONNX file is written (tens of MB for ImageNet's head): the next export
    to the same file removes what the killed one left, and nothing else."""
    import time

    path = tmp_path / "weights.pth"
    torch.save(models.create_model("xception", num_classes=3).state_dict(), path)
    target = tmp_path / "xception.onnx"
    target.write_bytes(b"the model deployed yesterday")
    elsewhere = tmp_path / ".xception.onnx.otherhost-1.0a1b2c3d.tmp"  # another machine's, on shared storage
    elsewhere.write_bytes(b"not ours")
    command = [sys.executable, str(REPO / "pthtar2onnx.py"), str(path), "-a", "xception", "--image-size", str(SIZE)]
    export = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = f".xception.onnx.*-{export.pid}.*.tmp"
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(pattern)) and export.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    export.kill()
    export.wait(timeout=60)
    [left] = tmp_path.glob(pattern)  # the kill came while the file was written
    assert target.read_bytes() == b"the model deployed yesterday"

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not left.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name, "weights.pth", "xception.onnx"]


@pytest.mark.parametrize("argv, expected", [
    (["--dynamo", "--opset", "11"], "--dynamo writes opset 18 or newer; got --opset 11"),
    (["--opset", "21"], "the TorchScript exporter writes opsets 7 to 20; add --dynamo for --opset 21"),
    (["--opset", "99"], "argument --opset: must be 7 to 23, got 99"),
    (["--checkpoint", "y.pth"], "give the checkpoint once: positionally or with --checkpoint"),
    (["--image-size", "0"], "argument --image-size: must be a positive integer, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be a positive integer, got -2"),
    (["--rtol", "-1"], "argument --rtol: must be >= 0, got -1"),
    (["--atol", "nan"], "argument --atol: must be >= 0, got nan"),
    (["-a", "resnet50"], "argument -a/--arch: unknown architecture 'resnet50'; choose one of: inception_v3, xception"),
])
def test_options_are_checked_at_parse_time(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        pthtar2onnx.main(["x.pth", *argv])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pthtar2onnx.py: error: {expected}"


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
    session = {name: onnxruntime.InferenceSession(str(tmp_path / f"{name}.onnx"))
               for name in ("ema", "raw")}
    batch = torch.randn(1, 3, SIZE, SIZE).numpy()
    (ema_out,), (raw_out,) = (session[name].run(None, {"actual_input_1": batch}) for name in ("ema", "raw"))
    assert abs((ema_out - raw_out).mean() - 1.0) < 1e-4  # the averaged head's bias, +1
