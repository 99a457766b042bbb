"""A bare --pretrained: the published ImageNet weights, from the caches the reference libraries
fill (files placed there by the test; nothing is downloaded), or a clear error."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import models
from conftest import TINY_IMAGE_SIZE, quick_args, run_main
from training.inference import load_for_inference
from models.pretrained import INCEPTION_V3_IMAGENET, XCEPTION_IMAGENET, huggingface_cache, torch_hub_file
from training.config import resolve_options
from training.distributed import Topology
from training.options import parse_command_line
from training.setup import build_model, decide
from training.device import CAPABILITIES


def published_state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return models.create_model(arch, num_classes=1000).state_dict()


def place_in_torch_hub(arch: str, weights) -> tuple[Path, dict]:
    state = published_state(arch)
    path = torch_hub_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state


def built(*argv: str):
    command = parse_command_line(list(argv))
    args = resolve_options(command.args, command.explicit, 1).args
    decisions = decide(args, CAPABILITIES["cpu"], Topology())
    return build_model(args, models.model_spec(args.arch), 1000, torch.device("cpu"), decisions, Topology())


def test_inception_v3_takes_torchvisions_file_with_transform_input(tiny_data, tmp_path):
    path, state = place_in_torch_hub("inception_v3", INCEPTION_V3_IMAGENET)
    try:
        model = built("--dummy", "--pretrained", "--no-channels-last")
        assert model.options == {"transform_input": True} and model.model.transform_input
        for key, value in state.items():
            torch.testing.assert_close(model.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
        # Fine-tuning on 3 classes: heads re-initialised, transform_input kept in the checkpoint.
        result = run_main(*quick_args(tiny_data, tmp_path, "inception_v3", "--pretrained", "--max-steps", "1"))
        assert result.code == 0, result.output
        assert f"loaded weights from {path}" in result.output and "re-initialised" in result.output
        loaded = load_for_inference(tmp_path / "checkpoint.pth.tar")
        assert loaded.model.transform_input and loaded.image_size == TINY_IMAGE_SIZE
    finally:
        path.unlink()


def test_xception_takes_timms_weights_from_the_hugging_face_cache():
    state = published_state("xception")
    snapshot = huggingface_cache() / "models--timm--legacy_xception.tf_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(snapshot / "model.safetensors"))
    try:
        model = built("-a", "xception", "--dummy", "--pretrained").model
        for key, value in state.items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    finally:
        (snapshot / "model.safetensors").unlink()


def test_without_a_cached_file_offline_the_error_says_where_to_put_it(tiny_data, tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set for every test: nothing is ever downloaded
    result = run_main(*quick_args(tiny_data, tmp_path, "xception", "--pretrained", "-e"))
    assert result.code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: no timm legacy_xception (tf_in1k) weights: not cached, and HF_HUB_OFFLINE is set")
    assert str(torch_hub_file(XCEPTION_IMAGENET)) in line and XCEPTION_IMAGENET.url in line
    assert "timm/legacy_xception.tf_in1k" in line and "--pretrained FILE" in line
