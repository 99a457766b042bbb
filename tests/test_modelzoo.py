"""Coming from ModelZoo: upstream's own command lines run through our main.py, upstream's own
log parsers read our logs, and the seeds' sequence (8p script, demo.py, pthtar2onnx.py) works
from a fresh checkout.

The command lines are those of the upstream test scripts (tests/upstream_commands.py), with
the data path, the device (CPU, gloo, two processes instead of eight) and a free port
swapped in, and tiny sizes appended (the last occurrence of an option wins).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, metrics_of, run_main
from processes import finish, launch, run_together
from training.options import parse_command_line
from upstream_commands import UPSTREAM, extract, load_fixture, replay

COMMANDS = {entry.script: entry for entry in load_fixture()}
# The accuracy parser of every upstream script.
ACCURACY_PARSER = "grep -a '* Acc@1' LOG|awk 'END {print}'|awk -F \"Acc@1\" '{print $NF}'|awk -F \" \" '{print $1}'"
TINY = ["--image-size", "75", "-b", "4", "-j", "0", "--epochs", "1", "--max-steps", "2", "--print-freq", "1",
        "--progress", "lines"]


def short(script: str) -> str:
    network, _, name = script.split("/")
    return f"{network.split('_')[0]}/{name}"


def values(tiny_data: Path, **extra: object) -> dict[str, str]:
    return {"data_path": str(tiny_data), "device_id": "0", "ASCEND_DEVICE_ID": "0", "i": "0", "nnodes": "1",
            "node_rank": "0", "master_addr": "127.0.0.1", "one_node_ip": "127.0.0.1", "server_index": "0",
            **{key: str(value) for key, value in extra.items()}}


def entry_point(script: str) -> str:
    return "main-8p.py" if "main-8p.py" in COMMANDS[script].command else "main.py"


def run_upstream(script: str, tiny_data: Path, output: Path, log: Path, extra: list[str] = (),
                 **variables: object) -> tuple[int, str]:
    argv = replay(COMMANDS[script], values(tiny_data, **variables), free_port())
    process = launch([sys.executable, entry_point(script), *argv, *TINY, *extra, "--output_dir", str(output)], log)
    text = finish(process, log)
    return process.returncode, text


# -- the command lines ----------------------------------------------------------------------

def test_the_fixture_holds_upstreams_command_lines():
    assert UPSTREAM.is_dir(), f"the upstream scripts are expected in {UPSTREAM}"
    assert extract() == load_fixture()
    assert len(COMMANDS) == 12


@pytest.mark.parametrize("script", sorted(COMMANDS), ids=short)
def test_every_upstream_line_parses(script, tiny_data):
    argv = replay(COMMANDS[script], values(tiny_data, resume="x.pth.tar", resume_pth="x.pth.tar"), 29500)
    args = parse_command_line(argv).args
    assert args.data == str(tiny_data)
    assert args.arch == ("xception" if "-a xception" in COMMANDS[script].command else "inception_v3")


def test_inception_1p_line_and_the_parsers_of_its_script(tiny_data, tmp_path):
    script = "InceptionV3_ID1596_for_PyTorch/test/train_performance_1p.sh"
    log, output = tmp_path / "train_0.log", tmp_path / "out"
    code, text = run_upstream(script, tiny_data, output, log)
    assert code == 0, text
    [record] = metrics_of(output)
    fps = parse(log, "grep \"FPS@all\" LOG | awk '{print $7}' | tail -1")
    accuracy = parse(log, ACCURACY_PARSER)
    losses = parse(log, "grep Epoch: LOG|grep -v Test|awk -F \"Loss\" '{print $NF}' | awk -F \" \" '{print $1}'")
    assert fps == f"{record['fps']:.3f}" and accuracy == f"{record['val_acc1']:.3f}"
    assert len(losses.split()) == 3 and all(float(value) >= 0 for value in losses.split())  # 2 steps + summary
    args = json.loads((output / "args.json").read_text())
    assert (args["lr"], args["weight_decay"], args["label_smoothing"], args["loss_scale"]) == (0.045, 2e-4, 0.1, "1024")


def test_inception_8p_per_device_loop(tiny_data, tmp_path):
    """Upstream's 8p script starts main.py once per device (`--gpu=${i} --multiprocessing-distributed`)."""
    script = "InceptionV3_ID1596_for_PyTorch/test/train_full_8p.sh"
    output, port = tmp_path / "out", free_port()
    commands = [[sys.executable, "main.py", *replay(COMMANDS[script], values(tiny_data, i=device), port), *TINY,
                 "--device_list", "0,1", "--output_dir", str(output)] for device in (0, 1)]
    results = run_together(commands, [tmp_path / f"train_{device}.log" for device in (0, 1)])
    texts = [text for _, text in results]
    assert all(code == 0 for code, _ in results), texts
    [record] = metrics_of(output)
    assert record["world_size"] == 2 and record["batch_size"] == 2  # -b 4 is the node's, as upstream
    assert "batch size 2 per device x 2 = 4 global; lr 1.2" in texts[0]
    assert record["train_images"] == 8 and record["val_images"] == 15


