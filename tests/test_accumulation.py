"""Gradient accumulation: N batches per optimizer step give the update of one N-times-larger
batch, the schedule and the checkpoints count optimizer steps, and throughput counts images."""
from __future__ import annotations

import torch
from torch import nn

from conftest import metrics_of, quick_args, run_main, step_records
from training.engine import EpochPosition, LoopSettings, StepParts, TrainingLoss, train_one_epoch
from training.precision import FullPrecision
from training.schedule import LrSchedule

TOLERANCE = 1e-6  # float32 sums in another order: the same update up to rounding


def _one_step(batches: list, accum_steps: int) -> dict[str, torch.Tensor]:
    # No BatchNorm: with it, the statistics of a batch depend on its size, by design.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    settings = LoopSettings(device=torch.device("cpu"), print_freq=100, fps_warmup_steps=0, show_progress=False,
                            progress="lines")
    train_one_epoch(model, batches, TrainingLoss(label_smoothing=0.1), optimizer, LrSchedule(0.1, epochs=1),
                    FullPrecision(), EpochPosition(epoch=0, steps=1), settings,
                    parts=StepParts(accum_steps=accum_steps))
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_accumulated_batches_give_the_update_of_one_larger_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 4, 4, generator=generator)
    labels = torch.randint(5, (8,), generator=generator)
    whole = _one_step([(images, labels, [])], accum_steps=1)
    split = _one_step([(images[:4], labels[:4], []), (images[4:], labels[4:], [])], accum_steps=2)
    quarters = _one_step([(images[i:i + 2], labels[i:i + 2], []) for i in range(0, 8, 2)], accum_steps=4)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(quarters[key], whole[key], rtol=0, atol=TOLERANCE)


def test_accumulation_in_a_run(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--image-size", "48", "-b", "2",
                                  "--accum-steps", "3", "--max-steps", "2", "--print-freq", "1"))
    assert result.code == 0, result.output
    assert "batch size 2 per device x 1 = 2 global x 3 accumulated = 6 per optimizer step" in result.output
    [record] = metrics_of(tmp_path)
    assert record["train_steps"] == 2 and record["train_images"] == 12 and record["accum_steps"] == 3
    assert [r["step"] for r in step_records(tmp_path)] == [1, 2]
