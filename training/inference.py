"""Checkpoint (or bare state dict) -> a model ready for inference, with what it needs.

``load_for_inference`` is what ``demo.py`` and ``pthtar2onnx.py`` share. It reads the file
through the checkpoint schema (``training.checkpoint``: every field checked, the weights
finite), so our checkpoints, ModelZoo's (``module.`` prefixes) and bare torchvision/timm
state dicts all arrive checked; the raw or averaged (EMA) weights are chosen by the
schema's ``inference_weights``. It returns the eval-mode model with its preprocessing and
class names.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.preprocess import PreprocessConfig
from models.registry import ModelSpec, UnknownArchError, create_model, list_models, model_spec, resolve_arch
from models.weights import load_weights, read_weights_file
from training.checkpoint import Checkpoint, CheckpointError, CheckpointMismatch

IMAGENET_CLASSES = 1000


@dataclass
class InferenceModel:
    """An eval-mode model on the CPU and what its file said about it."""

    model: nn.Module
    spec: ModelSpec
    num_classes: int
    class_names: list[str]
    image_size: int  # the training crop size stored in the checkpoint, else the model's default
    epoch: int | None
    source: Path
    weights: str  # "model", or "ema" for the averaged weights

    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.spec.preprocess


def _classifier_rows(spec: ModelSpec, state: Mapping[str, torch.Tensor], source: Path) -> int:
    # Bare state dicts do not say how many classes they have; the classifier's rows do.
    with torch.device("meta"):  # no memory, no initialisation cost: only the head names are read
        probe = create_model(spec.name)
    for head in probe.classifier_names:
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    raise CheckpointError(f"{source} has no classifier weights ({', '.join(probe.classifier_names)}) "
                          f"for {spec.name}; is -a right?")


def imagenet_class_names() -> list[str]:
    from torchvision.models import Inception_V3_Weights  # its metadata is local: no download

    return list(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """The checkpoint's names, ImageNet's for 1000 classes, else ``class N``."""
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == IMAGENET_CLASSES:
        return imagenet_class_names()
    return [f"class {index}" for index in range(num_classes)]


def _arch_of(path: Path, checkpoint: Checkpoint, arch: str | None) -> str:
    name = arch or checkpoint.arch
    if not name:
        raise CheckpointMismatch(f"{path} does not name its architecture; give it with -a "
                                 f"({', '.join(list_models())})")
    try:
        name = resolve_arch(str(name))
    except UnknownArchError as error:
        raise CheckpointMismatch(f"{path}: {error}") from None
    checkpoint.check_fits(path, name)
    return name


def _inference_options(spec: ModelSpec, checkpoint: Checkpoint, path: Path) -> dict:
    # The aux head only matters for training; its weights, if present, are dropped.
    options = checkpoint.model_options_for(spec.options)
    options.update({key: value for key, value in (("aux_logits", False), ("init_weights", False))
                    if key in spec.options})
    return options


def _num_classes(spec: ModelSpec, checkpoint: Checkpoint, weights: Mapping[str, torch.Tensor], path: Path) -> int:
    rows = _classifier_rows(spec, weights, path)
    if checkpoint.num_classes is not None and checkpoint.num_classes != rows:
        raise CheckpointError(f"{path}: num_classes is {checkpoint.num_classes}, but its classifier has {rows} "
                              f"rows; the file is damaged")
    return rows


def _image_size(spec: ModelSpec, checkpoint: Checkpoint, path: Path) -> int:
    size = checkpoint.image_size or spec.preprocess.input_size
    if size < spec.min_input_size:
        raise CheckpointError(f"{path}: image_size {size} is below {spec.name}'s minimum input size "
                              f"{spec.min_input_size}; the file is damaged")
    return size


def load_for_inference(path: str | os.PathLike, arch: str | None = None, use_ema: bool = True) -> InferenceModel:
    """Build ``path``'s model for inference: eval mode, CPU, no auxiliary head.

    Args:
        arch: the architecture; needed for bare state dicts, checked against checkpoints.
        use_ema: take the averaged (EMA) weights where the checkpoint's ``inference_weights``
            chooses them; False (``--no-ema``) always takes the raw ones.
    """
    path = Path(path)
    checkpoint = Checkpoint.from_dict(read_weights_file(path), path)
    spec = model_spec(_arch_of(path, checkpoint, arch))
    weights, which = checkpoint.inference_weights(use_ema)
    num_classes = _num_classes(spec, checkpoint, weights, path)
    model = create_model(spec.name, num_classes=num_classes, **_inference_options(spec, checkpoint, path))
    load_weights(model, weights, strict_head=True)
    model.eval()
    epoch = checkpoint.epoch if checkpoint.is_training_state else None
    return InferenceModel(model, spec, num_classes, resolve_class_names(checkpoint.class_names, num_classes),
                          _image_size(spec, checkpoint, path), epoch, path, which)