def test_inception_16p_two_nodes(tiny_data, tmp_path):
    script = "InceptionV3_ID1596_for_PyTorch/test/train_performance_16p.sh"
    output, port = tmp_path / "out", free_port()
    commands = [[sys.executable, "main.py", *replay(COMMANDS[script], values(tiny_data, server_index=node), port),
                 *TINY, "--device_list", "0", "--output_dir", str(output)] for node in (0, 1)]
    results = run_together(commands, [tmp_path / f"node{node}.log" for node in (0, 1)])
    assert all(code == 0 for code, _ in results), [text for _, text in results]
    [record] = metrics_of(output)
    assert record["world_size"] == 2 and record["train_images"] == 16  # -b 4 per node, one device each


@pytest.mark.parametrize("script", ["InceptionV3_ID1596_for_PyTorch/test/train_eval_8p.sh",
                                    "Xception_ID1777_for_PyTorch/test/train_eval_8p.sh"], ids=short)
def test_eval_lines(script, tiny_data, trained_checkpoint, tmp_path):
    checkpoint = trained_checkpoint
    if "Xception" in script:
        checkpoint = tmp_path / "xception" / "checkpoint.pth.tar"
        result = run_main("-a", "xception", "--data", tiny_data, "--image-size", "75", "-b", "4", "-j", "0",
                          "--epochs", "1", "--max-steps", "1", "--output_dir", checkpoint.parent)
        assert result.code == 0, result.output
    output = tmp_path / "out"
    code, text = run_upstream(script, tiny_data, output, tmp_path / "train_0.log", ["--device_list", "0,1"],
                              resume=checkpoint, resume_pth=checkpoint)
    assert code == 0, text
    [record] = metrics_of(output)
    assert record["mode"] == "evaluate" and record["val_images"] == 15
    accuracy = parse(tmp_path / "train_0.log", ACCURACY_PARSER)
    assert accuracy == f"{record['val_acc1']:.3f}"


def test_xception_8p_line_and_the_parsers_of_its_script(tiny_data, tmp_path):
    script = "Xception_ID1777_for_PyTorch/test/train_full_8p.sh"
    log, output = tmp_path / "train_0.log", tmp_path / "out"
    code, text = run_upstream(script, tiny_data, output, log, ["--device_list", "0,1"])
    assert code == 0, text
    [record] = metrics_of(output)
    assert (record["arch"], record["world_size"], record["batch_size"]) == ("xception", 2, 2)
    fps = parse(log, "grep -a 'FPS' LOG|awk -F \" \" '{print $NF}'|awk 'END {print}'")
    assert fps == f"{record['fps']:.3f}"
    args = json.loads((output / "args.json").read_text())
    assert (args["lr"], args["label_smoothing"], args["warm_up_epochs"]) == (0.8, 0.1, 5)  # upstream's line values


def test_xception_1p_line_with_a_positional_data_path(tiny_data, tmp_path):
    """Upstream's Xception 1p line gives the data set positionally and no -a: it runs, and the
    network it trains (main.py's default, inception_v3) is the first thing the log says."""
    script = "Xception_ID1777_for_PyTorch/test/train_full_1p.sh"
    log, output = tmp_path / "train_0.log", tmp_path / "out"
    code, text = run_upstream(script, tiny_data, output, log)
    assert code == 0, text
    assert text.startswith("network: inception_v3")
    assert metrics_of(output)[0]["arch"] == "inception_v3"


def parse(log: Path, pipeline: str) -> str:
    """Run one of the ModelZoo scripts' shell pipelines on ``log``."""
    result = subprocess.run(["bash", "-c", pipeline.replace("LOG", str(log))], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- the seeds' sequence, from a fresh checkout -------------------------------------------------

def test_the_seed_sequence_train_then_demo_then_export(fresh_checkout, tiny_data):
    """bash test/train_full_8p.sh --data_path=..., then python demo.py, then python pthtar2onnx.py."""
    env = {"RANK_SIZE": "2"}  # two CPU processes instead of eight devices
    process = subprocess.run(["bash", "test/train_full_8p.sh", f"--data_path={tiny_data}", "--",
                              "--epochs", "1", "--image-size", "75", "-b", "4", "-j", "0", "--max-steps", "2",
                              "--lr", "0.01", "--opt-level", "O0"], cwd=fresh_checkout, capture_output=True, text=True,
                             timeout=300, env=_env(env))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    best = fresh_checkout / "test/output/0/InceptionV3_ID1596_for_PyTorch_bs8_2p_acc/model_best.pth.tar"
    assert best.is_file()
    demo = subprocess.run([sys.executable, "demo.py"], cwd=fresh_checkout, capture_output=True, text=True,
                          timeout=120, env=_env({}))
    assert demo.returncode == 0, demo.stderr
    assert f"checkpoint: {best} (inception_v3, epoch 1, 3 classes)" in demo.stdout
    export = subprocess.run([sys.executable, "pthtar2onnx.py"], cwd=fresh_checkout, capture_output=True,
                            text=True, timeout=300, env=_env({}))
    assert export.returncode == 0, export.stderr
    assert (best.parent / "inception_v3.onnx").is_file() and f"checkpoint: {best}" in export.stdout


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("TEST_OUTPUT_DIR", "ASCEND_DEVICE_ID")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}
