"""Mixed precision: fp16 steps skipped for overflowing gradients are counted, reported and warned about."""
from __future__ import annotations


from conftest import metrics_of, quick_args, run_main

FP16 = ("--amp", "--amp-dtype", "float16", "--image-size", "48", "--max-steps", "3", "--print-freq", "1")


def test_overflowing_static_scale_steps_are_counted_and_warned(tiny_data, tmp_path):
    # A scale this large overflows every fp16 gradient: GradScaler skips every step.
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", *FP16, "--loss-scale", "1e30"))
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path)
    assert record["skipped_steps"] == 3
    assert "skipped_steps 3" in next(line for line in result.output.splitlines() if "summary" in line)
    assert ("3 of 3 steps (100.0%) of epoch 0 were skipped because the fp16 gradients overflowed "
            "(autocast fp16, static loss scale 1e+30): use --loss-scale dynamic, or a lower --loss-scale"
            in result.output)
    board = _scalars(tmp_path)
    assert board["train/skipped_steps"] == [3.0]


def test_a_sane_scale_skips_nothing(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", *FP16, "--loss-scale", "128"))
    assert result.code == 0, result.output
    assert metrics_of(tmp_path)[0]["skipped_steps"] == 0
    assert "were skipped" not in result.output


def _scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing import event_accumulator as accumulator
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
