"""Options and their resolution: ModelZoo spellings, ignored upstream options, the recipes, the
resume policy, warm-up scaling, per-node batch division, and errors that keep their traceback."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dataclasses import fields

from conftest import REPO, quick_args, run_main
from training.config import RESUMED_OPTIONS, OptionError, divide_per_node, resolve_options
from training.options import IGNORED_UPSTREAM, PUBLISHED, build_parser, parse_command_line
from training.recipes import Recipe, recipe_for


def resolved(*argv: str, processes: int = 1, saved: dict | None = None) -> argparse.Namespace:
    command = parse_command_line(list(argv))
    return resolve_options(command.args, command.explicit, processes, saved).args


# -- the recipes: the seeds' values -------------------------------------------------------

@pytest.mark.parametrize("arch, processes, expected", [
    ("inception_v3", 1, dict(batch_size=256, lr=0.045, weight_decay=2e-4, label_smoothing=0.1, loss_scale="1024",
                             warm_up_epochs=0, epochs=240)),
    ("inception_v3", 8, dict(batch_size=256, lr=1.2, weight_decay=1e-4, label_smoothing=0.1, loss_scale="128",
                             warm_up_epochs=0, epochs=240)),
    ("xception", 1, dict(batch_size=128, lr=0.1, weight_decay=1e-4, label_smoothing=0.0, loss_scale="dynamic",
                         warm_up_epochs=0, epochs=150)),
    ("xception", 8, dict(batch_size=128, lr=0.8, weight_decay=1e-4, label_smoothing=0.1, loss_scale="1024",
                         warm_up_epochs=5, epochs=150)),
])
def test_recipes_are_upstreams(arch, processes, expected):
    recipe = recipe_for(arch, processes)
    assert {key: getattr(recipe, key) for key in expected} == expected
    assert (recipe.momentum, recipe.lr_schedule, recipe.aux_loss_weight) == (0.9, "cosine", 0.4)


# -- ModelZoo spellings ---------------------------------------------------------------------

def test_the_quick_run_learns_with_values_of_its_own_unless_a_recipe_is_named():
    inception = resolved("--dummy", "-a", "inception_v3")
    assert (inception.opt, inception.lr, inception.epochs, inception.image_size) == ("adamw", 1e-3, 5, 96)
    xception = resolved("--dummy", "-a", "xception")
    assert (xception.opt, xception.lr, xception.batch_size) == ("sgd", 0.05, 16)
    paper = resolved("--dummy", "-a", "inception_v3", "--recipe", "paper")
    assert (paper.opt, paper.lr, paper.epochs) == ("rmsprop", 0.045, 5)
    assert resolved("--dummy", "-a", "inception_v3", "--opt", "sgd").opt == "sgd"  # typed wins


def test_modelzoo_spellings():
    args = resolved("--data_path", "/d", "--loss_scale=128", "--mom=0.8", "--learning-rate=0.3",
                    "--weight-decay=1.0e-04", "--device", "gpu", "--world-size=-1", "--rank=-1", "--device_list",
                    "0,1", "--warm_up_epochs=2", "--epochs=9")
    assert (args.data, args.loss_scale, args.momentum, args.lr, args.weight_decay) == ("/d", "128", 0.8, 0.3, 1e-4)
    assert (args.device, args.nodes, args.node_rank, args.device_list) == ("cuda", -1, -1, [0, 1])
    assert resolved("/data/imagenet").data == "/data/imagenet"  # pytorch/examples' positional DIR
    assert resolved("--dummy", "--loss-scale", "-1").loss_scale == "dynamic"


def test_a_bare_pretrained_means_the_published_weights(tmp_path):
    assert resolved("--dummy", "--pretrained").pretrained == PUBLISHED
    assert resolved("--dummy", "--pretrained", "w.pth").pretrained == "w.pth"
    args = resolved("--pretrained", str(tmp_path))  # pytorch/examples: the flag, then the data set
    assert (args.pretrained, args.data) == (PUBLISHED, str(tmp_path))


def test_ignored_upstream_options_warn_once_each(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--max-steps", "1", "--image-size", "48",
                                  "-bm", "1", "--prof", "--fine-tuning", "--checkpoint-freq", "0"))
    assert result.code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "has no effect here" in line]
    assert len(warnings) == 4
    for flags in ("-bm/--benchmark", "--prof", "-t/--fine-tuning", "--checkpoint-freq"):
        assert any(flags in line for line in warnings), flags
    assert set(IGNORED_UPSTREAM) >= {"benchmark", "prof", "fine_tuning"}


def test_explicit_options_are_known():
    command = parse_command_line(["--dummy", "--lr", "0.1", "-b", "8", "--wd=0"])
    assert {"lr", "batch_size", "weight_decay", "dummy"} <= command.explicit
    assert "epochs" not in command.explicit and "momentum" not in command.explicit


# -- the help and the values ------------------------------------------------------------------

TOPICS = ["data", "model", "optimisation", "augmentation", "averaging", "precision", "device", "distributed", "run"]


def test_help_is_grouped_by_topic_and_shows_only_defaults_that_mean_something():
    text = build_parser().format_help()
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [title for title in titles if title in TOPICS] == TOPICS
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    lines = " ".join(text.split())  # argparse wraps the help text
    for flag in ("--no-channels-last", "--no-ema", "--no-model-ema", "--dummy"):
        described = lines.split(f"{flag} ", 1)[1].split("  ")[0]
        assert "default:" not in described.split(" --")[0], flag
    assert "(default: inception_v3)" in lines and "(default: 600)" in lines and "(default: 0.08 1)" in lines


def test_every_option_says_whether_a_resume_takes_it():
    """A new option cannot be left out of the resume policy: adding one without ``resumed=`` fails here."""
    unclassified = [action.option_strings or action.dest for action in build_parser()._actions
                    if action.dest != "help" and not isinstance(getattr(action, "resumed", None), bool)]
    assert not unclassified
    assert {item.name for item in fields(Recipe)} <= set(RESUMED_OPTIONS)  # what a recipe sets defines the run
    assert not {"data", "resume", "output_dir", "device", "workers", "evaluate", "progress"} & set(RESUMED_OPTIONS)


@pytest.mark.parametrize("argv, expected", [
    (["--label-smoothing", "2"], "argument --label-smoothing: must be in [0, 1), got 2"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be in [0, 1), got 1"),
    (["--momentum", "1.5"], "argument --momentum: must be in [0, 1), got 1.5"),
    (["--drop-rate", "1"], "argument --drop-rate: must be in [0, 1), got 1"),
    (["--lr-gamma", "0"], "argument --lr-gamma: must be in (0, 1], got 0"),
    (["--lr", "nan"], "argument --lr/--learning-rate: must be >= 0, got nan"),
    (["--start-epoch", "-1"], "argument --start-epoch: must be an integer >= 0, got -1"),
    (["--workers", "-2"], "argument -j/--workers: must be an integer >= 0, got -2"),
    (["--save-every-steps", "-1"], "argument --save-every-steps: must be an integer >= 0, got -1"),
    (["--fps-warmup-steps", "-1"], "argument --fps-warmup-steps: must be an integer >= 0, got -1"),
    (["--gpu", "-1"], "argument --gpu/--npu: must be an integer >= 0, got -1"),
    (["--seed", "-3"], "argument --seed: must be an integer in 0 .. 2^64-1, got -3"),
    (["--port", "70000"], "argument --port: must be a TCP port, 1 to 65535, got 70000"),
    (["--rank", "-2"], "argument --rank: must be >= 0, or -1 for 0, got -2"),
    (["--dist-backend", "mpi"], "argument --dist-backend: invalid choice: 'mpi'"),  # then the choices
    (["--loss-scale", "inf"], "argument --loss-scale/--loss_scale: must be positive, got inf"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
])
def test_out_of_range_values_stop_at_parse_time(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_command_line(["--dummy", *argv])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"main.py: error: {expected}")


# -- resolution -----------------------------------------------------------------------------

def test_resume_takes_untyped_options_from_the_checkpoint():
    saved = {"lr": 0.3, "batch_size": 64, "epochs": 90, "weight_decay": 5e-5, "seed": 7, "label_smoothing": 0.2}
    args = resolved("--dummy", "--lr", "0.5", saved=saved)
    assert (args.lr, args.batch_size, args.epochs, args.weight_decay, args.seed) == (0.5, 64, 90, 5e-5, 7)
    command = parse_command_line(["--dummy", "--lr", "0.5"])
    notes = resolve_options(command.args, command.explicit, 1, saved).notes
    assert notes == ["options changed from the checkpoint: lr 0.3 -> 0.5"]


def test_a_recipe_warm_up_shrinks_with_a_shorter_run():
    command = parse_command_line(["-a", "xception", "--synthetic", "--epochs", "15"])
    resolution = resolve_options(command.args, command.explicit, 8)
    assert resolution.args.warm_up_epochs == pytest.approx(0.5)  # 5 of 150 epochs -> 0.5 of 15
    assert "warm-up scaled with the run: the recipe's 5 of 150 epochs -> 0.5 of 15" in resolution.notes[0]
    assert resolved("-a", "xception", "--synthetic", processes=8).warm_up_epochs == 5


def test_an_explicit_warm_up_that_never_ends_is_an_error():
    with pytest.raises(OptionError, match="--warm_up_epochs 5 reaches the last epoch .--epochs 4.: the learning "
                                          "rate never leaves the warm-up ramp; use fewer warm-up epochs"):
        resolved("-a", "xception", "--synthetic", "--epochs", "4", "--warm_up_epochs", "5")
    # A throughput run (ModelZoo's Xception performance line: 2 epochs, warm-up 5) only gets a note.
    command = parse_command_line(["--synthetic", "--epochs", "2", "--warm_up_epochs", "5", "--max-steps", "10"])
    notes = resolve_options(command.args, command.explicit, 8).notes
    assert notes == ["--warm_up_epochs 5 reaches the last epoch (--epochs 2): the learning rate never leaves the "
                     "warm-up ramp; accepted for a run cut by --max-steps"]
    assert resolved("--dummy", "--epochs", "4", "--warm_up_epochs", "3").warm_up_epochs == 3


def test_multiprocessing_distributed_divides_the_node_batch_and_workers():
    args = resolved("--dummy", "-b", "2048", "-j", "128", "--multiprocessing-distributed")
    note = divide_per_node(args, 8)
    assert (args.batch_size, args.workers) == (256, 16)
    assert note == "-b 2048 per node / 8 devices = 256 per device (--multiprocessing-distributed, as ModelZoo)"
    odd = resolved("--dummy", "-b", "10", "-j", "3")
    assert "2 images of the node batch left out" in divide_per_node(odd, 4) and odd.workers == 1
    with pytest.raises(OptionError, match="too small for its 8 devices"):
        divide_per_node(resolved("--dummy", "-b", "4"), 8)
    unset = resolved("--dummy")
    unset.batch_size, unset.workers = None, None
    assert divide_per_node(unset, 8) is None and unset.batch_size is None  # the recipe's per-device batch stays


# -- errors ---------------------------------------------------------------------------------

def test_a_programming_error_keeps_its_traceback(tiny_data, tmp_path):
    """A bug is not a one-line "error:": it propagates with its traceback and a non-zero exit."""
    argv = [str(a) for a in quick_args(tiny_data, tmp_path, "xception", "--image-size", "48")]
    program = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
               "import training.engine as engine\n"
               "def broken(self, outputs, target):\n"
               "    raise ValueError('a bug in the loss')\n"
               "engine.TrainingLoss.forward = broken\n"
               "from training.run import main\n"
               f"sys.exit(main({argv!r}))\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ValueError: a bug in the loss" in result.stderr
    assert "error: a bug in the loss" not in result.stdout
