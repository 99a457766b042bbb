"""main.py end to end on tiny generated data: training, resume, evaluation, AMP, knobs."""
from __future__ import annotations

import logging

import pytest
import torch

from awkward_files import add_awkward_files
from conftest import metrics_of, quick_args, run_main
from training.checkpoint import load_checkpoint
from training.data.embedded import make_imagefolder
from training.metrics import explain_validation_loss


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
    """4 well-separated classes: enough images for a network from scratch to learn them."""
    return make_imagefolder(tmp_path_factory.mktemp("learnable") / "data", num_classes=4, train_per_class=24,
                            val_per_class=8, image_size=(84, 84), seed=3)


# Inception v3's reference initialisation starts from large logits: it needs a smaller
# learning rate at this tiny batch, and learns more slowly than Xception here.
@pytest.mark.parametrize("arch, lr, epochs", [("inception_v3", "0.01", 5), ("xception", "0.05", 4)])
def test_training_learns_above_chance(arch, lr, epochs, learnable_data, tmp_path):
    args = quick_args(learnable_data, tmp_path, arch, "--epochs", str(epochs), "-b", "8", "--lr", lr,
                      "--warm_up_epochs", "0", "--image-size", "80")
    result = run_main(*args)
    assert result.code == 0, result.output
    records = metrics_of(tmp_path)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert records[-1]["val_images"] == 32
    assert max(r["val_acc1"] for r in records) >= 40.0, records  # chance is 25 %
    assert " * Acc@1 " in result.output and " * FPS@all " in result.output
    best = load_checkpoint(tmp_path / "model_best.pth.tar")
    assert best["best_acc1"] == max(r["val_acc1"] for r in records)
    assert not any(key.startswith("module.") for key in best["state_dict"])


def _weights(path):
    return load_checkpoint(path)["state_dict"]


@pytest.mark.parametrize("arch", ["inception_v3", "xception"])
def test_resume_matches_uninterrupted_run(arch, tiny_data, tmp_path):
    # A constant learning rate, so that a 1-epoch run is the first half of a 2-epoch one.
    common = ["--max-steps", "2", "--lr", "0.01", "--lr-schedule", "step", "--lr-step-epochs", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(*quick_args(tiny_data, straight, arch, *common, "--epochs", "2")).code == 0
    assert run_main(*quick_args(tiny_data, split, arch, *common, "--epochs", "1")).code == 0
    resumed = run_main(*quick_args(tiny_data, split, arch, *common, "--epochs", "2",
                                   "--resume", str(split / "checkpoint.pth.tar")))
    assert resumed.code == 0, resumed.output
    assert "options changed from the checkpoint: epochs 1 -> 2" in resumed.output
    a, b = _weights(straight / "checkpoint.pth.tar"), _weights(split / "checkpoint.pth.tar")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [r["epoch"] for r in metrics_of(split)] == [1, 2]


def test_resume_auto_starts_fresh_then_continues(tiny_data, tmp_path):
    args = quick_args(tiny_data, tmp_path, "xception", "--max-steps", "1", "--resume", "auto")
    first = run_main(*args)
    assert first.code == 0 and "no checkpoint yet" in first.output
    second = run_main(*args[:-4], "--max-steps", "1", "--resume", "auto", "--epochs", "2")
    assert second.code == 0, second.output
    assert "resuming from" in second.output
    assert [r["epoch"] for r in metrics_of(tmp_path)] == [1, 2]


def test_evaluate_only_reports_accuracy(trained_checkpoint, tiny_data, tmp_path):
    result = run_main("-a", "inception_v3", "--data", tiny_data, "--image-size", "75", "-b", "4", "-j", "0",
                      "-e", "--resume", trained_checkpoint, "--output_dir", tmp_path)
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path)
    assert record["mode"] == "evaluate" and record["val_images"] == 15
    assert f" * Acc@1 {record['val_acc1']:.3f} Acc@5 {record['val_acc5']:.3f}" in result.output
    assert not (tmp_path / "checkpoint.pth.tar").exists()
    # What an evaluation depends on, not the training recipe.
    first = result.output.splitlines()[0]
    assert first == (f"evaluating {trained_checkpoint}: inception_v3, 3 classes, image size 75, device cpu, "
                     f"1 process(es)")
    assert "validation: 4 batches of up to 4 images per device; precision: fp32" in result.output
    for training_only in ("recipe ", "lr ", "seed ", "training images", "warm-up"):
        assert training_only not in result.output, training_only


