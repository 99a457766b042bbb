"""bench/acceptance.py, the command that proves a new machine: its quick mode passes on this
CPU with every report field filled in, a failing check makes it fail, and what it decides
for GPUs and NPUs follows their capability rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from processes import finish, launch
from bench import acceptance
from bench.acceptance_checks import (CHECKS, CheckFailed, CheckSettings, same_evaluation, skip_reasons, weight_distance,
                                     within_spread)

ACCEPTANCE = REPO / "bench" / "acceptance.py"


def run_acceptance(output: Path, *options: str) -> tuple[int, str, dict]:
    """bench/acceptance.py on the CPU as a process; its exit status, console output and report."""
    log = output.parent / f"{output.name}.log"
    process = launch([sys.executable, str(ACCEPTANCE), "--output", str(output), "--device", "cpu", *options], log)
    text = finish(process, log, timeout=900)
    return process.returncode, text, json.loads((output / "report.json").read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.mark.slow
def test_quick_mode_proves_this_cpu(tmp_path):
    output = tmp_path / "acceptance"
    code, text, report = run_acceptance(output, "--quick", "--jobs", "2")
    assert code == 0, text[-4000:]
    head = report["acceptance"]
    assert (head["mode"], head["passed"], head["exit_status"]) == ("quick", True, 0)
    machine = report["machine"]
    assert machine["versions"]["torch"] == torch.__version__ and machine["versions"]["onnxruntime"]
    assert machine["devices"]["type"] == "cpu" and machine["capabilities"]["device_type"] == "cpu"
    assert machine["host_cpu"] and positive(machine["cpus"]) and positive(machine["memory_gib"])

    checks = {check["name"]: check for check in report["correctness"]["checks"]}
    assert list(checks) == list(CHECKS) and report["correctness"]["passed"]
    assert checks["compile"]["status"] == "skipped" and "quick mode" in checks["compile"]["detail"]
    for name, check in checks.items():
        if name != "compile":
            assert check["status"] == "passed", check
            assert positive(check["seconds"]) and all(Path(folder).is_dir() for folder in check["folders"]), check
    for name in ("fp16_static", "fp16_dynamic", "bf16"):  # autocast really ran: the arithmetic differs
        assert 0 < checks[name]["figures"]["first_step_relative_difference"], checks[name]
    resume = checks["kill_resume"]["figures"]
    assert resume["weight_distance"] == 0.0 and 0 < resume["killed_at_step"] < resume["steps"]
    assert (output / "checks" / "eval_processes" / "run" / "2-process" / "metrics.jsonl").is_file()
    assert (output / "checks" / "onnx_export" / "xception.onnx").is_file()

    parts = report["speed"]["parts"]
    assert not [part for part, value in parts.items() if "error" in value], parts
    assert positive(parts["matmul_peak"]["result"]["float32"])
    for arch in ("inception_v3", "xception"):
        step = parts["train_step"]["result"][arch]
        assert set(step["batch_sizes"]) == {"2", "4"} and step["batch_size"] in (2, 4)
        for key in ("images_per_second", "mfu", "flops_per_image", "peak_host_rss_bytes"):
            assert positive(step[key]), (arch, key, step[key])
        assert step["peak_device_bytes"] is None  # a CPU has no separate device memory
        assert positive(parts["evaluation"]["result"][arch]["images_per_second"])
    e2e = parts["end_to_end"]["result"]
    assert positive(e2e["jpeg"]["fps"]) and positive(e2e["synthetic"]["fps"]) and positive(e2e["ratio"])
    assert [row["workers"] for row in parts["loader"]["result"]] == [0, 1]
    assert all(positive(row["images_per_second"]) for row in parts["loader"]["result"])
    assert {"data", "correctness", "train_step", "end_to_end", "loader"} <= set(report["budget"])

    markdown = (output / "report.md").read_text()
    assert markdown.startswith("# Acceptance report: PASSED")
    assert "| kill_resume | passed |" in markdown and "| compile | skipped |" in markdown
    assert "Training step at 75 px" in markdown and "DataLoader to the device" in markdown


def test_a_failing_check_fails_the_acceptance(tmp_path):
    """A learning rate that makes the loss NaN: main.py stops, the fp32 check fails, exit 1."""
    output = tmp_path / "acceptance"
    code, text, report = run_acceptance(output, "--quick", "--only", "fp32", "--main-flags=--lr=1e6")
    assert code == 1, text[-4000:]
    assert report["acceptance"]["passed"] is False and report["speed"]["skipped"]
    [check] = report["correctness"]["checks"]
    assert check["status"] == "failed" and "fp32 run: exit status 1: error:" in check["detail"], check  # main.py's line
    assert (output / "report.md").read_text().startswith("# Acceptance report: FAILED")


def test_an_earlier_acceptance_is_replaced_only_on_request(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        acceptance.parse(["--output", str(tmp_path)])
    assert stop.value.code == 2 and "holds an earlier acceptance (report.json)" in capsys.readouterr().err
    acceptance.parse(["--output", str(tmp_path), "--overwrite"])
    assert not (tmp_path / "report.json").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_only_takes_check_names_and_speed(tmp_path, capsys):
    args = acceptance.parse(["--output", str(tmp_path / "a"), "--only", "speed,kill_resume"])
    assert (args.checks, args.speed) == (["kill_resume"], True)
    with pytest.raises(SystemExit):
        acceptance.parse(["--output", str(tmp_path / "b"), "--only", "fp64"])
    assert "--only: unknown fp64" in capsys.readouterr().err


def test_accelerator_decisions_follow_the_capability_rows():
    # NCCL and HCCL need a device per process; gloo lets processes share the CPU.
    assert acceptance.two_processes_refusal("cpu") is None
    assert acceptance.two_processes_refusal("cuda") == "needs 2 cuda devices, this machine has 0"
    assert acceptance.measured_flags("cuda") == acceptance.measured_flags("npu") == ("--amp",)  # fp16 AMP
    npu = CheckSettings(device_type="npu", arch="xception", image_size=48, batch_size=4, steps=4, val_images=15,
                        workers=0, save_every_steps=1, run_timeout=60, fp16_unsupported=None, bf16_supported=True,
                        channels_last_allowed=False, two_processes=None, compile_skipped=None)
    assert set(skip_reasons(npu)) == {"channels_last"}


def test_resumed_weights_are_compared_bit_for_bit():
    weights = {"conv.weight": torch.randn(8, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(4)}
    assert weight_distance({k: v.clone() for k, v in weights.items()}, weights) == 0.0
    nudged = {**weights, "conv.weight": torch.nextafter(weights["conv.weight"], torch.tensor(float("inf")))}
    assert 0 < weight_distance(nudged, weights) < 1e-6  # one ulp is a difference
    assert weight_distance({**weights, "bn.num_batches_tracked": torch.tensor(5)}, weights) > 0


def test_a_resumed_run_may_differ_only_as_much_as_uninterrupted_runs_do():
    within_spread(0.0, 0.0)  # bit-identical
    within_spread(3e-6, 1e-6)  # a device whose kernels are not deterministic
    for distance, spread in ((1e-7, 0.0), (2e-5, 1e-6)):  # deterministic device; far beyond the spread
        with pytest.raises(CheckFailed, match="resumed weights"):
            within_spread(distance, spread)


def test_the_same_weights_evaluate_the_same():
    reference = {"val_images": 15, "val_acc1": 20.0, "val_acc5": 100.0, "val_loss": 1.5}
    same_evaluation("2 processes", dict(reference), reference, "1 process")
    # Other kernels (the loss differs in its last digits) may tip one near tie, never two.
    same_evaluation("2 processes", {**reference, "val_loss": 1.5001, "val_acc1": 20.0 + 100 / 15}, reference, "1")
    for changed in ({"val_images": 14}, {"val_acc1": 20.0 + 100 / 15}, {"val_loss": 1.6},
                    {"val_loss": 1.5001, "val_acc1": 20.0 + 200 / 15}):
        with pytest.raises(CheckFailed):
            same_evaluation("2 processes", {**reference, **changed}, reference, "1 process")


def test_the_wrapper_script_runs_the_acceptance(tmp_path):
    # PYTHON=echo shows the command the script runs, without running it.
    result = subprocess.run(["bash", str(REPO / "test" / "acceptance.sh"), "--quick"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": "echo", "TEST_OUTPUT_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    script, option, output, *rest = result.stdout.split()
    assert Path(script) == ACCEPTANCE and option == "--output" and rest == ["--quick"]
    assert Path(output).parent == tmp_path and Path(output).name.startswith("acceptance-")
