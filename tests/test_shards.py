"""The sharded format: conversion round trip, the same tensors as the ImageFolder, equal batches
per rank, step-exact resume after kill -9, and s3:// against a local S3-compatible server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awkward_files import add_awkward_files
from conftest import REPO, metrics_of, quick_args, run_main
from processes import launch, main_command, run_to_end, wait_for_line
from training.checkpoint import load_checkpoint
from training.data import DataSettings, DeviceTransfer, build_loaders
from training.data.embedded import default_cache_dir, make_imagefolder
from training.data.imagefolder import build_datasets, build_transforms
from training.data.sampling import SampleKey
from training.data.shards import ShardError, build_shard_datasets, convert_imagefolder, training_order
from training.distributed import Topology
from models.preprocess import INCEPTION_V3

SHARD_SEED = 3


@pytest.fixture(scope="module")
def awkward_data(tmp_path_factory) -> Path:
    """2 classes, odd colour modes and broken files among the training images."""
    root = make_imagefolder(tmp_path_factory.mktemp("awkward") / "data", 2, 5, 3, image_size=(60, 50), seed=2)
    add_awkward_files(root, num_classes=2)
    return root


@pytest.fixture(scope="module")
def tiny_shards(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards") / "tiny"
    convert_imagefolder(tiny_data, str(output), seed=SHARD_SEED, chunk_bytes="20KB")  # several chunks
    return output


def test_conversion_keeps_bytes_labels_classes_and_orders(awkward_data, tmp_path):
    output = tmp_path / "shards"
    metadata = convert_imagefolder(awkward_data, str(output), seed=SHARD_SEED, chunk_bytes="10KB")
    train, val = build_datasets(awkward_data, 32, INCEPTION_V3)
    assert metadata.classes == train.classes and metadata.images == {"train": len(train), "val": len(val)}
    assert len(list((output / "train").glob("chunk-*.bin"))) > 1
    transforms = build_transforms(32, INCEPTION_V3)
    shard_train, shard_val = build_shard_datasets(str(output), transforms)
    for folder, shards in ((train, shard_train), (val, shard_val)):
        for index, (path, label) in enumerate(folder.samples):
            record = shards.record(index)
            assert (record["index"], record["label"]) == (index, label)
            assert bytes(record["image"]) == Path(path).read_bytes()  # never re-encoded
    from litdata import StreamingDataset

    stored = [record["index"] for record in StreamingDataset(str(output / "train"))]
    assert stored == training_order(len(train), SHARD_SEED) and stored != sorted(stored)  # a seeded shuffle
    assert [record["index"] for record in StreamingDataset(str(output / "val"))] == list(range(len(val)))


def test_same_sample_and_seed_give_the_same_tensor_as_the_imagefolder(awkward_data, tmp_path):
    output = tmp_path / "shards"
    convert_imagefolder(awkward_data, str(output), seed=SHARD_SEED)
    folder_train, folder_val = build_datasets(awkward_data, 32, INCEPTION_V3)
    shard_train, shard_val = build_shard_datasets(str(output), build_transforms(32, INCEPTION_V3))
    replaced = 0
    for index in range(len(folder_train)):
        key = SampleKey(index, seed=1000 + index)
        ours, theirs = shard_train[key], folder_train[key]
        assert ours[0].dtype == torch.uint8 and torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]
        replaced += ours[2] is not None  # broken images: replaced by the same sample in both formats
    assert replaced == 2
    for index in range(len(folder_val)):
        assert torch.equal(shard_val[index][0], folder_val[index][0])


def test_a_partial_or_finished_destination_is_refused_unless_overwritten(tiny_data, tmp_path):
    output = tmp_path / "shards"
    (output / "train").mkdir(parents=True)
    (output / "train" / "chunk-0-0.bin").write_bytes(b"half")  # a conversion killed half-way
    with pytest.raises(ShardError, match=f"{output} already holds a conversion that did not finish; "
                                         f"pass --overwrite"):
        convert_imagefolder(tiny_data, str(output))
    convert_imagefolder(tiny_data, str(output), overwrite=True)
    with pytest.raises(ShardError, match="already holds a converted data set"):
        convert_imagefolder(tiny_data, str(output))


def test_a_class_mismatch_is_refused_like_training_on_the_folder(tmp_path):
    data = make_imagefolder(tmp_path / "data", 2, 1, 1, image_size=16)
    (data / "val" / "class_01").rename(data / "val" / "class_99")
    with pytest.raises(Exception, match="only in train: class_01; only in val: class_99"):
        convert_imagefolder(data, str(tmp_path / "shards"))
    assert not (tmp_path / "shards").exists()


def test_without_litdata_one_line_says_what_to_install(tiny_data, tmp_path):
    code = ("import sys; sys.modules['litdata'] = None; import shard_dataset; "
            f"sys.exit(shard_dataset.main(['--data', {str(tiny_data)!r}, '--output', {str(tmp_path / 'o')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: the sharded data format needs litdata: pip install litdata==0.2.76"


@pytest.mark.parametrize("processes", [2, 3])
def test_every_rank_gets_the_same_number_of_batches(tiny_shards, processes):
    """24 training images, batches of 4: 2 ranks x 3 batches, 3 ranks x 2 batches (less than one
    global batch left out); validation split without padding."""
    settings = DataSettings(root=str(tiny_shards), image_size=32, batch_size=4, workers=0)
    counts, val_images = [], 0
    for rank in range(processes):
        topology = Topology(process_rank=rank, process_count=processes, local_rank=rank,
                            local_process_count=processes)
        loaders = build_loaders(settings, INCEPTION_V3, topology, DeviceTransfer(torch.device("cpu")), seed=0)
        counts.append(len(loaders.train))
        val_images += sum(len(labels) for _, labels, _ in loaders.val)
    assert len(set(counts)) == 1 and 24 - counts[0] * 4 * processes < 4 * processes
    assert val_images == 15


# -- resume -------------------------------------------------------------------------------------

def resume_args(data, output, *extra) -> list[str]:
    """2 epochs of 3 steps of 2 images, a checkpoint every 2 steps."""
    return ["-a", "xception", "--data", str(data), "--output_dir", str(output), "--image-size", "48", "-b", "2",
            "--max-steps", "3", "--epochs", "2", "--seed", "0", "--lr", "0.01", "--print-freq", "1",
            "--progress", "lines", "--save-every-steps", "2", *extra]


@pytest.fixture(scope="module")
def straight_on_folder(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("straight")
    code, text = run_to_end(main_command(*resume_args(tiny_data, output, "-j", "0")), output / "log")
    assert code == 0, text
    return output


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_mid_epoch_then_resume_on_shards_gives_identical_weights(workers, tiny_shards, straight_on_folder,
                                                                        tmp_path):
    output, log = tmp_path / "out", tmp_path / "log"
    args = resume_args(tiny_shards, output, "-j", workers)
    process = launch(main_command(*args), log)
    wait_for_line(r"saved .*checkpoint\.pth\.tar at epoch 1 step 2 of 3", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    code, text = run_to_end(main_command(*args, "--resume", "auto"), tmp_path / "resumed.log")
    assert code == 0, text
    assert "epoch 1, step 2 of 3" in text
    ours = load_checkpoint(output / "checkpoint.pth.tar")["state_dict"]
    straight = load_checkpoint(straight_on_folder / "checkpoint.pth.tar")["state_dict"]
    assert all(torch.equal(ours[key], straight[key]) for key in straight)  # and the same as the ImageFolder's


# -- object storage -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3-compatible server (moto) on 127.0.0.1 and an ephemeral port, with a bucket ``data``;
    AWS_ENDPOINT_URL points every client of this process and its children there."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    scheme = "http"  # moto serves plain HTTP
    environment = {"AWS_ENDPOINT_URL": f"{scheme}://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        boto3.client("s3").create_bucket(Bucket="data")
        yield environment["AWS_ENDPOINT_URL"]
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def run_caches() -> Path:
    return default_cache_dir() / "shards"


@pytest.mark.slow
def test_s3_conversion_and_evaluation_after_a_crash(s3_endpoint, tiny_data, trained_checkpoint, tmp_path):
    import shard_dataset

    assert shard_dataset.main(["--data", str(tiny_data), "--output", "s3://data/tiny", "--chunk-bytes", "20KB"]) == 0
    evaluate = ("-e", "--resume", trained_checkpoint, "-b", "1", "--print-freq", "1", "--progress", "lines")
    # A run reading from the bucket, killed mid-validation, leaves its cache folder behind.
    log = tmp_path / "crashed.log"
    process = launch(main_command(*quick_args("s3://data/tiny", tmp_path / "crashed"), *evaluate), log)
    wait_for_line(r"Test: \[ ?2/15\]", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stale = run_caches() / f"{socket.gethostname()}-{process.pid}"
    assert stale.is_dir()

    result = run_main(*quick_args("s3://data/tiny", tmp_path / "s3"), *evaluate)
    assert result.code == 0, result.output
    assert not stale.exists()  # a crashed run's cache is removed, never waited on
    ours = run_caches() / f"{socket.gethostname()}-{os.getpid()}"
    held = sum(path.stat().st_size for path in ours.rglob("*") if path.is_file())
    assert 0 < held < 16_000  # the index only: images are read by ranged requests, never cached
    folder = run_main(*quick_args(tiny_data, tmp_path / "folder"), *evaluate)
    assert folder.code == 0, folder.output
    [on_s3], [on_disk] = metrics_of(tmp_path / "s3"), metrics_of(tmp_path / "folder")
    assert on_s3["val_images"] == on_disk["val_images"] == 15
    assert (on_s3["val_acc1"], on_s3["val_acc5"]) == (on_disk["val_acc1"], on_disk["val_acc5"])


def test_a_bucket_without_a_converted_data_set_is_one_line(s3_endpoint, tmp_path):
    result = run_main(*quick_args("s3://data/nothing-here", tmp_path / "out"))
    assert result.code == 1
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot read s3://data/nothing-here/shards.json: ")
