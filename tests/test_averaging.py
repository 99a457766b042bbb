"""Model EMA: validated every epoch next to the raw weights, saved and resumed bit for bit,
used by -e, demo and export unless asked not to; model_best follows the better of the two."""
from __future__ import annotations

import torch

from conftest import metrics_of, quick_args, run_main
from training.checkpoint import load_checkpoint
from training.inference import load_for_inference
from training.run import best_of

EMA_KEY = "ema_state_dict"  # the file's key for the averaged weights (docs/OUTPUTS.md)

# A constant learning rate: a 1-epoch run is the first half of a 2-epoch one.
EMA = ("--model-ema", "--model-ema-decay", "0.9", "--model-ema-warmup", "--max-steps", "2", "--image-size", "48",
       "--lr", "0.01", "--lr-schedule", "step", "--lr-step-epochs", "100")


def test_ema_is_validated_saved_and_resumed_exactly(tiny_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(*quick_args(tiny_data, straight, "xception", *EMA, "--epochs", "2")).code == 0
    assert run_main(*quick_args(tiny_data, split, "xception", *EMA, "--epochs", "1")).code == 0
    resumed = run_main(*quick_args(tiny_data, split, "xception", *EMA, "--epochs", "2", "--resume", "auto"))
    assert resumed.code == 0, resumed.output
    a, b = load_checkpoint(straight / "checkpoint.pth.tar"), load_checkpoint(split / "checkpoint.pth.tar")
    assert a["ema_updates"] == b["ema_updates"] == 4
    for key, value in a[EMA_KEY].items():
        torch.testing.assert_close(value, b[EMA_KEY][key], rtol=0, atol=0, msg=key)
    records = metrics_of(straight)
    assert all({"ema_val_acc1", "ema_val_loss", "best_weights"} <= set(r) for r in records)
    assert " * EMA Acc@1 " in resumed.output


def test_evaluation_follows_the_weights_that_scored_best_unless_told_not_to(tiny_data, tmp_path):
    """-e, the demo and the export take the averaged weights when the checkpoint records that
    they scored best (or does not say), the raw ones when those did, and always with --no-ema."""
    train = tmp_path / "train"
    assert run_main(*quick_args(tiny_data, train, "xception", *EMA)).code == 0
    [record] = metrics_of(train)
    saved = torch.load(train / "checkpoint.pth.tar", weights_only=True)
    for best_weights in ("ema", "model"):
        checkpoint = tmp_path / f"best_{best_weights}.pth.tar"
        torch.save({**saved, "best_weights": best_weights}, checkpoint)
        cases = [([], best_weights, f"{'ema_' if best_weights == 'ema' else ''}val_acc1")]
        if best_weights == "ema":
            cases.append((["--no-ema"], "model", "val_acc1"))
        for extra, weights, key in cases:
            output = tmp_path / f"{best_weights}{''.join(extra)}"
            result = run_main("-a", "xception", "--data", tiny_data, "-j", "0", "-e", "--resume", checkpoint,
                              "--output_dir", output, *extra)
            assert result.code == 0, result.output
            [evaluated] = metrics_of(output)
            assert evaluated["weights"] == weights and evaluated["val_acc1"] == record[key]
        assert load_for_inference(checkpoint).weights == best_weights
        assert load_for_inference(checkpoint, use_ema=False).weights == "model"


def test_the_best_checkpoint_follows_the_better_weights():
    assert best_of({"val_acc1": 40.0, "ema_val_acc1": 55.0}) == (55.0, "ema")
    assert best_of({"val_acc1": 60.0, "ema_val_acc1": 55.0}) == (60.0, "model")
    assert best_of({"val_acc1": 60.0}) == (60.0, "model")
