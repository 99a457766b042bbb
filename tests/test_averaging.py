"""Model EMA: validated every epoch next to the raw weights, saved and resumed bit for bit,
used by -e, demo and export unless asked not to; model_best follows the better of the two. The
update copies integer buffers and leaves out the steps the loss scaler skipped."""
from __future__ import annotations

import torch
from torch import nn

from conftest import metrics_of, quick_args, run_main
from training.averaging import ModelEma
from training.checkpoint import load_checkpoint
from training.engine import EpochPosition, LoopSettings, StepParts, TrainingLoss, train_one_epoch
from training.inference import load_for_inference
from training.precision import FullPrecision, build_precision
from training.run import best_of
from training.schedule import LrSchedule

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


# -- the update itself, on a tiny model trained by the real loop ------------------------------------

def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def train(model: nn.Module, average: ModelEma, precision, steps: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.arange(4) % 3, []) for _ in range(steps)]
    settings = LoopSettings(device=torch.device("cpu"), print_freq=100, fps_warmup_steps=0, show_progress=False,
                            progress="lines")
    return train_one_epoch(model, batches, TrainingLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                           LrSchedule(0.1, epochs=1), precision, EpochPosition(epoch=0, steps=steps), settings,
                           parts=StepParts(average=average, averaged_model=model))


def test_integer_buffers_are_copied_not_averaged():
    model = tiny_model()
    average = ModelEma(model, decay=0.9)
    train(model, average, FullPrecision(), steps=3)
    assert model[1].num_batches_tracked.item() == average.module[1].num_batches_tracked.item() == 3


def test_a_step_the_scaler_skipped_leaves_the_average_alone():
    """A scale this large overflows every fp16 gradient, so every step is skipped; their forwards
    still moved the model's BatchNorm statistics, which the average must not take."""
    model = tiny_model()
    average = ModelEma(model, decay=0.9)
    initial = {key: value.clone() for key, value in average.module.state_dict().items()}
    record = train(model, average, build_precision("cpu", amp=True, amp_dtype="float16", loss_scale="1e30"), steps=2)
    assert record["skipped_steps"] == 2 and average.updates == 2
    assert not torch.equal(model[1].running_mean, initial["1.running_mean"])
    for key, value in average.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=key)


def test_a_step_that_ran_is_averaged_as_without_a_scaler():
    model = tiny_model()
    plain, gated = ModelEma(model, decay=0.9, warmup=True), ModelEma(model, decay=0.9, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model(torch.randn(4, 3, 8, 8))  # training mode: the BatchNorm statistics move too
        plain.update(model)
        gated.update(model, applied=torch.tensor(1.0))
    for key, value in plain.module.state_dict().items():
        torch.testing.assert_close(gated.module.state_dict()[key], value, msg=key)
