"""Augmentation and regularisation beyond the ModelZoo recipes: the worker-side policies keep
uint8 crops of the right shape, MixUp/CutMix give soft targets, and each option changes what it
should (a knob that does nothing is a bug)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import models
from conftest import metrics_of, quick_args, run_main
from models.preprocess import INCEPTION_V3
from training.config import resolve_options
from training.data.imagefolder import build_datasets
from training.data.sampling import SampleKey
from training.data.transforms import AugmentSettings
from training.device import CAPABILITIES
from training.distributed import Topology
from training.options import parse_command_line
from training.setup import build_model, decide
from training.data.mixing import build_mixer, keep_batch
from training.data.transforms import AUTO_AUGMENT, TrainTransform, extra_augmentation


@pytest.mark.parametrize("policy", [*AUTO_AUGMENT, None])
def test_each_policy_gives_a_uint8_crop_of_the_right_shape(policy, tiny_data):
    extra = extra_augmentation(policy, random_erase=1.0)
    transform = TrainTransform(40, extra=extra)
    path = next((tiny_data / "train").rglob("*.jpg"))
    with Image.open(path) as img:
        out = transform(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 40)
    plain = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = extra(plain.clone())
    assert erased.dtype == torch.uint8 and (erased == 0).any()  # RandomErasing at p=1 fills with 0


def test_augmentation_options_reach_the_training_and_evaluation_transforms(tiny_data):
    settings = AugmentSettings(scale=(0.5, 0.6), ratio=(1.0, 1.0), hflip=0.0, interpolation="bicubic", crop_pct=0.5,
                               auto_augment="ta_wide", random_erase=0.1)
    train, val = build_datasets(tiny_data, 32, INCEPTION_V3, augment=settings)
    transform = train.transform
    assert (transform.scale, transform.ratio, transform.hflip, transform.interpolation) == (
        (0.5, 0.6), (1.0, 1.0), 0.0, "bicubic")
    assert "TrivialAugmentWide" in repr(transform.extra) and "RandomErasing" in repr(transform.extra)
    assert val.transform.resize_size == 64 and val.transform.interpolation == "bicubic"
    defaults = build_datasets(tiny_data, 32, INCEPTION_V3)[0].transform
    assert defaults.extra is None and defaults.scale == (0.08, 1.0)
    crop = train[SampleKey(0, 5)][0]
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_targets_are_probabilities(mixup, cutmix):
    mix = build_mixer(5, mixup, cutmix)
    images = torch.rand(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(1)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert (targets > 0).sum() > 6 or not torch.equal(mixed, images)  # something was mixed
    assert build_mixer(5, 0.0, 0.0) is keep_batch


def test_mixup_cutmix_and_drop_rate_train(tiny_data, tmp_path):
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--max-steps", "2", "--image-size", "48",
                                  "--mixup", "0.2", "--cutmix", "1.0", "--drop-rate", "0.3", "--auto-augment", "ra"))
    assert result.code == 0, result.output
    [record] = metrics_of(tmp_path)
    assert record["train_images"] == 8 and record["train_loss"] > 0
    assert "drop_rate 0.3" in result.output


def test_drop_rate_sets_the_models_dropout():
    for argv, expected in ((["--drop-rate", "0.25"], 0.25), ([], 0.5)):
        command = parse_command_line(["--dummy", *argv])
        args = resolve_options(command.args, command.explicit, 1).args
        decisions = decide(args, CAPABILITIES["cpu"], Topology())
        model = build_model(args, models.model_spec("inception_v3"), 3, torch.device("cpu"), decisions,
                            Topology()).model
        assert model.dropout.p == expected