def test_a_validation_loss_far_above_a_uniform_guess_is_explained(caplog):
    with caplog.at_level(logging.INFO):
        explain_validation_loss(21750.7859, 5.34, 10)  # a quick run's first epoch, BatchNorm not settled
        explain_validation_loss(3.1, 0.02, 10)  # overfitting: ordinary, no note
        explain_validation_loss(float("nan"), 5.0, 10)  # non-finite: warned about before the checkpoint
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and notes[0].startswith("note: validation loss 2.175e+04 is over 10 times a uniform "
                                                   "guess's (2.3) while training's is 5.34: in eval mode BatchNorm")


def test_amp_on_cpu_uses_bf16_and_apex_absent_falls_back(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--max-steps", "2", "--amp", "--apex"))
    assert result.code == 0, result.output
    assert "apex is not installed" in result.output
    assert "precision: autocast bf16" in result.output


def test_label_smoothing_zero_and_knobs(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "inception_v3", "--max-steps", "1", "--label-smoothing",
                                  "0", "--nesterov", "--no-bn-weight-decay", "--clip-grad", "1.0",
                                  "--lr-schedule", "step", "--aux-loss-weight", "0"))
    assert result.code == 0, result.output
    saved = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    groups = saved["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [2e-4, 0.0]
    assert all(g["nesterov"] for g in groups)
    assert not any(k.startswith("AuxLogits.") for k in saved["state_dict"])  # aux head off at weight 0


def test_max_steps_caps_each_epoch(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--max-steps", "2", "-b", "2"))
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path)
    assert record["train_steps"] == 2 and record["train_images"] == 4


def test_no_loader_worker_outlives_the_run(tiny_data, tmp_path):
    """Workers ignore SIGTERM (the main process stops a run): left alive, they would keep a
    process that goes on after main(), or its exit, waiting for ever. The run stops them
    itself: nothing relies on the garbage collector (off here, as it may not have run when
    the interpreter exits and multiprocessing joins its children)."""
    import gc
    import multiprocessing

    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--max-steps", "2", "-b", "2",
                                      "--workers", "1"))
        assert result.code == 0, result.output
        assert set(multiprocessing.active_children()) == before
    finally:
        gc.enable()
        for left in set(multiprocessing.active_children()) - before:
            left.kill()  # SIGKILL: a failure here must not hang pytest's own exit as well


def test_non_finite_loss_stops_with_step(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--lr", "1e30", "--max-steps", "6",
                                  "--print-freq", "1", "--warm_up_epochs", "0"))
    assert result.code == 1
    assert "the loss became" in result.output and "step" in result.output
    assert not (tmp_path / "checkpoint.pth.tar").exists()


def test_diverged_weights_are_not_saved(tiny_data, tmp_path):
    """One step at an absurd learning rate: the training loss of that step is still finite, the
    weights after it are not. Nothing is written, and the validation loss is reported."""
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--lr", "3e38", "--max-steps", "1",
                                  "--image-size", "48"))
    assert result.code == 1, result.output
    assert "the weights became non-finite during epoch 0: this epoch is not saved" in result.output
    assert not (tmp_path / "checkpoint.pth.tar").exists()


def test_unreadable_images_are_replaced_and_counted(tmp_path):
    data = make_imagefolder(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=2, image_size=80)
    add_awkward_files(data, size=(80, 80))
    output = tmp_path / "out"
    result = run_main(*quick_args(data, output, "xception", "-b", "14"))
    assert result.code == 0, result.output
    [record] = metrics_of(output)
    assert record["replaced_images"] == 2 and record["train_images"] == 14  # the batch stays full
    assert "replaced unreadable image" in result.output and "extra_garbage" in result.output
    strict = run_main(*quick_args(data, tmp_path / "strict", "xception", "-b", "14", "--strict-data"))
    assert strict.code == 1 and "extra_" in strict.output


