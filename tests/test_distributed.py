"""Distributed runs on CPU (gloo, 127.0.0.1): torchrun, two "nodes", the ModelZoo
``--multiprocessing-distributed`` way, exact distributed validation, and faults.

Every test launches real processes (``python -m torch.distributed.run ... main.py``), so
each one takes tens of seconds on two cores; the settings are the tiniest that still
train (75-pixel images, 2 images per device, 2 steps).
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from awkward_files import add_awkward_files
from conftest import TINY_IMAGE_SIZE, free_port, metrics_of, run_main
from processes import finish, launch, main_command, run_to_end, wait_for_file, wait_for_line, worker_of
from training import checkpoint as checkpoints
from training.data.imagefolder import build_datasets, build_loader
from training.data.sampling import EvalShardSampler
from training.data.embedded import make_imagefolder
from training.metrics import setup_logging
from training.data.device_loader import DeviceLoader

def tiny_args(data: Path, output: Path, arch: str = "xception", *extra: str) -> list[str]:
    """main.py options for a run of two 2-image steps per device (lr kept small: no NaN)."""
    return ["-a", arch, "--data", str(data), "--output_dir", str(output), "--image-size", str(TINY_IMAGE_SIZE),
            "-b", "2", "--workers", "0", "--max-steps", "2", "--epochs", "1", "--seed", "0", "--lr", "0.01",
            "--warm_up_epochs", "0", "--print-freq", "1", "--progress", "lines", *extra]


def torchrun_command(*main_args: str, nproc: int = 2, rendezvous: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rendezvous,
            "main.py", *[str(a) for a in main_args]]


def assert_rank0_outputs(output: Path) -> None:
    """One set of outputs, written by rank 0 alone: no duplicate TensorBoard files."""
    names = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
    boards = [n for n in names if n.startswith("events.out.tfevents")]
    assert {"args.json", "metrics.jsonl", checkpoints.LAST_NAME, checkpoints.BEST_NAME} <= set(names), names
    assert len(boards) <= 1, names
    assert len(metrics_of(output)) == 1  # one record per epoch, not one per rank


def single_process_evaluation(data: Path, checkpoint: Path, output: Path, arch: str, *extra: str) -> dict:
    result = run_main("-a", arch, "--data", data, "--image-size", TINY_IMAGE_SIZE, "-b", "4", "-j", "0",
                      "-e", "--resume", checkpoint, "--output_dir", output, *extra)
    assert result.code == 0, result.output
    [record] = metrics_of(output)
    return record


# -- torchrun, two processes on one node -------------------------------------------------

@pytest.fixture(scope="module")
def eval_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """An xception checkpoint with varied predictions on the tiny data (Acc@1 8/15, Acc@5 12/15).

    A network trained for a few steps predicts one class everywhere, which would make any
    sharding look exact. Instead: random weights, BatchNorm statistics measured on the
    training images, and a nearest-class-mean head for the three classes among ten
    outputs (so that Acc@5 is not trivially 100 %). Top-k margins stay above 0.01, far
    from the rounding differences that batch composition causes.
    """
    torch.manual_seed(0)
    model = models.create_model("xception", num_classes=10)
    preprocess = models.preprocess_config("xception")
    train_set, _ = build_datasets(tiny_data, TINY_IMAGE_SIZE, preprocess)
    loader = build_loader(train_set, len(train_set), EvalShardSampler(len(train_set)), train=False, workers=0)
    [(images, labels, _)] = DeviceLoader(loader, "cpu", models.Normalizer(preprocess.mean, preprocess.std))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over what it sees
    features = []
    model.fc.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        model.train()(images)
        model.eval()(images)
        centre = features[-1].mean(0)
        centred = features[-1] - centre
        means = torch.stack([centred[labels == c].mean(0) for c in range(len(train_set.classes))])
        weight = 3 * means / means.norm(dim=1, keepdim=True) / centred.norm(dim=1).mean()
        model.fc.weight[:len(means)] = weight
        model.fc.bias[:len(means)] = -weight @ centre
    path = tmp_path_factory.mktemp("eval-checkpoint") / "calibrated.pth.tar"
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    checkpoints.save_checkpoint({"format_version": checkpoints.FORMAT_VERSION, "arch": "xception", "epoch": 1,
                                 "state_dict": state_dict, "best_acc1": 0.0, "num_classes": 10,
                                 "class_names": list(train_set.classes), "image_size": TINY_IMAGE_SIZE}, path)
    return path


def test_torchrun_two_processes_train_and_report_like_one(tiny_data, eval_checkpoint, tmp_path):
    """Both ranks train; rank 0 alone writes; the validation reported during training is
    what one process reports on the saved weights, BatchNorm statistics included (each
    rank's forward updates its own; starting from weights with clear predictions shows it)."""
    output = tmp_path / "out"
    start = ("--pretrained", eval_checkpoint, "--num-classes", "10")
    code, log = run_to_end(torchrun_command(*tiny_args(tiny_data, output, "xception", *start)), tmp_path / "log")
    assert code == 0, log
    assert_rank0_outputs(output)
    [record] = metrics_of(output)
    assert record["world_size"] == 2 and record["batch_size"] == 2 and record["global_batch_size"] == 4
    assert record["train_steps"] == 2 and record["train_images"] == 8  # 2 steps x 2 images x 2 ranks
    assert record["val_images"] == 15  # every val image once, though 15 is odd
    assert 0 < record["fps_per_device"] < record["fps"]  # fps is the job's, summed over ranks
    assert "\nbatch size 2 per device x 2 = 4 global" in log
    assert "\n[cpu id: 0 ] * FPS@all " in log and "\n * Acc@1 " in log  # bare, for the ModelZoo parsers

    alone = single_process_evaluation(tiny_data, output / checkpoints.LAST_NAME, tmp_path / "eval", "xception",
                                      "--num-classes", "10")
    assert (alone["val_acc1"], alone["val_acc5"]) == (record["val_acc1"], record["val_acc5"])
    assert alone["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5)


# -- validation: exact across world sizes -------------------------------------------------

def evaluations_on_2_and_3_processes(data, checkpoint, tmp_path, *extra):
    """``main.py -e`` of ``checkpoint`` under torchrun: 2 ranks in batches of 7 (8+7 images, so
    the ranks run 2 and 1 batches), 3 ranks in batches of 4; yields (processes, record, log)."""
    for nproc, batch in ((2, 7), (3, 4)):
        output = tmp_path / str(nproc)
        command = torchrun_command("-a", "xception", "--data", data, "--image-size", TINY_IMAGE_SIZE,
                                   "-b", batch, "-j", "0", "-e", "--resume", checkpoint, "--output_dir", output,
                                   *extra, nproc=nproc)
        code, log = run_to_end(command, tmp_path / f"{nproc}.log")
        assert code == 0, log
        [record] = metrics_of(output)
        yield nproc, record, log


def test_validation_is_identical_on_1_2_and_3_processes(tiny_data, eval_checkpoint, tmp_path):
    """15 val images: 1 rank in batches of 4; 2 ranks with 8+7 images in batches of 7 (so
    the ranks run 2 and 1 batches); 3 ranks with 5+5+5 in batches of 4. Same counts."""
    extra = ("--num-classes", "10")
    alone = single_process_evaluation(tiny_data, eval_checkpoint, tmp_path / "1", "xception", *extra)
    assert alone["val_images"] == 15
    assert 0 < alone["val_acc1"] < alone["val_acc5"] < 100, alone  # predictions that sharding could change
    for nproc, record, log in evaluations_on_2_and_3_processes(tiny_data, eval_checkpoint, tmp_path, *extra):
        assert record["val_images"] == 15, record
        assert (record["val_acc1"], record["val_acc5"]) == (alone["val_acc1"], alone["val_acc5"]), (nproc, record)
        assert record["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
        assert f"\n * Acc@1 {alone['val_acc1']:.3f} Acc@5 {alone['val_acc5']:.3f}" in log


# -- several nodes, and the ModelZoo launcher ---------------------------------------------

def test_two_nodes_on_localhost(tiny_data, tmp_path):
    """torchrun --nnodes 2 with node ranks 0 and 1, one process each, both on 127.0.0.1."""
    output, port = tmp_path / "out", free_port()
    nodes = []
    for node in (0, 1):
        rendezvous = ("--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                      "--master_port", str(port))
        command = torchrun_command(*tiny_args(tiny_data, output, "inception_v3"), nproc=1, rendezvous=rendezvous)
        log = tmp_path / f"node{node}.log"
        nodes.append((launch(command, log), log))
    outputs = [finish(process, log) for process, log in nodes]
    for (process, _), text in zip(nodes, outputs):
        assert process.returncode == 0, text
    assert_rank0_outputs(output)
    [record] = metrics_of(output)
    assert record["world_size"] == 2 and record["train_images"] == 8 and record["val_images"] == 15
    assert "network: inception_v3" in outputs[0] and "network:" not in outputs[1]


def test_modelzoo_multiprocessing_distributed_device_list(tiny_data, tmp_path):
    """``--multiprocessing-distributed --device_list 0,1`` spawns two CPU processes; ``-b`` is the
    node's batch, split between them, as ModelZoo's main.py does."""
    output = tmp_path / "out"
    command = [sys.executable, "main.py", *tiny_args(tiny_data, output), "-b", "4", "--multiprocessing-distributed",
               "--device_list", "0,1", "--addr", "127.0.0.1", "--port", str(free_port())]
    code, log = run_to_end(command, tmp_path / "log")
    assert code == 0, log
    assert_rank0_outputs(output)
    [record] = metrics_of(output)
    assert record["world_size"] == 2 and record["train_images"] == 8 and record["val_images"] == 15
    assert "network: xception, 3 classes, 24 training images, image size 75, device cpu, 2 process(es)" in log
    assert "-b 4 per node / 2 devices = 2 per device" in log and "batch size 2 per device x 2 = 4 global" in log


# -- faults -------------------------------------------------------------------------------

def test_killed_rank_ends_the_job_with_an_error(tiny_data, tmp_path):
    output = tmp_path / "out"
    log = tmp_path / "log"
    process = launch(torchrun_command(*tiny_args(tiny_data, output, "xception", "--epochs", "50",
                                                 "--dist-timeout", "60")), log)
    wait_for_file(output / "args.json", process, log)  # rank 0 is past start-up and about to train
    worker_of(process, rank=1).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    text = finish(process, log, timeout=120)
    assert process.returncode != 0, text
    assert time.monotonic() - killed < 60, "the surviving rank did not stop within --dist-timeout"


def test_max_restarts_resumes_a_crashed_job(tiny_data, tmp_path):
    """torchrun --max-restarts 1 restarts both workers after a kill; --resume auto picks
    up the last checkpoint and the job ends at the requested epoch count."""
    output = tmp_path / "out"
    log = tmp_path / "log"
    args = tiny_args(tiny_data, output, "xception", "--epochs", "3", "--resume", "auto")
    rendezvous = ("--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--max-restarts", "1")
    process = launch(torchrun_command(*args, rendezvous=rendezvous), log)
    wait_for_file(output / checkpoints.LAST_NAME, process, log)  # epoch 1 is saved
    worker_of(process, rank=1).send_signal(signal.SIGKILL)
    text = finish(process, log)
    assert process.returncode == 0, text
    assert "no checkpoint yet, starting fresh" in text and "--resume auto: resuming from" in text
    epochs = [record["epoch"] for record in metrics_of(output)]
    assert epochs[-1] == 3 and epochs == sorted(set(epochs)), epochs
    assert checkpoints.load_checkpoint(output / checkpoints.LAST_NAME)["epoch"] == 3


# -- in step whatever happens ------------------------------------------------------------------

def test_unreadable_images_keep_ranks_in_step_and_a_recipe_warm_up_learns(tmp_path):
    """Two ranks, broken files among the images, the multi-device recipe's warm-up (5 of 150
    epochs, scaled to this 4-epoch run): full batches on both ranks, replaced images counted,
    and the network learns well above chance."""
    data = make_imagefolder(tmp_path / "data", num_classes=4, train_per_class=24, val_per_class=8,
                            image_size=(84, 84), seed=3)
    add_awkward_files(data, kinds=("corrupt", "garbage"), num_classes=4, size=(84, 84))
    output = tmp_path / "out"
    args = ["-a", "xception", "--data", data, "--output_dir", output, "--image-size", 64, "-b", 8, "-j", 0,
            "--epochs", 4, "--lr", 0.05, "--seed", 1, "--dist-timeout", 120, "--progress", "lines"]
    code, log = run_to_end(torchrun_command(*args), tmp_path / "log")
    assert code == 0, log
    assert "warm-up scaled with the run: the recipe's 5 of 150 epochs -> 0.133 of 4" in log
    records = metrics_of(output)
    assert [r["train_images"] for r in records] == [6 * 8 * 2] * 4  # 98 images / 2 ranks / 8: 6 full steps
    assert sum(r["replaced_images"] for r in records) >= 1 and "replaced unreadable image" in log
    assert max(r["val_acc1"] for r in records) >= 40.0, records  # chance is 25 %


def test_sigterm_stops_every_rank_together(tiny_data, tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = tiny_args(tiny_data, output, "xception", "--epochs", "3", "--max-steps", "6", "--save-every", "0")
    process = launch(torchrun_command(*args), log)
    wait_for_line(r"^Epoch: \[0\]\[1/6\]", process, log)
    worker_of(process, rank=1).send_signal(signal.SIGTERM)  # one rank only: both stop after the same step
    text = finish(process, log)
    assert process.returncode != 0 and "[rank 1] SIGTERM received" in text
    assert "exitcode: 75" in text  # the preempted workers' status, as torchrun reports it
    saved = checkpoints.load_checkpoint(output / checkpoints.LAST_NAME)
    assert saved["epoch"] == 0 and 1 <= saved["step"] < 6
    assert f"at epoch 0 step {saved['step']} of 6" in text


# -- logging ----------------------------------------------------------------------------

def test_warnings_name_their_rank_and_progress_lines_stay_bare(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(rank=1, world_size=2)
        logging.getLogger("training").info("rank 1 prints no progress")
        logging.getLogger("training").warning("replaced unreadable image: x.jpg")
        setup_logging(rank=0, world_size=2)
        logging.getLogger("training").info("[cpu id: 0 ] * FPS@all 1.000")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert capsys.readouterr().out == "[rank 1] replaced unreadable image: x.jpg\n[cpu id: 0 ] * FPS@all 1.000\n"


@pytest.mark.slow
def test_validation_on_shards_is_the_imagefolders_on_1_2_and_3_processes(tiny_data, eval_checkpoint, tmp_path):
    """The sharded copy of the tiny data: the same counts as the ImageFolder on one process."""
    from training.data.shards import convert_imagefolder

    shards = tmp_path / "shards"
    convert_imagefolder(tiny_data, str(shards), chunk_bytes="20KB")
    extra = ("--num-classes", "10")
    alone = single_process_evaluation(tiny_data, eval_checkpoint, tmp_path / "folder", "xception", *extra)
    on_shards = single_process_evaluation(shards, eval_checkpoint, tmp_path / "1", "xception", *extra)
    assert (on_shards["val_images"], on_shards["val_acc1"], on_shards["val_acc5"]) == \
        (15, alone["val_acc1"], alone["val_acc5"])
    for nproc, record, _ in evaluations_on_2_and_3_processes(shards, eval_checkpoint, tmp_path, *extra):
        assert (record["val_images"], record["val_acc1"], record["val_acc5"]) == \
            (15, alone["val_acc1"], alone["val_acc5"]), (nproc, record)


# -- a cluster's environment without a launcher ---------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not: start the processes with torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK=1 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not a whole number >= 1"),
    ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=5 is outside 0..1 (WORLD_SIZE=2)"),
])
def test_a_clusters_variables_without_a_launcher_are_one_line(env, expected, tiny_data, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_main(*tiny_args(tiny_data, tmp_path / "out"))
    assert result.code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {expected}"), line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_peer_that_never_starts_is_one_line_after_the_timeout(tiny_data, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    code, text = run_to_end(main_command(*tiny_args(tiny_data, tmp_path / "out"), "--dist-timeout", "3"),
                            tmp_path / "log", **env)
    assert code == 1 and "Traceback" not in text, text
    [line] = [line for line in text.splitlines() if "error: " in line]
    assert "error: rank 0: the 2 processes of the job did not form a process group (--dist-timeout 3s): " in line
    assert line.endswith(f"check that every rank 0..1 was started and can reach 127.0.0.1:{env['MASTER_PORT']}")