def _bad_layouts(root):
    (root / "no_val" / "train" / "a").mkdir(parents=True)
    make_imagefolder(root / "empty_class", num_classes=2, train_per_class=2, val_per_class=1, image_size=80)
    (root / "empty_class" / "train" / "class_empty").mkdir()
    make_imagefolder(root / "mismatch", num_classes=2, train_per_class=2, val_per_class=1, image_size=80)
    (root / "mismatch" / "val" / "class_01").rename(root / "mismatch" / "val" / "other")
    return {
        "missing": (root / "nowhere", "data path not found"),
        "no_val": (root / "no_val", "no 'val' folder"),
        "empty_class": (root / "empty_class", "class_empty"),
        "mismatch": (root / "mismatch", "other"),
    }


@pytest.mark.parametrize("case", ["missing", "no_val", "empty_class", "mismatch"])
def test_bad_data_gives_one_line_error(case, tmp_path):
    data, expected = _bad_layouts(tmp_path)[case]
    result = run_main(*quick_args(data, tmp_path / "out", "xception"))
    assert result.code == 1
    assert expected in result.output
    assert "Traceback" not in result.output


def test_bad_resume_files_are_errors(trained_checkpoint, tiny_data, tmp_path):
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(trained_checkpoint.read_bytes()[:1000])
    cases = [
        (["--resume", tmp_path / "missing.pth.tar"], "checkpoint not found"),
        (["--resume", corrupt], "cannot read checkpoint"),
        (["-a", "xception", "--resume", trained_checkpoint], "is a checkpoint of inception_v3"),
    ]
    for extra, expected in cases:
        arch = extra[1] if extra[0] == "-a" else "inception_v3"
        extra = extra[2:] if extra[0] == "-a" else extra
        result = run_main(*quick_args(tiny_data, tmp_path / "out", arch, *extra))
        assert result.code == 1, result.output
        assert expected in result.output
        assert "Traceback" not in result.output
    more_classes = run_main(*quick_args(tiny_data, tmp_path / "out", "inception_v3", "--num-classes", "5",
                                        "--resume", trained_checkpoint))
    assert more_classes.code == 1 and "trained for 3 classes" in more_classes.output


@pytest.mark.parametrize("argv, expected", [
    ([], "--data DIR"),
    (["--dummy", "-e"], "--evaluate needs weights"),
    (["--dummy", "-a", "resnet50"], "unknown architecture"),
    (["--dummy", "--loss-scale", "big"], "number or 'dynamic'"),
    (["--dummy", "--image-size", "64"], "minimum input size 75"),
    (["--dummy", "--world-size", "0"], "argument --world-size: must be positive, or -1 for one node, got 0"),
    (["--dummy", "--device", "tpu"], "choose from auto, npu, cuda, mps, cpu"),
    (["--dummy", "--output_dir", ""], "--output_dir/--output-dir: an empty path; name a folder"),
])
def test_bad_options_are_rejected(argv, expected):
    result = run_main(*argv)
    assert result.code == 2
    assert expected in result.output


def test_pretrained_modelzoo_checkpoint_fine_tunes(trained_checkpoint, tiny_data, tmp_path):
    """A ModelZoo-style file (module. keys, other class count) initialises a new run."""
    saved = load_checkpoint(trained_checkpoint)
    modelzoo = {"epoch": 3, "arch": "inception_v3", "best_acc1": 1.0,
                "state_dict": {f"module.{k}": v for k, v in saved["state_dict"].items()}}
    path = tmp_path / "modelzoo.pth.tar"
    torch.save(modelzoo, path)
    data = make_imagefolder(tmp_path / "two", num_classes=2, train_per_class=4, val_per_class=2, image_size=80)
    result = run_main(*quick_args(data, tmp_path / "out", "inception_v3", "--pretrained", path,
                                  "--max-steps", "1"))
    assert result.code == 0, result.output
    assert "re-initialised" in result.output
    tuned = load_checkpoint(tmp_path / "out" / "checkpoint.pth.tar")["state_dict"]
    assert tuned["fc.weight"].shape[0] == 2
